"""Online backups of a home (database + package store) and their restore.

The database is copied with SQLite's backup API, which gives a consistent
snapshot while the server and the CLI keep writing; the package files
copied are exactly those the snapshot references.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

from dynupdate import __version__
from dynupdate.core.db import DB_NAME
from dynupdate.core.errors import Conflict, InvalidInput, StorageError
from dynupdate.core.home import Home, home_locked
from dynupdate.core.integrity import file_sha256
from dynupdate.core.store import PackageStore
from dynupdate.core.times import format_utc, utc_now

__all__ = ["MANIFEST", "backup_home", "restore_home"]

MANIFEST = "dynupdate-backup.json"


def backup_home(home: Home, dest: Path) -> dict:
    """Write a consistent copy of ``home`` into the new or empty folder ``dest``."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidInput(f"Backup folder '{dest}' exists and is not empty; choose a new one.")
    try:
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = dest / (DB_NAME + ".partial")
        target = sqlite3.connect(partial)
        try:
            home.db.conn.backup(target)
        finally:
            target.close()
        os.chmod(partial, 0o600)
        os.replace(partial, dest / DB_NAME)
        snapshot = sqlite3.connect(f"file:{dest / DB_NAME}?mode=ro", uri=True)
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
            "packages": copied,
            "endpoints": endpoints,
        }
        (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as e:
        raise StorageError(f"Cannot write the backup to '{dest}': {e.strerror or e}.") from e
    return manifest


def restore_home(source: Path, home_path: Path, *, force: bool = False) -> dict:
    """Replace the home's database and store with a verified backup (server stopped)."""
    manifest_path = source / MANIFEST
    if not manifest_path.is_file():
        raise InvalidInput(f"'{source}' is not a dynupdate backup (no {MANIFEST}).")
    home_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    advice = "stop that server before restoring (--force does not override this)."
    with home_locked(home_path, "restore", advice):
        return _restore(source, home_path, force=force)


def _restore(source: Path, home_path: Path, *, force: bool) -> dict:
    manifest_path = source / MANIFEST
    if (home_path / DB_NAME).exists() and not force:
        raise Conflict(
            f"The home '{home_path}' already has a database; stop the server and add --force "
            "to replace it."
        )
    manifest = json.loads(manifest_path.read_text())
    db_copy = source / DB_NAME
    check = sqlite3.connect(f"file:{db_copy}?mode=ro", uri=True)
    try:
        if check.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            raise InvalidInput(f"The backup database in '{source}' is damaged.")
        rows = check.execute("SELECT DISTINCT sha256 FROM packages").fetchall()
    finally:
        check.close()
    backup_store = PackageStore(source / "packages")
    for (sha,) in rows:
        path = backup_store.path_for(sha)
        if not path.is_file() or file_sha256(path) != sha:
            raise InvalidInput(f"The backup's package file {sha[:12]}… is missing or damaged.")
    home_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = PackageStore(home_path / "packages")
    store.ensure()
    for (sha,) in rows:  # files first: a row must never land without its file
        target = store.path_for(sha)
        if not target.is_file():
            target.parent.mkdir(exist_ok=True)
            temp = store.temp_dir / f"restore-{sha}.part"
            shutil.copyfile(backup_store.path_for(sha), temp)
            os.replace(temp, target)
    staged = home_path / (DB_NAME + ".restoring")
    shutil.copyfile(db_copy, staged)
    os.chmod(staged, 0o600)
    for suffix in ("-wal", "-shm"):
        (home_path / (DB_NAME + suffix)).unlink(missing_ok=True)
    os.replace(staged, home_path / DB_NAME)
    if (source / "tls").is_dir() and not (home_path / "tls").exists():
        shutil.copytree(source / "tls", home_path / "tls")
    return manifest
