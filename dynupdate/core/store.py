"""The content-addressed package store: ``packages/ab/<sha256>``.

A file becomes visible only complete: it is written to a temp file inside
the store, hashed while copying, fsynced, then hard-linked to its final
name. The temp file is kept (and locked) until the database row is
committed, so a concurrent removal of the same content can always be
repaired before the row lands. Temp files left by a killed import are
unlocked, and :meth:`PackageStore.clean_temp` removes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dynupdate.core.errors import InvalidInput, NotFound, StorageError

if TYPE_CHECKING:
    from io import BufferedReader

__all__ = ["CHUNK_SIZE", "PackageStore", "StagedFile", "canonical_sha256", "is_sha256"]

CHUNK_SIZE = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA256_ANY_CASE = re.compile(r"[0-9a-fA-F]{64}")


def is_sha256(text: str) -> bool:
    """True for exactly 64 lowercase hex digits (the only names the store has).

    >>> is_sha256("ab" * 32), is_sha256("AB" * 32), is_sha256("../" + "a" * 61)
    (True, False, False)
    """
    return _SHA256.fullmatch(text) is not None


def canonical_sha256(text: str) -> str | None:
    """The store's name for a SHA-256 written in either case; None when ``text`` is not one.

    Hex digits mean the same in either case, and a device may well upper-case
    the hash it was given before building the URL: it gets the same package.

    >>> canonical_sha256("AB" * 32) == "ab" * 32, canonical_sha256("../" + "a" * 61)
    (True, None)
    """
    return text.lower() if _SHA256_ANY_CASE.fullmatch(text) else None


@dataclass(frozen=True)
class StagedFile:
    """A complete, fsynced copy of an import, linked under its final name."""

    sha256: str
    size: int
    temp: Path


class PackageStore:
    """Package files by SHA-256 under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.temp_dir = root / ".tmp"

    def path_for(self, sha256: str) -> Path:
        """Where the file with this hash lives (it may not exist)."""
        if not is_sha256(sha256):
            raise InvalidInput(
                f"Invalid SHA-256 '{sha256[:80]}': expected 64 lowercase hex digits."
            )
        return self.root / sha256[:2] / sha256

    def ensure(self) -> None:
        self.temp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    @contextlib.contextmanager
    def stage(
        self,
        source: Path,
        progress: Callable[[int], None] | None = None,
        *,
        expect: str | None = None,
    ) -> Iterator[StagedFile]:
        """Copy ``source`` into the store; the temp copy lives until the block ends.

        ``expect``: the SHA-256 the bytes copied must have, else nothing is linked.
        """
        self.ensure()
        temp = self.temp_dir / f"{uuid.uuid4().hex}.part"
        try:
            src = open(source, "rb")  # noqa: SIM115 - closed below, after the copy
        except FileNotFoundError:
            raise NotFound(f"No file '{source}'.") from None
        except IsADirectoryError:
            raise InvalidInput(f"'{source}' is a directory, not a package file.") from None
        except PermissionError:
            raise InvalidInput(f"Cannot read '{source}': permission denied.") from None
        try:
            fd = _create_locked(temp)
        except OSError as e:
            src.close()
            raise StorageError(f"Cannot store '{source}': {e.strerror or e}.") from e
        try:
            with src:
                sha256, size = _copy_hashing(src, fd, progress)
            if expect is not None and sha256 != expect:
                raise InvalidInput(
                    f"The file '{source}' has the SHA-256 {sha256}, expected {expect}."
                )
            os.fsync(fd)
            final = self.path_for(sha256)
            final.parent.mkdir(exist_ok=True, mode=0o755)
            self.link(temp, final)
            _fsync_dir(final.parent)
            yield StagedFile(sha256, size, temp)
        except OSError as e:
            raise StorageError(f"Cannot store '{source}': {e.strerror or e}.") from e
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    @staticmethod
    def link(temp: Path, final: Path) -> None:
        """Give ``final`` the content of ``temp`` unless it already has it."""
        with contextlib.suppress(FileExistsError):
            os.link(temp, final)

    def relink(self, staged: StagedFile) -> None:
        """Put the file back under its name if a concurrent removal deleted it."""
        final = self.path_for(staged.sha256)
        if not final.exists():
            final.parent.mkdir(exist_ok=True, mode=0o755)
            self.link(staged.temp, final)

    def delete(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path_for(sha256).unlink()

    def clean_temp(self) -> int:
        """Remove temp files no live import holds; returns how many."""
        removed = 0
        if not self.temp_dir.is_dir():
            return 0
        for temp in self.temp_dir.iterdir():
            with claim_temp(temp) as unused:
                if unused:  # no import in progress holds it
                    with contextlib.suppress(FileNotFoundError):
                        temp.unlink()
                        removed += 1
        return removed


@contextlib.contextmanager
def claim_temp(temp: Path) -> Iterator[bool]:
    """Hold a temp file's lock if no live import does: yields whether it was free.

    Every import holds the lock of its temp file while it runs (see
    :func:`_create_locked`); a file gone meanwhile yields False too.
    """
    try:
        fd = os.open(temp, os.O_RDONLY)
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False  # an import in progress
        else:
            yield True
    finally:
        os.close(fd)


def _create_locked(temp: Path) -> int:
    """Create ``temp`` and hold its lock while the import is alive.

    clean_temp leaves locked files alone, but a start can run between the create
    and the lock and delete the new file: then the name is made again.
    """
    while True:
        fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(temp).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _copy_hashing(
    src: BufferedReader, fd: int, progress: Callable[[int], None] | None
) -> tuple[str, int]:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    size = 0
    while n := src.readinto(buffer):
        chunk = view[:n]
        digest.update(chunk)
        while chunk:
            written = os.write(fd, chunk)
            chunk = chunk[written:]
        size += n
        if progress is not None:
            progress(n)
    return digest.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
