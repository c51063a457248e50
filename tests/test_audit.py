"""The audit log (SPEC section 7): one entry per change, a hash chain, `log` and `log --verify`."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import pwd
import re
import sqlite3
import time
from datetime import timedelta

import pytest

from dynupdate.core import audit
from dynupdate.core.backup import MANIFEST
from dynupdate.core.db import DB_NAME, connect, migrations, write
from dynupdate.core.times import parse_utc, utc_now

SPEC_KEYS = {"id", "time", "actor", "action", "type", "detail"}


def _log(cli, *args: str) -> list[dict]:
    return cli.json("log", "--limit", "0", *args)


def _actions(cli) -> list[str]:
    return [entry["action"] for entry in _log(cli)]


def _raw(home_dir) -> sqlite3.Connection:
    """A deliberate sqlite3 session on the home's database, as an intruder would open one."""
    return sqlite3.connect(home_dir / DB_NAME, isolation_level=None)


def _drop_triggers(conn: sqlite3.Connection) -> None:
    conn.execute("DROP TRIGGER audit_log_no_update")
    conn.execute("DROP TRIGGER audit_log_no_delete")


def _some_changes(cli, make_file) -> None:
    cli("package", "add", make_file(b"one"), "--type", "Trio", "--version", "7.1")
    cli("package", "add", make_file(b"two"), "--type", "Trio", "--version", "7.2")
    cli("policy", "set", "Trio", "--version", "7.1")
    cli("window", "set", "--start", "22:00", "--duration", "4h")
    cli("policy", "set", "Trio", "--version", "7.2", "--allow-newer")
    cli("window", "clear")


def test_every_cli_change_appends_one_entry_and_nothing_else_does(cli, make_file, tmp_path):
    package = make_file(b"gs bytes", name="gs-6.2.2.pup")
    cli("package", "add", package, "--type", "GroupSeries", "--version", "6.2.2")
    cli("package", "add", package, "--type", "GroupSeries", "--version", "6.2.2")  # no-op
    cli("package", "add", make_file(b"gs other"), "--type", "GroupSeries", "--version", "6.2.2",
        code=1)  # fmt: skip
    cli("policy", "set", "GroupSeries", "--version", "9.9", code=1)  # refused
    cli("policy", "set", "GroupSeries", "--version", "6.2.2", "--dry-run")
    cli("policy", "set", "groupseries", "--version", "6.2.2")
    cli("policy", "set", "GroupSeries", "--version", "6.2.2")  # what is set already
    cli("package", "remove", "GroupSeries", "6.2.2", code=1)  # the policy needs it
    cli("window", "set", "--start", "22:00", "--duration", "4h", "--dry-run")
    cli("window", "set", "--start", "22:00", "--duration", "4h", "--days", "mon-fri")
    cli("window", "set", "--start", "22:00", "--duration", "4h", "--days", "mon-fri")
    cli("window", "clear")
    cli("window", "clear")  # no window any more
    cli("policy", "disable", "GroupSeries")
    cli("policy", "disable", "GroupSeries")  # disabled already
    cli("package", "remove", "GroupSeries", "6.2.2")
    keys = tmp_path / "keys.csv"
    keys.write_text("serial,version,key\n8211ABC,6.2.2,K-1\n")
    cli("key", "import", keys)
    cli("key", "import", keys)  # the same keys: nothing changes
    cli("key", "remove", "8211ABC", "6.2.2")
    cli("key", "remove", "8211ABC", "6.2.2", code=1)  # gone already

    entries = _log(cli)
    assert [e["action"] for e in reversed(entries)] == [
        "package.add",
        "policy.set",
        "window.set",
        "window.clear",
        "policy.disable",
        "package.remove",
        "key.import",
        "key.remove",
    ]
    assert [e["id"] for e in entries] == list(range(len(entries), 0, -1))
    assert [e["type"] for e in reversed(entries)] == [
        "GroupSeries", "GroupSeries", None, None, "GroupSeries", "GroupSeries", None, None,
    ]  # fmt: skip
    add = entries[-1]
    assert add["detail"] == {
        "version": "6.2.2",
        "sha256": hashlib.sha256(b"gs bytes").hexdigest(),
        "size": len(b"gs bytes"),
        "name": "gs-6.2.2.pup",
    }
    assert entries[-2]["detail"]["version_to_use"] == "6.2.2"
    assert entries[-3]["detail"]["days"] == ["mon", "tue", "wed", "thu", "fri"]
    assert entries[0]["detail"] == {"serial": "8211ABC", "version": "6.2.2"}


def test_an_empty_log(cli):
    assert cli.json("log") == []
    assert "No entries" in cli("log").stderr
    verified = cli("log", "--verify")
    assert verified.stdout == "" and "intact: 0 entries" in verified.stderr
    assert cli.json("log", "--verify") == {
        "intact": True, "entries": 0, "first_bad_id": None, "problem": None,
        "newest_sha256": None,
    }  # fmt: skip


def test_json_keys_and_types(cli, make_file):
    cli("package", "add", make_file(b"x"), "--type", "Trio", "--version", "7.1")
    [entry] = cli.json("log")
    assert set(entry) >= SPEC_KEYS
    assert isinstance(entry["id"], int) and entry["id"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["time"])
    assert isinstance(entry["detail"], dict)
    assert cli.json("log", "--type", "Nothing") == []


def test_actor_is_the_os_user_and_under_sudo_the_invoking_one(cli, make_file, monkeypatch):
    monkeypatch.delenv("SUDO_USER", raising=False)
    cli("package", "add", make_file(b"a"), "--type", "Trio", "--version", "1")
    monkeypatch.setenv("SUDO_USER", "ada")
    cli("package", "add", make_file(b"b"), "--type", "Trio", "--version", "2")
    sudo, plain = cli.json("log")
    assert plain["actor"] == getpass.getuser()
    assert "effective_user" not in plain["detail"]
    assert sudo["actor"] == "ada"
    assert sudo["detail"]["effective_user"] == pwd.getpwuid(os.geteuid()).pw_name


def test_actor_falls_back_when_there_is_no_login_name(monkeypatch):
    def no_login_name() -> str:
        raise OSError("No username set in the environment")

    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.setattr(getpass, "getuser", no_login_name)
    assert audit.os_actor() == (pwd.getpwuid(os.geteuid()).pw_name, None)


def test_filters_type_any_case_limit_since(cli, make_file, home, monkeypatch):
    _some_changes(cli, make_file)
    cli("package", "add", make_file(b"gs"), "--type", "GroupSeries", "--version", "6.2")
    trio = cli.json("log", "--type", "TRIO")
    assert [e["action"] for e in trio] == ["policy.set", "policy.set", "package.add", "package.add"]
    assert {e["type"] for e in trio} == {"Trio"}
    assert [e["id"] for e in cli.json("log", "--limit", "2")] == [7, 6]
    assert len(cli.json("log", "--limit", "0")) == 7
    # An entry from three days ago, as the clock then said.
    three_days_ago = utc_now() - timedelta(days=3)
    with monkeypatch.context() as patched, write(home.db):
        patched.setattr(audit, "utc_now", lambda: three_days_ago)
        audit.append(home.db, "old-admin", audit.Action.WINDOW_CLEAR, None, {})
    assert [e["actor"] for e in cli.json("log", "--limit", "1")] == ["old-admin"]
    recent = cli.json("log", "--since", "2d")
    assert len(recent) == 7 and "old-admin" not in {e["actor"] for e in recent}
    assert len(cli.json("log", "--since", "4d")) == 8
    assert "Invalid duration '2 days'" in cli("log", "--since", "2 days", code=1).stderr
    assert cli("log", "--limit", "-1", code=2).exit_code == 2


def test_table_shows_local_time_and_a_summary(cli, make_file, monkeypatch):
    cli("package", "add", make_file(b"x", name="trio.pup"), "--type", "Trio", "--version", "7.1")
    [entry] = cli.json("log")
    with monkeypatch.context() as patched:
        patched.setenv("TZ", "Asia/Tokyo")  # UTC+9, no daylight saving
        time.tzset()
        try:
            table = cli("log").stdout
        finally:
            patched.undo()
            time.tzset()
    moment = parse_utc(entry["time"]) + timedelta(hours=9)
    assert moment.strftime("%Y-%m-%d %H:%M:%S") in table
    assert "package.add" in table and "trio.pup" in table and "Trio" in table


def test_update_and_delete_are_refused_by_triggers(cli, make_file, home_dir):
    _some_changes(cli, make_file)
    conn = _raw(home_dir)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE audit_log SET actor = 'someone else' WHERE id = 2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM audit_log WHERE id = 6")
    conn.close()
    assert len(_log(cli)) == 6
    cli("log", "--verify")


def _verify_fails_at(cli, entry_id: int) -> str:
    result = cli("log", "--verify", code=3)
    assert f"broken at entry {entry_id}:" in result.stderr, result.stderr
    report = json.loads(cli("log", "--verify", "--json", code=3).stdout)
    assert report["intact"] is False and report["first_bad_id"] == entry_id
    return result.stderr


def test_verify_names_a_changed_row(cli, make_file, home_dir):
    _some_changes(cli, make_file)
    cli("log", "--verify")
    conn = _raw(home_dir)
    _drop_triggers(conn)
    conn.execute(
        "UPDATE audit_log SET detail = replace(detail, '7.2', '7.9') WHERE action = 'policy.set'"
        " AND id = 5"
    )
    conn.close()
    assert "was changed" in _verify_fails_at(cli, 5)
    check = cli("check", "--json", code=3)
    findings = json.loads(check.stdout)["findings"]
    [finding] = [f for f in findings if f["kind"] == "audit-log"]
    assert finding["detail"].startswith("entry 5:")
    # dropping the log's triggers is itself found, by the schema check
    missing = sorted(f["detail"] for f in findings if f["kind"] == "schema")
    assert missing == [
        "trigger 'audit_log_no_delete' is missing",
        "trigger 'audit_log_no_update' is missing",
    ]


def test_verify_names_a_row_whose_hash_was_recomputed_by_its_successor(cli, make_file, home_dir):
    _some_changes(cli, make_file)
    conn = _raw(home_dir)
    _drop_triggers(conn)
    id_, time_, action, type_, detail, prev = conn.execute(
        "SELECT id, time, action, type, detail, prev FROM audit_log WHERE id = 3"
    ).fetchone()
    forged = hashlib.sha256(
        audit.canonical(id_, time_, "mallory", action, type_, json.loads(detail), prev)
    ).hexdigest()
    conn.execute("UPDATE audit_log SET actor = 'mallory', sha256 = ? WHERE id = 3", (forged,))
    conn.close()
    _verify_fails_at(cli, 4)


def test_verify_names_a_row_made_unreadable(cli, make_file, home_dir):
    _some_changes(cli, make_file)
    conn = _raw(home_dir)
    _drop_triggers(conn)
    conn.execute("UPDATE audit_log SET actor = CAST(x'ff' AS TEXT) WHERE id = 2")
    conn.close()
    assert "not UTF-8" in _verify_fails_at(cli, 2)


def test_verify_names_a_removed_row(cli, make_file, home_dir):
    _some_changes(cli, make_file)
    conn = _raw(home_dir)
    _drop_triggers(conn)
    conn.execute("DELETE FROM audit_log WHERE id = 3")
    conn.close()
    assert "entry 3 is missing" in _verify_fails_at(cli, 3)


def test_verify_names_an_inserted_row(cli, make_file, home_dir):
    _some_changes(cli, make_file)
    conn = _raw(home_dir)
    _drop_triggers(conn)
    # Make room after entry 2 and slip in a well-formed entry 3 chained to it.
    for id_ in range(6, 2, -1):
        conn.execute("UPDATE audit_log SET id = id + 1 WHERE id = ?", (id_,))
    prev = conn.execute("SELECT sha256 FROM audit_log WHERE id = 2").fetchone()[0]
    content = audit.canonical(3, "2026-01-01T00:00:00Z", "mallory", "window.clear", None, {}, prev)
    conn.execute(
        "INSERT INTO audit_log (id, time, actor, action, type, detail, prev, sha256)"
        " VALUES (3, '2026-01-01T00:00:00Z', 'mallory', 'window.clear', NULL, '{}', ?, ?)",
        (prev, hashlib.sha256(content).hexdigest()),
    )
    conn.close()
    _verify_fails_at(cli, 4)  # the first genuine entry after the forgery no longer fits


def test_a_log_cut_short_shows_in_the_newest_sha256(cli, make_file, home_dir):
    _some_changes(cli, make_file)
    kept = cli("log", "--verify").stdout.strip()
    assert kept == _log(cli)[0]["sha256"] and re.fullmatch(r"[0-9a-f]{64}", kept)
    conn = _raw(home_dir)
    _drop_triggers(conn)
    conn.execute("DELETE FROM audit_log WHERE id >= 5")
    conn.close()
    # The chain that is left is whole; only the kept hash tells what is gone.
    now = cli("log", "--verify")
    assert now.stdout.strip() != kept
    assert "4 entries" in now.stderr


def test_backup_and_restore_keep_the_chain(cli, make_file, tmp_path, monkeypatch):
    _some_changes(cli, make_file)
    before = _log(cli)
    cli("backup", tmp_path / "b")
    other = tmp_path / "restored"
    monkeypatch.setenv("DYNUPDATE_HOME", str(other))
    cli("restore", tmp_path / "b")
    after = _log(cli)
    assert after[1:] == before
    assert after[0]["action"] == "restore" and after[0]["type"] is None
    assert after[0]["id"] == len(before) + 1 and after[0]["prev"] == before[0]["sha256"]
    assert after[0]["detail"]["source"] == str(tmp_path / "b")
    cli("log", "--verify")
    assert cli.json("check")["clean"] is True
    # A refused restore (no --force) appends nothing.
    cli("restore", tmp_path / "b", code=1)
    assert len(_log(cli)) == len(after)


def test_append_needs_the_changes_transaction(home):
    with pytest.raises(RuntimeError, match="transaction"):
        audit.append(home.db, "ada", audit.Action.WINDOW_CLEAR, None, {})
    with write(home.db):
        entry = audit.append(home.db, audit.SERVER, audit.Action.ROLLOUT_HALTED, "Trio", {"n": 1})
    assert entry.id == 1 and entry.prev == audit.ZERO and entry.actor == "server"
    assert [e.action for e in audit.list_entries(home.db)] == ["rollout.halted"]
    with pytest.raises(ValueError), write(home.db):
        audit.append(home.db, "ada", "package.ad", None, {})  # type: ignore[arg-type]
    assert audit.verify(home.db).entries == 1


def test_a_rolled_back_change_leaves_no_entry(home):
    with pytest.raises(RuntimeError), write(home.db):
        audit.append(home.db, "ada", audit.Action.WINDOW_CLEAR, None, {})
        raise RuntimeError("the change failed after its entry")
    assert audit.list_entries(home.db) == []


def test_canonical_content_is_sorted_compact_json(home):
    with write(home.db):
        entry = audit.append(home.db, "ada", audit.Action.TRIAL_ADD, None, {"b": "é", "a": [1]})
    expected = (
        '{"action":"trial.add","actor":"ada","detail":{"a":[1],"b":"é"},"id":1,'
        f'"prev":"{audit.ZERO}","time":"{entry.time}","type":null}}'
    )
    assert entry.sha256 == hashlib.sha256(expected.encode()).hexdigest()


def test_doctests():
    import doctest

    assert doctest.testmod(audit).failed == 0


def test_restoring_a_backup_from_before_the_audit_log_starts_its_chain(
    cli, make_file, tmp_path, monkeypatch
):
    cli("package", "add", make_file(b"old"), "--type", "Trio", "--version", "7.1")
    cli("backup", tmp_path / "b")
    # The backup's database as dynupdate wrote it before the audit log (migration
    # 0003): the same package, in a database migrated that far and no further.
    path = tmp_path / "b" / DB_NAME
    rows = sqlite3.connect(path).execute(
        "SELECT type, type_key, version, name, size, sha256, description, uploaded FROM packages"
    ).fetchall()
    path.unlink()
    old = connect(path)
    migrations.apply(old, stop_before="0003_audit_log")
    old.conn.executemany(
        "INSERT INTO packages (type, type_key, version, name, size, sha256, description,"
        " uploaded) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    old.conn.commit()
    old.close()
    # ... as written before backups recorded their database's SHA-256
    manifest_path = tmp_path / "b" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    del manifest["database_sha256"]
    manifest_path.write_text(json.dumps(manifest))
    monkeypatch.setenv("DYNUPDATE_HOME", str(tmp_path / "restored"))
    cli("restore", tmp_path / "b")
    [entry] = _log(cli)
    assert entry["action"] == "restore" and entry["id"] == 1 and entry["prev"] == audit.ZERO
    cli("log", "--verify")
    assert [p["version"] for p in cli.json("package", "list")] == ["7.1"]
