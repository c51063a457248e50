"""The home: one folder with the database, the package store and the TLS material."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs
import sqlite_utils

from dynupdate.core.db import DB_NAME, open_db, wal_autocheckpoint
from dynupdate.core.errors import Conflict, StorageError
from dynupdate.core.store import PackageStore

__all__ = [
    "LOCK_NAME",
    "SYSTEM_HOME",
    "Home",
    "default_home",
    "home_locked",
    "lock_home",
    "open_home",
]

LOCK_NAME = "serve.lock"
SYSTEM_HOME = Path("/var/lib/dynupdate")
"""The home of root without ``--home`` or ``DYNUPDATE_HOME``: where a service keeps its state."""


def _running_as_root() -> bool:
    # A seam: tests fake root here rather than run as root and touch /var/lib.
    return os.geteuid() == 0


def default_home() -> Path:
    """``$DYNUPDATE_HOME``; else, for root, /var/lib/dynupdate; else the per-user data directory.

    Root's own data directory would be whatever ``$HOME`` ``sudo`` kept: the
    system's home is one place, whoever's shell ran the command.
    """
    env = os.environ.get("DYNUPDATE_HOME")
    if env:
        return Path(env)
    if _running_as_root():
        return SYSTEM_HOME
    return platformdirs.user_data_path("dynupdate", appauthor=False)


@dataclass
class Home:
    path: Path
    db: sqlite_utils.Database = field(repr=False)
    store: PackageStore = field(repr=False)
    # Whether this open made the home's database: a first run, or the wrong home.
    created: bool = False

    def close(self) -> None:
        self.db.close()


def open_home(path: Path | None = None) -> Home:
    """Open the home, creating it (private, 0700) and its database on first use."""
    path = (path or default_home()).expanduser()
    wal_autocheckpoint()  # a bad setting is refused before anything is created
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.is_dir():
            raise NotADirectoryError(path)
        _refuse_root_in_a_users_home(path)
        created = not (path / DB_NAME).exists()
        store = PackageStore(path / "packages")
        store.ensure()
    except OSError as e:
        raise StorageError(f"Cannot use the home '{path}': {e.strerror or e}.") from e
    db = open_db(path)
    store.clean_temp()
    return Home(path=path, db=db, store=store, created=created)


def _refuse_root_in_a_users_home(path: Path) -> None:
    """Root may not write in a home another user owns (a service's, /var/lib/dynupdate).

    What it would write there (package files, the TLS key, the lock) would be
    root's, and the service's user could no longer read it.
    """
    if not _running_as_root():
        return
    owner = path.stat().st_uid
    if owner == os.geteuid():
        return
    try:
        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        name = str(owner)
    raise Conflict(
        f"The home '{path}' belongs to the user {name}: run dynupdate as that user"
        f" (sudo -u {name} dynupdate …), so that what it writes stays readable by its server."
    )


def lock_home(path: Path, role: str, advice: str) -> int:
    """Take the home's lock for this process (``role``: what it is, for the refusal message).

    An OS lock (``flock``), not a PID file: the kernel drops it when the last
    process holding it ends, ``kill -9`` included, so nothing stale can block a
    restart. Forked workers share it, so the home stays locked while any of
    them still serves. The file only tells a refused command who holds it.
    Returns the descriptor; closing it (or exiting) releases the lock.
    """
    try:
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StorageError(f"Cannot lock the home '{path}': {e.strerror or e}.") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 100, 0).decode("ascii", "replace").split()
        os.close(fd)
        who = (
            f"dynupdate {holder[1]} (PID {holder[0]})"
            if len(holder) == 2 and holder[0].isdigit() and holder[1].isalpha()
            else "another dynupdate process"
        )
        raise Conflict(f"The home '{path}' is in use by {who}; {advice}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {role}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def home_locked(path: Path, role: str, advice: str) -> Iterator[None]:
    """Hold the home's lock (see ``lock_home``) for the duration of a ``with`` block."""
    fd = lock_home(path, role, advice)
    try:
        yield
    finally:
        os.close(fd)
