"""policy set/disable/list/show and window set/show/clear through the CLI."""

from __future__ import annotations

import pytest


@pytest.fixture
def trio(cli, make_file):
    for i, version in enumerate(["7.0.0", "7.1.0", "7.2.0"]):
        cli("package", "add", make_file(f"trio{i}"), "--type", "Trio", "--version", version)


def test_policy_keys_and_types(cli, trio):
    shown = cli.json("policy", "set", "Trio", "--version", "7.1.0")
    assert shown == {
        "type": "Trio",
        "version_to_use": "7.1.0",
        "allow_newer": False,
        "active": True,
        "target_version": "7.1.0",
        "packages": 3,
    }
    assert cli.json("policy", "show", "trio") == shown
    assert cli.json("policy", "list") == [shown]


def test_allow_newer_targets_newest_and_follows_uploads(cli, trio, make_file):
    view = cli.json("policy", "set", "Trio", "--version", "7.1", "--allow-newer")
    assert view["version_to_use"] == "7.1.0", "stored as the package spells it"
    assert view["target_version"] == "7.2.0"
    cli("package", "add", make_file("new"), "--type", "Trio", "--version", "7.10.0")
    assert cli.json("policy", "show", "Trio")["target_version"] == "7.10.0"


def test_flag_is_kept_when_not_given_and_exact_switches_off(cli, trio):
    cli("policy", "set", "Trio", "--version", "7.0.0", "--allow-newer")
    assert cli.json("policy", "set", "Trio", "--version", "7.1.0")["allow_newer"] is True
    view = cli.json("policy", "set", "Trio", "--version", "7.1.0", "--exact")
    assert view["allow_newer"] is False and view["target_version"] == "7.1.0"


def test_disable_unsets_version(cli, trio):
    cli("policy", "set", "Trio", "--version", "7.0.0")
    cli("policy", "disable", "Trio")
    view = cli.json("policy", "show", "Trio")
    assert view["active"] is False and view["version_to_use"] is None
    assert view["target_version"] is None
    cli("policy", "disable", "Trio")  # idempotent
    cli("package", "remove", "Trio", "7.0.0")  # nothing needs it now


def test_type_without_policy_is_listed_inactive(cli, trio):
    [row] = cli.json("policy", "list")
    assert row["active"] is False and row["version_to_use"] is None


def test_version_must_name_an_uploaded_package(cli, trio):
    result = cli("policy", "set", "Trio", "--version", "9.0", code=1)
    assert "No package Trio 9.0" in result.stderr
    assert "7.0.0, 7.1.0, 7.2.0" in result.stderr
    assert cli.json("policy", "list")[0]["active"] is False


def test_unknown_type(cli):
    assert "No device type Nope" in cli("policy", "show", "Nope", code=1).stderr
    assert "No device type Nope" in cli("policy", "disable", "Nope", code=1).stderr
    assert "none uploaded" in cli("policy", "set", "Nope", "--version", "1", code=1).stderr


def test_window_set_show_clear(cli):
    empty = cli.json("window", "show")
    assert empty["days"] is None and empty["start"] is None and empty["tz"] is None
    assert empty["duration_minutes"] is None
    shown = cli.json(
        "window",
        "set",
        "--start",
        "22:00",
        "--duration",
        "1h30m",
        "--days",
        "mon-fri",
        "--tz",
        "Europe/Berlin",
    )
    assert shown["days"] == ["mon", "tue", "wed", "thu", "fri"]
    assert shown["start"] == "22:00" and shown["duration_minutes"] == 90
    assert shown["tz"] == "Europe/Berlin"
    assert shown["next_opening"]["start"].endswith("Z")
    assert cli.json("window", "show") | {"open_now": None} == shown | {"open_now": None}
    cli("window", "clear")
    assert cli.json("window", "show")["start"] is None


def test_window_defaults_every_day_utc(cli):
    shown = cli.json("window", "set", "--start", "02:00", "--duration", "4h")
    assert shown["days"] == ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    assert shown["tz"] == "UTC"
    assert (
        cli.json("window", "set", "--start", "2:00", "--duration", "90m", "--tz", "endpoint")["tz"]
        == "endpoint"
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--start", "25:00", "--duration", "1h"], "25:00"),
        (["--start", "22:00", "--duration", "4x"], "4x"),
        (["--start", "22:00", "--duration", "25h"], "25h"),
        (["--start", "22:00", "--duration", "0m"], "0m"),
        (["--start", "22:00", "--duration", "1h", "--days", "mon,funday"], "funday"),
        (["--start", "22:00", "--duration", "1h", "--tz", "Mars/Olympus"], "Mars/Olympus"),
        (["--start", "22:00", "--duration", "1h", "--tz", "../../etc/passwd"], "../../etc/passwd"),
    ],
)
def test_window_bad_values_named(cli, args, named):
    cli("window", "set", "--start", "01:00", "--duration", "1h")
    result = cli("window", "set", *args, code=1)
    assert named in result.stderr
    assert result.stderr.count("\n") == 1
    assert cli.json("window", "show")["start"] == "01:00", "unchanged after a refusal"


def test_every_command_has_help(cli):
    for group in ("package", "policy", "window"):
        out = cli(group, "--help").stdout
        assert "Usage" in out
