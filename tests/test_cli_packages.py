"""package add/list/show/remove through the CLI, on a real home."""

from __future__ import annotations

import hashlib
import os

import pytest

from dynupdate.cli import app
from dynupdate.core.errors import NotFound
from dynupdate.core.store import is_sha256


def test_add_list_show(cli, make_file, home_dir):
    f = make_file(b"x" * 1000, name="gs-6.2.2.pup")
    added = cli.json(
        "package",
        "add",
        f,
        "--type",
        "GroupSeries",
        "--version",
        "6.2.2.0-100",
        "--description",
        "Fall release",
    )
    digest = hashlib.sha256(b"x" * 1000).hexdigest()
    assert added["sha256"] == digest
    assert added["size"] == 1000 and isinstance(added["size"], int)
    assert added["name"] == "gs-6.2.2.pup"
    listed = cli.json("package", "list")
    assert [(p["type"], p["version"], p["sha256"]) for p in listed] == [
        ("GroupSeries", "6.2.2.0-100", digest)
    ]
    shown = cli.json("package", "show", "groupseries", "6.2.2.0-100")
    assert shown["sha256"] == digest and shown["description"] == "Fall release"
    assert (home_dir / "packages" / digest[:2] / digest).read_bytes() == b"x" * 1000


def test_list_is_empty_array_and_filters_by_type(cli, make_file):
    assert cli.json("package", "list") == []
    cli("package", "add", make_file(b"a"), "--type", "Trio", "--version", "7.0.0")
    cli("package", "add", make_file(b"b"), "--type", "Trio", "--version", "7.10.0")
    cli("package", "add", make_file(b"c"), "--type", "Trio", "--version", "7.2.0")
    cli("package", "add", make_file(b"d"), "--type", "EagleEyeIV", "--version", "1.4.0")
    trio = cli.json("package", "list", "--type", "TRIO")
    assert [p["version"] for p in trio] == ["7.0.0", "7.2.0", "7.10.0"]
    assert len(cli.json("package", "list")) == 4


def test_identical_file_again_is_a_noop(cli, make_file):
    f = make_file(b"same")
    cli("package", "add", f, "--type", "Trio", "--version", "7.0")
    again = cli("package", "add", f, "--type", "Trio", "--version", "7.0.0")
    assert "Already present" in again.stderr
    assert len(cli.json("package", "list")) == 1


def test_different_file_for_existing_version_is_refused(cli, make_file, home_dir):
    cli("package", "add", make_file(b"one"), "--type", "Trio", "--version", "7.0")
    result = cli("package", "add", make_file(b"two"), "--type", "Trio", "--version", "7.0", code=1)
    assert "Trio 7.0 already exists with another file" in result.stderr
    assert "Traceback" not in result.output
    stored = [p for p in (home_dir / "packages").rglob("*") if p.is_file()]
    assert len(stored) == 1, "the refused file must not stay in the store"


def test_same_bytes_for_two_entries_stored_once(cli, make_file, home_dir):
    f = make_file(b"shared")
    cli("package", "add", f, "--type", "Trio", "--version", "7.0")
    cli("package", "add", f, "--type", "TrioC60", "--version", "7.0")
    stored = [p for p in (home_dir / "packages").rglob("*") if p.is_file()]
    assert len(stored) == 1
    cli("package", "remove", "Trio", "7.0")
    assert stored[0].exists(), "still referenced by TrioC60"
    cli("package", "remove", "TrioC60", "7.0")
    assert not stored[0].exists()


def test_remove_refused_while_policy_needs_it(cli, make_file):
    cli("package", "add", make_file(b"a"), "--type", "Trio", "--version", "7.0")
    cli("package", "add", make_file(b"b"), "--type", "Trio", "--version", "7.1")
    cli("package", "add", make_file(b"c"), "--type", "Trio", "--version", "6.9")
    cli("policy", "set", "Trio", "--version", "7.0", "--allow-newer")
    for needed in ("7.0", "7.1"):  # version to use, and the current target
        result = cli("package", "remove", "Trio", needed, code=1)
        assert "needed by the Trio policy" in result.stderr
    cli("package", "remove", "Trio", "6.9")
    assert [p["version"] for p in cli.json("package", "list")] == ["7.0", "7.1"]


def test_show_and_remove_unknown_package(cli):
    for command in ("show", "remove"):
        result = cli("package", command, "Trio", "9.9", code=1)
        assert "No package Trio 9.9" in result.stderr


def test_bad_inputs_are_one_line_errors(cli, home, make_file, tmp_path):
    f = make_file(b"x")
    cases = [
        (
            ["package", "add", tmp_path / "missing.bin", "--type", "Trio", "--version", "1"],
            "missing.bin",
        ),
        (["package", "add", tmp_path, "--type", "Trio", "--version", "1"], "directory"),
        (["package", "add", f, "--type", "Bad Type", "--version", "1"], "'Bad Type'"),
        (["package", "add", f, "--type", "Trio", "--version", "1 2"], "'1 2'"),
        (["package", "add", f, "--type", "Trio", "--version", ""], "Invalid version"),
        (["package", "add", f, "--type", "", "--version", "1"], "Invalid device type"),
        (
            ["package", "add", f, "--type", "Trio", "--version", "1", "--description", "a\nb"],
            "description",
        ),
    ]
    for args, expected in cases:
        result = cli(*args, code=1)
        assert expected in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stdout == ""
    assert cli.json("package", "list") == []


def test_usage_error_exits_2(cli, make_file):
    cli("package", "add", make_file(b"x"), "--version", "1", code=2)
    cli("package", "frobnicate", code=2)


def test_quiet_suppresses_confirmation(cli, home, make_file):
    result = cli("--quiet", "package", "add", make_file(b"q"), "--type", "Trio", "--version", "1")
    assert result.stderr == "" and result.stdout == ""


def test_large_file_streams_in_chunks(cli, tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(5 * (1 << 20) + 123)  # sparse: 5 MiB of zeros
    added = cli.json("package", "add", big, "--type", "Trio", "--version", "8.0")
    h = hashlib.sha256()
    with open(big, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    assert added["sha256"] == h.hexdigest()
    assert added["size"] == os.path.getsize(big)
    assert is_sha256(added["sha256"])


def test_debug_env_shows_traceback(cli, monkeypatch):
    monkeypatch.setenv("DYNUPDATE_DEBUG", "1")
    with pytest.raises(NotFound):
        cli.runner.invoke(app, ["package", "show", "Trio", "1"], catch_exceptions=False)
