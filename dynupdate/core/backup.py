"""Online backups of a home (database + package store) and their restore.

The database is copied with SQLite's backup API, which gives a consistent
snapshot while the server and the CLI keep writing; the package files
copied are exactly those the snapshot references.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any, cast

from dynupdate import __version__
from dynupdate.core import audit
from dynupdate.core.db import DB_NAME
from dynupdate.core.errors import Conflict, InvalidInput, NotFound, StorageError
from dynupdate.core.home import Home, home_locked
from dynupdate.core.integrity import file_sha256, schema_problems
from dynupdate.core.store import CHUNK_SIZE, PackageStore, StagedFile, is_sha256
from dynupdate.core.times import format_utc, utc_now

__all__ = ["MANIFEST", "backup_home", "restore_home"]

MANIFEST = "dynupdate-backup.json"
# SQLite folds these into a database it opens: changes no verification saw.
_SIDE_FILES = ("-wal", "-shm", "-journal")


def backup_home(home: Home, dest: Path) -> dict[str, Any]:
    """Write a consistent copy of ``home`` into the new or empty folder ``dest``."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidInput(f"Backup folder '{dest}' exists and is not empty; choose a new one.")
    try:
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = dest / (DB_NAME + ".partial")
        target = sqlite3.connect(partial)
        try:
            home.db.conn.backup(target)
            # The copy keeps the home's WAL mode, and opening it would leave -wal and
            # -shm files beside it, which restore refuses: a backup is one file.
            target.execute("PRAGMA journal_mode = DELETE")
        finally:
            target.close()
        os.chmod(partial, 0o600)
        os.replace(partial, dest / DB_NAME)
        snapshot = sqlite3.connect(f"file:{dest / DB_NAME}?mode=ro&immutable=1", uri=True)
        try:
            rows = snapshot.execute("SELECT DISTINCT sha256, size FROM packages").fetchall()
            endpoints = snapshot.execute("SELECT count(*) FROM endpoints").fetchone()[0]
        finally:
            snapshot.close()
        store = PackageStore(dest / "packages")
        copied = 0
        for sha, size in rows:
            source = home.store.path_for(sha)
            target_path = store.path_for(sha)
            target_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(source, target_path)
            except FileNotFoundError:
                raise Conflict(
                    f"Package file {sha[:12]}… vanished during the backup (removed meanwhile); "
                    "run the backup again."
                ) from None
            if target_path.stat().st_size != size:
                raise StorageError(f"Package file {sha[:12]}… changed size during the backup.")
            copied += 1
        tls = home.path / "tls"
        if tls.is_dir():
            shutil.copytree(tls, dest / "tls")
        manifest = {
            "created": format_utc(utc_now()),
            "dynupdate_version": __version__,
            "database_sha256": file_sha256(dest / DB_NAME),
            "packages": copied,
            "endpoints": endpoints,
        }
        (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as e:
        raise StorageError(f"Cannot write the backup to '{dest}': {e.strerror or e}.") from e
    return manifest


def restore_home(
    source: Path, home_path: Path, *, force: bool = False, actor: str | None = None
) -> dict[str, Any]:
    """Replace the home's database and store with a verified backup (server stopped).

    Everything is verified as it is copied into the home, not before, so a
    backup changed meanwhile cannot slip through: each package file is hashed
    while it is staged, the database is checked in its staged copy (integrity,
    and a schema exactly as the migrations make it). Nothing lands unless all
    of it is sound; on a refusal the home is left as it was.
    """
    manifest = _manifest(source)
    db_copy = source / DB_NAME
    if not db_copy.is_file():
        raise InvalidInput(f"The backup in '{source}' has no database {DB_NAME}.")
    for suffix in _SIDE_FILES:
        if (source / (DB_NAME + suffix)).exists():
            raise InvalidInput(
                f"The backup in '{source}' has a {DB_NAME}{suffix} beside its database; "
                "a backup is a single database file, refusing it."
            )
    try:
        home_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise StorageError(f"Cannot use the home '{home_path}': {e.strerror or e}.") from e
    advice = "stop that server before restoring (--force does not override this)."
    with home_locked(home_path, "restore", advice):
        if (home_path / DB_NAME).exists() and not force:
            raise Conflict(
                f"The home '{home_path}' already has a database; stop the server and add "
                "--force to replace it."
            )
        try:
            _restore(source, manifest, home_path, actor)
        except OSError as e:
            raise StorageError(f"Cannot restore into '{home_path}': {e.strerror or e}.") from e
    return manifest


def _manifest(source: Path) -> dict[str, Any]:
    manifest_path = source / MANIFEST
    if not manifest_path.is_file():
        raise InvalidInput(f"'{source}' is not a dynupdate backup (no {MANIFEST}).")
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (OSError, ValueError) as e:
        raise InvalidInput(f"Cannot read the backup manifest '{manifest_path}': {e}.") from None
    created = manifest.get("created") if isinstance(manifest, dict) else None
    if not (isinstance(created, str) and created.isprintable() and len(created) < 100):
        raise InvalidInput(f"The backup manifest '{manifest_path}' is not one dynupdate wrote.")
    digest = manifest.get("database_sha256")
    if digest is not None and not (isinstance(digest, str) and is_sha256(digest)):
        raise InvalidInput(f"The backup manifest '{manifest_path}' has an invalid database_sha256.")
    # A JSON object: anything else was refused with `created` above.
    return cast(dict[str, Any], manifest)


def _restore(source: Path, manifest: dict[str, Any], home_path: Path, actor: str | None) -> None:
    staged_db = home_path / (DB_NAME + ".restoring")
    backup_store = PackageStore(source / "packages")
    store = PackageStore(home_path / "packages")
    store.ensure()
    added: list[StagedFile] = []
    landed = False
    try:
        with contextlib.ExitStack() as staged_files:
            digest = _copy_private(source / DB_NAME, staged_db)
            expected = manifest.get("database_sha256")
            if expected is not None and digest != expected:
                raise InvalidInput(
                    f"The backup database in '{source}' does not match its manifest "
                    f"(SHA-256 {digest}, expected {expected})."
                )
            rows = _verified_rows(staged_db, source)
            for sha, size in rows:  # files first: a row must never land without its file
                final = store.path_for(sha)
                if final.is_file():
                    continue
                path = backup_store.path_for(sha)
                try:
                    staged = staged_files.enter_context(store.stage(path, expect=sha))
                except (InvalidInput, NotFound):
                    raise InvalidInput(
                        f"The backup's package file '{path}' is missing or damaged "
                        "(its content does not have its SHA-256); refusing the backup."
                    ) from None
                added.append(staged)
                if staged.size != size:
                    raise InvalidInput(
                        f"The backup's package file {sha[:12]}… has {staged.size} bytes, "
                        f"its database row says {size}."
                    )
            # The restored database lands with its `restore` entry, in its own chain.
            audit.append_to_file(
                staged_db,
                actor,
                audit.Action.RESTORE,
                None,
                {"source": str(source.absolute()), "backup": manifest},
            )
            for suffix in ("-wal", "-shm"):
                (home_path / (DB_NAME + suffix)).unlink(missing_ok=True)
            os.replace(staged_db, home_path / DB_NAME)
            landed = True
            for staged in added:  # a `check --repair` meanwhile saw them as orphans
                store.relink(staged)
    except BaseException:
        if not landed:
            staged_db.unlink(missing_ok=True)
            for staged in added:
                store.delete(staged.sha256)
        raise
    if (source / "tls").is_dir() and not (home_path / "tls").exists():
        # Copied inside a private folder, then moved: the key is never readable by others.
        with tempfile.TemporaryDirectory(dir=home_path, prefix=".tls-") as private:
            shutil.copytree(source / "tls", Path(private) / "tls")
            os.replace(Path(private) / "tls", home_path / "tls")


def _copy_private(source: Path, target: Path) -> str:
    """Copy ``source`` to a new ``target`` created 0600; the SHA-256 of what was copied."""
    target.unlink(missing_ok=True)  # left by a killed restore; the home's lock is ours
    digest = hashlib.sha256()
    with (
        open(source, "rb") as src,
        open(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "wb") as dst,
    ):
        while chunk := src.read(CHUNK_SIZE):
            digest.update(chunk)
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def _verified_rows(db_path: Path, source: Path) -> list[tuple[str, int]]:
    """The package files the staged database needs, once it proved sound."""
    # immutable: read the copy as it is, never creating -wal/-shm files beside it.
    check = sqlite3.connect(f"file:{db_path}?mode=ro&immutable=1", uri=True)
    try:
        try:
            sound = check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        except sqlite3.DatabaseError:
            sound = False
        if not sound:
            raise InvalidInput(f"The backup database in '{source}' is damaged.")
        problems = schema_problems(check)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise InvalidInput(f"Refusing the backup in '{source}': {problems[0]}{more}.")
        query = "SELECT DISTINCT sha256, size FROM packages ORDER BY sha256"
        rows = check.execute(query).fetchall()
    finally:
        check.close()
    for sha, size in rows:
        if not isinstance(sha, str) or not is_sha256(sha) or not isinstance(size, int):
            raise InvalidInput(f"The backup database in '{source}' has an invalid package row.")
    return rows
