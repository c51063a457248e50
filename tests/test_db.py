"""Migrations and the database's settings."""

from __future__ import annotations

import sqlite3
import stat
import threading

import pytest
import sqlite_utils

from dynupdate.core.db import DB_NAME, connect, migrations, open_db, write
from dynupdate.core.decision import Policy
from dynupdate.core.errors import StorageError
from dynupdate.core.fleet import current_generation, load_fleet_state, load_policies
from dynupdate.core.maintenance import clear_window, load_window, save_window
from dynupdate.core.packages import Package, add_package, list_packages, remove_package
from dynupdate.core.policies import disable_policy, set_policy
from dynupdate.core.windows import make_window


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


def test_older_schema_upgrades_and_keeps_its_data(tmp_path):
    """A home made by the first release, with a package, a policy and a window, upgrades."""
    first = migrations._migrations[0].name
    db = sqlite_utils.Database(tmp_path / DB_NAME)
    migrations.apply(db, stop_before=[m.name for m in migrations._migrations[1:]] or None)
    assert [m.name for m in migrations.applied(db)] == [first]
    # Written as that release wrote them: plain SQL against its schema, not today's code.
    db.executescript(
        f"""
        INSERT INTO packages (type, type_key, version, name, size, sha256, description, uploaded)
            VALUES ('GroupSeries', 'groupseries', '6.2.2.0-100', 'gs.pup', 200000,
                    '{"ab" * 32}', 'Spring release', '2026-03-01T10:00:00Z');
        INSERT INTO policies (type_key, type, version_to_use, allow_newer, updated)
            VALUES ('groupseries', 'GroupSeries', '6.2.2.0-100', 1, '2026-03-01T10:05:00Z');
        INSERT INTO maintenance_window (id, days, start, duration_minutes, tz, updated)
            VALUES (1, '["mon", "fri"]', '22:00', 240, 'Europe/Berlin', '2026-03-01T10:06:00Z');
        """
    )
    generation = db.execute("SELECT generation FROM config_generation").fetchone()[0]
    db.close()

    upgraded = open_db(tmp_path)

    assert not migrations.pending(upgraded)
    assert list_packages(upgraded) == [
        Package("GroupSeries", "6.2.2.0-100", "gs.pup", 200000, "ab" * 32, "Spring release",
                "2026-03-01T10:00:00Z")
    ]
    assert load_policies(upgraded) == {
        "groupseries": Policy(type="GroupSeries", version_to_use="6.2.2.0-100", allow_newer=True)
    }
    assert load_window(upgraded) == make_window("mon,fri", "22:00", "4h", "Europe/Berlin")
    assert upgraded.execute("SELECT generation FROM config_generation").fetchone()[0] == generation
    upgraded.close()


def test_pragmas_wal_foreign_keys_busy_timeout(tmp_path):
    db = open_db(tmp_path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000


def test_database_file_is_private(tmp_path):
    open_db(tmp_path).close()
    assert stat.S_IMODE((tmp_path / DB_NAME).stat().st_mode) == 0o600


def test_config_generation_moves_on_policy_package_window_changes(home, make_file):
    """Every change the update decision reads moves the counter the server's cache watches."""
    moves = []

    def change(what: str, call) -> None:
        before = current_generation(home.db)
        call()
        moves.append((what, current_generation(home.db) > before))

    change("package add", lambda: add_package(home.db, home.store, make_file(b"7"), "Trio", "7.0"))
    change("policy insert", lambda: set_policy(home.db, "Trio", "7.0"))
    change("policy update", lambda: set_policy(home.db, "Trio", "7.0", allow_newer=True))
    change("policy disable", lambda: disable_policy(home.db, "Trio"))
    change("window insert", lambda: save_window(home.db, make_window("sat", "02:00", "1h", None)))
    change("window update", lambda: save_window(home.db, make_window("sun", "03:00", "2h", None)))
    change("window clear", lambda: clear_window(home.db))
    change("package remove", lambda: remove_package(home.db, home.store, "Trio", "7.0"))
    assert moves == [(what, True) for what, _ in moves]

    unchanged = current_generation(home.db)
    load_fleet_state(home.db)
    assert current_generation(home.db) == unchanged, "reading is not a change"


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


def test_a_fleet_recorded_before_last_answers_upgrades_with_its_endpoints(tmp_path):
    """A home at 0005 (issue 12's release) with devices upgrades; their answers start unknown."""
    names = [m.name for m in migrations._migrations]
    db = sqlite_utils.Database(tmp_path / DB_NAME)
    migrations.apply(db, stop_before=names[names.index("0006_last_answer") :])
    db.executescript(
        """
        INSERT INTO endpoints (serial, type, type_key, version, first_seen, last_poll,
                               last_report, report_state, report_version, bucket)
            VALUES ('8211ABC', 'GroupSeries', 'groupseries', '6.2.1', '2026-11-01T08:00:00Z',
                    '2026-12-01T08:00:00Z', '2026-12-01T08:05:00Z', 'failed', '6.2.2', 4711);
        INSERT INTO endpoint_history (serial, at, event, version)
            VALUES ('8211ABC', '2026-11-01T08:00:00Z', 'first-seen', '6.2.1');
        """
    )
    db.close()

    upgraded = open_db(tmp_path)

    assert not migrations.pending(upgraded)
    row = upgraded.execute(
        "SELECT serial, version, last_poll, report_state, bucket, last_reason, retry_at"
        " FROM endpoints"
    ).fetchall()
    assert row == [("8211ABC", "6.2.1", "2026-12-01T08:00:00Z", "failed", 4711, None, None)]
    assert upgraded.execute("SELECT count(*) FROM endpoint_history").fetchone() == (1,)
    indexes = {r[1] for r in upgraded.execute("PRAGMA index_list(endpoints)")}
    assert "endpoints_window" in indexes
    upgraded.close()
