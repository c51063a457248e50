"""The download's files on the device: a private directory, and files never opened through a link.

The directory is private (0700), and each file is still opened as if it were
not: a name that is a symlink, a FIFO or a hard link to another file is never
opened through. A download goes to ``<sha256>.part`` (its ETag beside it in
``<sha256>.etag``) through a :class:`FileReceiver`, is sealed read-only and
hashed through one descriptor (:func:`seal`), then renamed to ``<sha256>``.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from dynupdate.endpoint.errors import EndpointError
from dynupdate.endpoint.transport import ClientStats, Receiver
from dynupdate.protocol import Offer

__all__ = [
    "FileReceiver",
    "discard",
    "partial_size",
    "private_directory",
    "read_tag",
    "seal",
    "storage_error",
]

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_EXISTING = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO does not hang us


class FileReceiver(Receiver):
    """A download body into ``part``: appended on 206, restarted on 200, never past ``size``."""

    def __init__(self, part: Path, tag_file: Path, have: int, size: int, stats: ClientStats):
        super().__init__()
        self.part, self.tag_file, self.stats = part, tag_file, stats
        self.have, self.size = have, size
        self.file: BinaryIO | None = None

    def begin(self, status: int, headers: dict[str, str]) -> None:
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(headers.get("content-range", ""))
            if match is None or int(match[1]) != self.have or int(match[3]) != self.size:
                discard(self.part, self.tag_file)
                raise EndpointError(
                    "bad-response",
                    f"Asked for bytes {self.have}- of {self.size}; got "
                    f"{headers.get('content-range', 'no Content-Range')!r}.",
                )
            if not self.have:  # bytes 0- although not asked for: restart
                self.file = self._restart()
                return
            try:
                self.file = _storage(_reopen, self.part, self.have)
            except EndpointError:
                discard(self.part, self.tag_file)
                raise
        elif status == 200:
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > self.size:
                discard(self.part, self.tag_file)
                raise EndpointError(
                    "too-large",
                    f"The package is {length} bytes; {self.size} were announced. Refused.",
                )
            tag = headers.get("etag", "")
            if tag.startswith('"'):
                with _storage(_create, self.tag_file) as tag_out:
                    tag_out.write(tag.encode("latin-1"))
            else:
                self.tag_file.unlink(missing_ok=True)
            self.file = self._restart()
        # Any other status: an error document, kept in memory (bounded) by the base class.

    def _restart(self) -> BinaryIO:
        self.have = 0
        return _storage(_create, self.part)

    def write(self, data: bytes) -> None:
        if self.file is None:
            super().write(data)
            return
        if self.have + len(data) > self.size:
            self.close()
            discard(self.part, self.tag_file)
            raise EndpointError(
                "too-large", f"The server sent more than the announced {self.size} bytes. Refused."
            )
        try:
            self.file.write(data)
        except OSError as e:  # a full disk: the callback's error would be a parser error
            raise storage_error(self.part, e) from None
        self.have += len(data)
        self.stats.bytes_downloaded += len(data)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def discard(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def private_directory(directory: Path) -> None:
    """Make ``directory`` (0700) or take it private; one of another user's is refused."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.geteuid():
        raise EndpointError(
            "storage",
            f"The download directory '{directory}' belongs to another user (uid "
            f"{info.st_uid}); use one of the device user's own.",
        )
    if info.st_mode & 0o022:
        os.chmod(directory, 0o700)  # another user could rename the files in it


def _ours(info: os.stat_result) -> bool:
    """A regular file of this user with no other name."""
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and info.st_nlink == 1


def _create(path: Path) -> BinaryIO:
    """A new, empty file at ``path`` (0600); what had the name is removed, not followed."""
    path.unlink(missing_ok=True)
    return os.fdopen(os.open(path, _NEW, 0o600), "wb")


def _reopen(path: Path, size: int) -> BinaryIO:
    """The partial download at ``path`` to append to: ours, and ``size`` bytes long."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | _EXISTING)
    info = os.fstat(fd)
    if not _ours(info) or info.st_size != size:
        os.close(fd)
        raise EndpointError("storage", f"The partial download '{path}' changed on disk.")
    return os.fdopen(fd, "ab")


def _storage(opener: Callable[..., BinaryIO], *args) -> BinaryIO:
    try:
        return opener(*args)
    except OSError as e:
        raise storage_error(args[0], e) from None


def storage_error(path: Path, error: OSError) -> EndpointError:
    return EndpointError("storage", f"Cannot store the package at '{path}': {error.strerror}.")


def partial_size(part: Path) -> int:
    """The bytes of a download to resume; 0 when there is none this device wrote."""
    try:
        info = os.lstat(part)
    except OSError:
        return 0
    return info.st_size if _ours(info) else 0


def read_tag(tag_file: Path) -> str:
    """The ETag kept beside a partial download; ``""`` when there is none of ours."""
    try:
        fd = os.open(tag_file, os.O_RDONLY | _EXISTING)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as file:
        if not _ours(os.fstat(fd)):
            return ""
        return file.read(1024).decode("latin-1").strip()


def seal(part: Path, offer: Offer) -> os.stat_result:
    """Make the finished download read-only, then check its size and hash through that descriptor.

    Returns its ``stat``: the caller checks that the name it hands on is still this file.
    """
    try:
        fd = os.open(part, os.O_RDONLY | _EXISTING)
    except OSError as e:
        raise storage_error(part, e) from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not _ours(info):
            raise EndpointError("storage", f"The download '{part}' is not a file of its own.")
        os.fchmod(fd, 0o400)
        if info.st_size != offer.size:
            raise EndpointError(
                "size-mismatch",
                f"Received {info.st_size} bytes of {offer.name}; {offer.size} were announced.",
            )
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    if digest != offer.sha256:
        raise EndpointError(
            "sha256-mismatch",
            f"{offer.name} has SHA-256 {digest}, not the announced {offer.sha256}; deleted.",
        )
    return info
