"""The SQLite database: opening it, its migrations, and short write transactions.

One file in the home, shared by the CLI and the poll server (possibly several
worker processes). WAL lets readers run beside a writer; every write that
reads first takes the write lock up front (``BEGIN IMMEDIATE``) because a
deferred transaction that upgrades to a writer fails at once with
"database is locked" under WAL, whatever the busy timeout.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path

import sqlite_utils
from sqlite_utils import Migrations

from dynupdate.core.errors import InvalidInput, StorageError
from dynupdate.core.waves import bucket

__all__ = [
    "AUTOCHECKPOINT_ENV",
    "DB_NAME",
    "connect",
    "migrations",
    "open_db",
    "wal_autocheckpoint",
    "write",
]

DB_NAME = "dynupdate.db"
BUSY_TIMEOUT_MS = 15_000
# Replication tools such as Litestream want to be the only process that checkpoints
# the WAL (docs/high-availability.md): this variable sets what every connection of
# dynupdate (server and CLI) leaves to them.
AUTOCHECKPOINT_ENV = "DYNUPDATE_WAL_AUTOCHECKPOINT"

migrations = Migrations("dynupdate")


def _count_changes(db: sqlite_utils.Database, *tables: str) -> None:
    """Triggers moving config_generation on every insert, update and delete in ``tables``.

    Shipped migrations call this: what it writes must never change
    (tests/test_schema.py pins the schema each migration leaves).
    """
    for table in tables:
        for event in ("INSERT", "UPDATE", "DELETE"):
            db.execute(
                f"CREATE TRIGGER {table}_{event.lower()}_generation AFTER {event} ON {table} "
                "BEGIN UPDATE config_generation SET generation = generation + 1; END"
            )


@migrations(name="0001_packages_policies_window")
def _m0001(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE packages (
            id INTEGER PRIMARY KEY,
            type TEXT NOT NULL,
            type_key TEXT NOT NULL,
            version TEXT NOT NULL,
            name TEXT NOT NULL,
            size INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            description TEXT,
            uploaded TEXT NOT NULL,
            UNIQUE (type_key, version)
        );
        CREATE INDEX packages_sha256 ON packages (sha256);
        CREATE TABLE policies (
            type_key TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            version_to_use TEXT,
            allow_newer INTEGER NOT NULL DEFAULT 0,
            updated TEXT NOT NULL
        );
        CREATE TABLE maintenance_window (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            days TEXT NOT NULL,
            start TEXT NOT NULL,
            duration_minutes INTEGER NOT NULL,
            tz TEXT NOT NULL,
            updated TEXT NOT NULL
        );
        -- generation counts changes to what the update decision reads, so the
        -- server can cache that state and notice a CLI change on the next poll.
        CREATE TABLE config_generation (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            generation INTEGER NOT NULL
        );
        INSERT INTO config_generation (id, generation) VALUES (1, 0);
        """
    )
    _count_changes(db, "packages", "policies", "maintenance_window")


@migrations(name="0002_endpoints_history")
def _m0002(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE endpoints (
            serial TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            type_key TEXT NOT NULL,
            version TEXT NOT NULL,
            model TEXT,
            mac TEXT,
            tz TEXT,
            in_call INTEGER NOT NULL DEFAULT 0,
            address TEXT,
            parent_serial TEXT,
            first_seen TEXT NOT NULL,
            last_poll TEXT,
            last_report TEXT,
            report_state TEXT,
            report_version TEXT,
            report_detail TEXT,
            offered_version TEXT,
            offered_at TEXT
        );
        -- Covers the overview: status counts per type come from this index alone.
        CREATE INDEX endpoints_status
            ON endpoints (type_key, version, report_state, report_version);
        CREATE INDEX endpoints_parent ON endpoints (parent_serial);
        CREATE TABLE endpoint_history (
            id INTEGER PRIMARY KEY,
            serial TEXT NOT NULL,
            at TEXT NOT NULL,
            event TEXT NOT NULL,
            version TEXT,
            detail TEXT
        );
        CREATE INDEX endpoint_history_serial ON endpoint_history (serial, id);
        """
    )


@migrations(name="0003_audit_log")
def _m0003(db: sqlite_utils.Database) -> None:
    # id is the position in the log, from 1 (dynupdate.core.audit assigns it);
    # detail is a JSON object; prev and sha256 chain the entries.
    db.executescript(
        """
        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            type TEXT,
            detail TEXT NOT NULL,
            prev TEXT NOT NULL,
            sha256 TEXT NOT NULL
        );
        CREATE INDEX audit_log_type ON audit_log (type COLLATE NOCASE, id);
        CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: entries cannot be changed'); END;
        CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: entries cannot be deleted'); END;
        """
    )


@migrations(name="0004_activation_keys")
def _m0004(db: sqlite_utils.Database) -> None:
    # Keyed by serial first: a poll offering an update looks up that serial's keys.
    db.executescript(
        """
        CREATE TABLE activation_keys (
            serial TEXT NOT NULL,
            version TEXT NOT NULL,
            key TEXT NOT NULL,
            imported TEXT NOT NULL,
            PRIMARY KEY (serial, version)
        ) WITHOUT ROWID;
        """
    )


@migrations(name="0005_rollouts")
def _m0005(db: sqlite_utils.Database) -> None:
    # A rollout freezes the type's policy as it stood (stable_*), so the decision
    # for devices it does not admit never moves while it is active. Per device,
    # rollout_devices sums up its attempts; rollout_attempts keeps each one (what
    # --max-per-hour counts, and the history an admin reads after a halt).
    db.executescript(
        """
        CREATE TABLE rollouts (
            id INTEGER PRIMARY KEY,
            type TEXT NOT NULL,
            type_key TEXT NOT NULL,
            version TEXT NOT NULL,
            stable_version TEXT,
            policy_version TEXT,
            policy_allow_newer INTEGER,
            state TEXT NOT NULL,
            waves TEXT NOT NULL,
            wave INTEGER NOT NULL,
            wave_opened_at TEXT NOT NULL,
            options TEXT NOT NULL,
            halt_reason TEXT,
            resumed_at TEXT,
            stopped_at TEXT,
            stopped_seconds REAL NOT NULL DEFAULT 0,
            started_at TEXT NOT NULL,
            finished_at TEXT
        );
        CREATE UNIQUE INDEX rollouts_one_active ON rollouts (type_key)
            WHERE state IN ('running', 'paused', 'halted');
        CREATE TABLE rollout_devices (
            rollout_id INTEGER NOT NULL REFERENCES rollouts (id),
            serial TEXT NOT NULL,
            bucket INTEGER NOT NULL,
            trial INTEGER NOT NULL DEFAULT 0,
            offered_at TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            failures INTEGER NOT NULL DEFAULT 0,
            open_at TEXT,
            open_stopped REAL,
            installed_at TEXT,
            succeeded_at TEXT,
            failed_at TEXT,
            detail TEXT,
            -- When the latest installed report or success was received (POSIX
            -- seconds, to the microsecond): a poll received before it and written
            -- late by another worker is not a revert.
            said_at REAL,
            PRIMARY KEY (rollout_id, serial)
        ) WITHOUT ROWID;
        CREATE TABLE rollout_attempts (
            id INTEGER PRIMARY KEY,
            rollout_id INTEGER NOT NULL REFERENCES rollouts (id),
            serial TEXT NOT NULL,
            opened_at TEXT NOT NULL,
            ended_at TEXT,
            outcome TEXT,
            detail TEXT
        );
        CREATE INDEX rollout_attempts_opened ON rollout_attempts (rollout_id, opened_at);
        CREATE TABLE trial_devices (
            serial TEXT PRIMARY KEY,
            added_at TEXT NOT NULL
        ) WITHOUT ROWID;
        ALTER TABLE packages ADD COLUMN blocked INTEGER NOT NULL DEFAULT 0;
        -- The bucket of the device's endpoint (its own for an endpoint): waves
        -- select devices by it without hashing a million serials per gate.
        ALTER TABLE endpoints ADD COLUMN bucket INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX endpoints_bucket ON endpoints (type_key, bucket);
        """
    )
    db.conn.create_function("bucket", 1, bucket, deterministic=True)
    db.execute("UPDATE endpoints SET bucket = bucket(coalesce(parent_serial, serial))")
    # What the decision reads changes with a rollout's state and with the trial
    # devices: the server's cached fleet state must notice, as for policies.
    # Polls look an activation key up only when the fleet state says some exist:
    # importing or removing keys moves the generation too.
    _count_changes(db, "rollouts", "trial_devices", "activation_keys")


@migrations(name="0006_last_answer")
def _m0006(db: sqlite_utils.Database) -> None:
    # What each device's last poll was told: the reason of its answer ('update'
    # when it was offered one) and the retryAt it was given, so an admin sees why
    # it waits. NULL until its first poll answered by a server that records them.
    # The partial index covers the overview's count of devices waiting for the
    # window without a table scan; polls leave it alone while their answer keeps
    # its reason (see dynupdate.core.registry.record_polls).
    db.executescript(
        """
        ALTER TABLE endpoints ADD COLUMN last_reason TEXT;
        ALTER TABLE endpoints ADD COLUMN retry_at TEXT;
        CREATE INDEX endpoints_window
            ON endpoints (type_key, version, report_state, report_version, bucket)
            WHERE last_reason = 'outside-window';
        """
    )


def wal_autocheckpoint(environ: Mapping[str, str] = os.environ) -> int | None:
    """WAL pages after which a commit checkpoints, from ``$DYNUPDATE_WAL_AUTOCHECKPOINT``.

    None when unset (SQLite's default, 1000 pages); 0 leaves every checkpoint
    to another process.

    >>> wal_autocheckpoint({}), wal_autocheckpoint({AUTOCHECKPOINT_ENV: "0"})
    (None, 0)
    >>> wal_autocheckpoint({AUTOCHECKPOINT_ENV: "-1"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    dynupdate.core.errors.InvalidInput: DYNUPDATE_WAL_AUTOCHECKPOINT='-1' is not a number of ...
    """
    value = environ.get(AUTOCHECKPOINT_ENV)
    if value is None or value == "":
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > 2**31 - 1:
        raise InvalidInput(
            f"{AUTOCHECKPOINT_ENV}={value!r} is not a number of WAL pages: give 0 "
            "(checkpoints left to Litestream) up to 2147483647, or unset it."
        )
    return int(text)


def connect(path: Path | str) -> sqlite_utils.Database:
    """Open the database file with the pragmas every connection needs."""
    pages = wal_autocheckpoint()  # before opening: a bad value leaves nothing open
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    db = sqlite_utils.Database(conn, execute_plugins=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    # NORMAL is durable against a process crash in WAL mode; FULL adds power-loss
    # durability for the few writes (package rows, reports) that must survive it.
    conn.execute("PRAGMA synchronous = FULL")
    if pages is not None:
        conn.execute(f"PRAGMA wal_autocheckpoint = {pages}")
    return db


def open_db(home: Path) -> sqlite_utils.Database:
    """Open (creating and migrating if needed) the database in ``home``."""
    path = home / DB_NAME
    try:
        fresh = not path.exists()
        if fresh:
            # Created private: the database says what runs on every device.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        db = connect(path)
        if db.conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.conn.execute("PRAGMA journal_mode = WAL")
        if migrations.pending(db):
            # Under the write lock, so two first starts cannot both migrate;
            # each migration then runs in a savepoint of this transaction.
            with write(db):
                migrations.apply(db)
    except sqlite3.DatabaseError as e:
        raise StorageError(f"Cannot open the database {path}: {e}.") from e
    return db


@contextlib.contextmanager
def reading(db: sqlite_utils.Database) -> Iterator[None]:
    """One read transaction around several queries, so they see one state of the
    database; inside the caller's transaction when there is one."""
    if db.conn.in_transaction:
        yield
        return
    db.conn.execute("BEGIN")
    try:
        yield
    finally:
        db.conn.execute("COMMIT")


@contextlib.contextmanager
def write(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """A short write transaction that holds the write lock from its first statement."""
    try:
        db.conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as e:
        raise StorageError(f"The database is busy ({e}); try again.") from e
    try:
        yield db
        # Inside the try: a COMMIT that fails (SQLITE_BUSY, a full disk) may leave the
        # transaction open, and the connection would refuse every later BEGIN.
        db.conn.execute("COMMIT")
    except BaseException:
        if db.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.conn.execute("ROLLBACK")
        raise
