"""restore takes only a backup as dynupdate wrote it, and lands all of it or nothing."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from dynupdate.core import backup as backup_module
from dynupdate.core.backup import MANIFEST
from dynupdate.core.db import DB_NAME
from dynupdate.server import tls

POLICIES_TRIGGER = (
    "CREATE TRIGGER keep_old AFTER UPDATE ON policies "
    "BEGIN UPDATE policies SET version_to_use = '1.0' WHERE type_key = NEW.type_key; END"
)


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its content: the state a refusal must not change."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "serve.lock"
    }


@pytest.fixture
def backed_up(cli, make_file, tmp_path: Path, home_dir: Path) -> Path:
    """A backup of a home with two packages, a policy and its TLS material."""
    tls.ensure_self_signed(home_dir)
    cli("package", "add", make_file(b"pkg-1.0"), "--type", "Trio", "--version", "1.0")
    cli("package", "add", make_file(b"pkg-2.0"), "--type", "Trio", "--version", "2.0")
    cli("policy", "set", "Trio", "--version", "1.0")
    dest = tmp_path / "backup"
    cli("backup", dest)
    return dest


@pytest.fixture
def other_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A second home, with its own database and one package, that restores write into."""
    home = tmp_path / "other"
    monkeypatch.setenv("DYNUPDATE_HOME", str(home))
    return home


def edit_database(backup: Path, *statements: str) -> None:
    """Change the backup's database the way someone with write access to it could."""
    conn = sqlite3.connect(backup / DB_NAME)
    try:
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()
    manifest = json.loads((backup / MANIFEST).read_text())
    manifest["database_sha256"] = hashlib.sha256((backup / DB_NAME).read_bytes()).hexdigest()
    (backup / MANIFEST).write_text(json.dumps(manifest))


def test_restore_round_trip_needs_no_side_files(cli, backed_up, other_home):
    # As an admin may look into a backup: read-only, which leaves a WAL database's
    # -wal and -shm files behind (and restore refuses those).
    look = sqlite3.connect(f"file:{backed_up / DB_NAME}?mode=ro", uri=True)
    assert look.execute("SELECT count(*) FROM packages").fetchone() == (2,)
    look.close()
    assert sorted(p.name for p in backed_up.iterdir()) == [
        MANIFEST,
        DB_NAME,
        "packages",
        "tls",
    ], "a backup is one database file: no -wal or -shm beside it"
    cli("restore", backed_up)
    assert cli.json("policy", "show", "Trio")["version_to_use"] == "1.0"
    assert cli.json("check")["clean"] is True


@pytest.mark.parametrize(
    ("statement", "named"),
    [
        (POLICIES_TRIGGER, "trigger 'keep_old'"),
        ("CREATE VIEW every_policy AS SELECT * FROM policies", "view 'every_policy'"),
        ("CREATE INDEX by_version ON policies (version_to_use)", "index 'by_version'"),
        ("CREATE TABLE notes (text TEXT)", "table 'notes'"),
    ],
)
def test_restore_refuses_an_object_the_migrations_do_not_create(
    cli, backed_up, other_home, statement, named
):
    edit_database(backed_up, statement)
    error = cli("restore", backed_up, code=1).stderr
    assert named in error and "not created by dynupdate's migrations" in error
    assert not other_home.joinpath(DB_NAME).exists()
    assert tree(other_home / "packages") == {}, "no package file lands for a refused backup"


def test_restore_refuses_an_altered_object(cli, backed_up, other_home):
    """Same name, other body: a generation trigger that no longer counts changes."""
    edit_database(
        backed_up,
        "DROP TRIGGER policies_update_generation",
        "CREATE TRIGGER policies_update_generation AFTER UPDATE ON policies BEGIN SELECT 1; END",
    )
    error = cli("restore", backed_up, code=1).stderr
    assert "trigger 'policies_update_generation' differs" in error


def test_restore_refuses_a_database_of_a_newer_version(cli, backed_up, other_home):
    edit_database(
        backed_up,
        "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
        "VALUES ('dynupdate', '0099_from_the_future', '2030-01-01')",
    )
    error = cli("restore", backed_up, code=1).stderr
    assert "'0099_from_the_future' is unknown to dynupdate" in error
    assert not other_home.joinpath(DB_NAME).exists()


def test_restore_over_a_home_refuses_and_leaves_it_as_it_was(cli, backed_up, other_home, make_file):
    cli("package", "add", make_file(b"other"), "--type", "Trio", "--version", "9.0")
    before = tree(other_home)
    edit_database(backed_up, POLICIES_TRIGGER)
    assert "keep_old" in cli("restore", backed_up, "--force", code=1).stderr
    assert tree(other_home) == before


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
def test_restore_refuses_side_files_beside_the_database(cli, backed_up, other_home, suffix):
    (backed_up / (DB_NAME + suffix)).write_bytes(b"")
    error = cli("restore", backed_up, code=1).stderr
    assert f"{DB_NAME}{suffix}" in error
    assert not other_home.exists()


def test_restore_hashes_package_files_while_copying(cli, backed_up, other_home, make_file):
    """A file whose bytes are not its hash is refused, and what was staged before it is removed.

    The restore hashes what it copies, not a file read earlier: a backup that
    changes between a verification and the copy is the same as this one.
    """
    cli("package", "add", make_file(b"other"), "--type", "Trio", "--version", "9.0")
    before = tree(other_home)
    files = sorted(p for p in (backed_up / "packages").rglob("*") if p.is_file())
    assert len(files) == 2
    files[-1].write_bytes(b"pkg-2.1")  # the last one copied: the first is staged by then
    error = cli("restore", backed_up, "--force", code=1).stderr
    assert f"'{files[-1]}' is missing or damaged" in error
    assert tree(other_home) == before, "no package file, temp file or staged database remains"
    assert [p["version"] for p in cli.json("package", "list")] == ["9.0"]


def test_restore_checks_the_database_against_its_manifest(cli, backed_up, other_home):
    conn = sqlite3.connect(backed_up / DB_NAME)
    conn.execute("UPDATE policies SET version_to_use = '2.0'")
    conn.commit()
    conn.close()
    error = cli("restore", backed_up, code=1).stderr
    assert "does not match its manifest" in error
    assert not other_home.joinpath(DB_NAME).exists()


def test_restore_stages_the_database_private_from_the_start(
    cli, backed_up, other_home, monkeypatch
):
    """The copy is created 0600, not copied and then chmodded: never readable by others."""
    seen = []
    verify = backup_module._verified_rows

    def spy(path: Path, source: Path):
        seen.append(stat.S_IMODE(path.stat().st_mode))
        return verify(path, source)

    monkeypatch.setattr(backup_module, "_verified_rows", spy)
    old = os.umask(0)  # what a file is created with, unmasked
    try:
        cli("restore", backed_up)
    finally:
        os.umask(old)
    assert seen == [0o600]
    assert stat.S_IMODE((other_home / DB_NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE((other_home / "tls" / "server.key").stat().st_mode) == 0o600
