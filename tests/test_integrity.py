"""dynupdate check, backup and restore."""

from __future__ import annotations

import json
import os
import sqlite3
import stat

from dynupdate.core.db import DB_NAME


def stored(home_dir, content: bytes):
    import hashlib

    sha = hashlib.sha256(content).hexdigest()
    return home_dir / "packages" / sha[:2] / sha


def test_clean_home_exits_0(cli, make_file):
    cli("package", "add", make_file(b"one"), "--type", "Trio", "--version", "1")
    report = cli.json("check")
    assert report["clean"] is True and report["findings"] == []
    assert report["files_hashed"] == 1


def test_corrupt_missing_orphan_and_temp_are_found(cli, make_file, home_dir):
    cli("package", "add", make_file(b"good"), "--type", "Trio", "--version", "1")
    cli("package", "add", make_file(b"tampered"), "--type", "Trio", "--version", "2")
    cli("package", "add", make_file(b"lost"), "--type", "Trio", "--version", "3")
    stored(home_dir, b"tampered").write_bytes(b"TAMPERED")
    stored(home_dir, b"lost").unlink()
    orphan = home_dir / "packages" / ("ab" * 32)[:2] / ("ab" * 32)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"nobody's")
    temp = home_dir / "packages" / ".tmp" / "dead.part"
    temp.write_bytes(b"half")
    result = cli("check", "--json", code=3)
    assert not temp.exists(), "every start removes the temp files of killed imports"
    kinds = sorted(f["kind"] for f in json.loads(result.stdout)["findings"])
    assert kinds == ["missing-file", "orphan-file", "wrong-sha256"]
    result = cli("check", "--repair", "--json", code=3)  # tampered and lost still need an admin
    findings = json.loads(result.stdout)["findings"]
    assert {f["kind"]: f["repaired"] for f in findings} == {
        "missing-file": False,
        "wrong-sha256": False,
        "orphan-file": True,
    }
    assert not orphan.exists()
    assert stored(home_dir, b"good").exists(), "a package's file is never removed"
    cli("package", "remove", "Trio", "2")
    cli("package", "remove", "Trio", "3")
    assert cli.json("check")["clean"] is True


def test_quick_check_skips_hashing(cli, make_file, home_dir):
    cli("package", "add", make_file(b"same-size"), "--type", "Trio", "--version", "1")
    stored(home_dir, b"same-size").write_bytes(b"SAME-SIZE")
    assert cli.json("check", "--quick")["clean"] is True
    cli("check", code=3)


def test_backup_and_restore_round_trip(cli, make_file, tmp_path, home_dir, monkeypatch):
    cli("package", "add", make_file(b"pkg-a"), "--type", "Trio", "--version", "1.0")
    cli("policy", "set", "Trio", "--version", "1.0")
    dest = tmp_path / "backup"
    manifest = cli.json("backup", dest)
    assert manifest["packages"] == 1
    assert stat.S_IMODE((dest / DB_NAME).stat().st_mode) == 0o600
    assert sqlite3.connect(dest / DB_NAME).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # The backup folder must be new or empty.
    assert "not empty" in cli("backup", dest, code=1).stderr
    other = tmp_path / "restored"
    monkeypatch.setenv("DYNUPDATE_HOME", str(other))
    cli("restore", dest)
    assert cli.json("policy", "show", "Trio")["version_to_use"] == "1.0"
    assert cli.json("check")["clean"] is True
    assert "--force" in cli("restore", dest, code=1).stderr
    cli("restore", dest, "--force")


def test_restore_refuses_damaged_backup(cli, make_file, tmp_path, monkeypatch):
    cli("package", "add", make_file(b"pkg-b"), "--type", "Trio", "--version", "1.0")
    dest = tmp_path / "backup"
    cli("backup", dest)
    for path in (dest / "packages").rglob("*"):
        if path.is_file():
            path.write_bytes(b"rot")
    monkeypatch.setenv("DYNUPDATE_HOME", str(tmp_path / "new"))
    assert "missing or damaged" in cli("restore", dest, code=1).stderr
    assert not (tmp_path / "new" / DB_NAME).exists()
    assert "not a dynupdate backup" in cli("restore", tmp_path, code=1).stderr


def test_backup_while_server_writes(cli, make_file, tmp_path, home):
    """The backup API copies a consistent snapshot while another connection writes."""
    import threading

    from dynupdate.core.registry import Sighting, record_polls
    from dynupdate.core.times import utc_now

    stop = threading.Event()

    def writer():
        n = 0
        while not stop.is_set():
            record_polls(home.db, [(Sighting(f"S{n}", "Trio", "1"), utc_now())])
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        manifest = cli.json("backup", tmp_path / "b")
    finally:
        stop.set()
        thread.join()
    copy = sqlite3.connect(tmp_path / "b" / DB_NAME)
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert copy.execute("SELECT count(*) FROM endpoints").fetchone()[0] == manifest["endpoints"]
    assert os.path.exists(tmp_path / "b" / "dynupdate-backup.json")


def test_check_finds_a_trigger_added_to_a_live_home(cli, home_dir):
    cli("policy", "list")  # creates the home
    conn = sqlite3.connect(home_dir / DB_NAME)
    conn.execute(
        "CREATE TRIGGER keep_old AFTER UPDATE ON policies "
        "BEGIN UPDATE policies SET version_to_use = '1.0' WHERE type_key = NEW.type_key; END"
    )
    conn.close()
    result = cli("check", "--json", code=3)
    findings = json.loads(result.stdout)["findings"]
    assert [(f["kind"], f["repairable"]) for f in findings] == [("schema", False)]
    assert "trigger 'keep_old'" in findings[0]["detail"]
