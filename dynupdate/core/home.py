"""The home: one folder with the database, the package store and the TLS material."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs
import sqlite_utils

from dynupdate.core.db import open_db
from dynupdate.core.errors import StorageError
from dynupdate.core.store import PackageStore

__all__ = ["Home", "default_home", "open_home"]


def default_home() -> Path:
    """``$DYNUPDATE_HOME``, else the per-user data directory."""
    env = os.environ.get("DYNUPDATE_HOME")
    if env:
        return Path(env)
    return platformdirs.user_data_path("dynupdate", appauthor=False)


@dataclass
class Home:
    path: Path
    db: sqlite_utils.Database = field(repr=False)
    store: PackageStore = field(repr=False)

    def close(self) -> None:
        self.db.close()


def open_home(path: Path | None = None) -> Home:
    """Open the home, creating it (private, 0700) and its database on first use."""
    path = (path or default_home()).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.is_dir():
            raise NotADirectoryError(path)
        store = PackageStore(path / "packages")
        store.ensure()
    except OSError as e:
        raise StorageError(f"Cannot use the home '{path}': {e.strerror or e}.") from e
    db = open_db(path)
    store.clean_temp()
    return Home(path=path, db=db, store=store)
