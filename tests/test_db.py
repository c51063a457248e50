"""Migrations and the database's settings."""

from __future__ import annotations

import sqlite3
import stat
import threading

import pytest
import sqlite_utils

from dynupdate.core.db import DB_NAME, connect, migrations, open_db, write
from dynupdate.core.errors import StorageError


def test_blank_database_migrates_to_every_migration(tmp_path):
    db = open_db(tmp_path)
    applied = [m.name for m in migrations.applied(db)]
    assert applied == [m.name for m in migrations._migrations]
    assert {"packages", "policies", "maintenance_window"} <= set(db.table_names())


def test_second_open_is_a_noop(tmp_path):
    open_db(tmp_path).close()
    before = (
        sqlite3.connect(tmp_path / DB_NAME)
        .execute("SELECT name, applied_at FROM _sqlite_migrations ORDER BY rowid")
        .fetchall()
    )
    open_db(tmp_path).close()
    after = (
        sqlite3.connect(tmp_path / DB_NAME)
        .execute("SELECT name, applied_at FROM _sqlite_migrations ORDER BY rowid")
        .fetchall()
    )
    assert before == after


def test_older_schema_upgrades(tmp_path):
    first = migrations._migrations[0].name
    db = sqlite_utils.Database(tmp_path / DB_NAME)
    migrations.apply(db, stop_before=[m.name for m in migrations._migrations[1:]] or None)
    assert [m.name for m in migrations.applied(db)][:1] == [first]
    db.close()
    upgraded = open_db(tmp_path)
    assert not migrations.pending(upgraded)


def test_pragmas_wal_foreign_keys_busy_timeout(tmp_path):
    db = open_db(tmp_path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000


def test_database_file_is_private(tmp_path):
    open_db(tmp_path).close()
    assert stat.S_IMODE((tmp_path / DB_NAME).stat().st_mode) == 0o600


def test_config_generation_moves_on_policy_package_window_changes(tmp_path):
    db = open_db(tmp_path)

    def generation():
        return db.execute("SELECT generation FROM config_generation").fetchone()[0]

    start = generation()
    with write(db):
        db.execute(
            "INSERT INTO packages (type, type_key, version, name, size, sha256, uploaded)"
            " VALUES ('Trio', 'trio', '7.0', 'f', 1, ?, 'now')",
            ("a" * 64,),
        )
    assert generation() == start + 1


def test_write_rolls_back_on_error(tmp_path):
    db = open_db(tmp_path)
    with pytest.raises(RuntimeError), write(db):
        db.execute("UPDATE config_generation SET generation = 99")
        raise RuntimeError("boom")
    assert db.execute("SELECT generation FROM config_generation").fetchone()[0] == 0


def test_a_failed_commit_is_rolled_back_and_the_connection_stays_usable(tmp_path):
    # In rollback-journal mode a reader's SHARED lock makes COMMIT itself fail with
    # SQLITE_BUSY, and SQLite then leaves the transaction open (as a full disk can).
    path = tmp_path / "commit.db"
    db = connect(path)
    assert db.conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0] == "delete"
    db.conn.execute("PRAGMA busy_timeout = 100")
    db.execute("CREATE TABLE t (x INTEGER)")
    reader = sqlite3.connect(path, isolation_level=None, timeout=5)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM t").fetchone() == (0,)  # holds SHARED
    with pytest.raises(sqlite3.OperationalError, match="locked"), write(db):
        db.execute("INSERT INTO t VALUES (1)")
    assert not db.conn.in_transaction
    reader.execute("COMMIT")
    with write(db):  # usable again: without the rollback, BEGIN fails inside a transaction
        db.execute("INSERT INTO t VALUES (2)")
    assert reader.execute("SELECT x FROM t").fetchall() == [(2,)]
    reader.close()
    db.close()


def test_concurrent_first_opens_migrate_once(tmp_path):
    errors = []

    def opener():
        try:
            open_db(tmp_path).close()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=opener) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    count = (
        sqlite3.connect(tmp_path / DB_NAME)
        .execute("SELECT count(*) FROM _sqlite_migrations")
        .fetchone()[0]
    )
    assert count == len(migrations._migrations)


def test_not_a_database_is_a_clear_error(tmp_path):
    (tmp_path / DB_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match="Cannot open the database"):
        open_db(tmp_path)
