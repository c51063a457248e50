"""Consistency for scripts (issue 13, point 3): --type everywhere, new types, new homes, root.

Through the CLI on temp homes; root's default home by faking the uid check
(``dynupdate.core.home._running_as_root``), never by touching /var/lib.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import platformdirs
import pytest
from typer.testing import CliRunner

from dynupdate.cli import app
from dynupdate.core import home as home_module
from dynupdate.core.home import SYSTEM_HOME, default_home
from dynupdate.core.registry import Sighting, record_polls
from dynupdate.core.times import utc_now


@pytest.fixture
def fleet(home, make_file, cli):
    cli("--quiet", "package", "add", make_file(b"gs"), "--type", "GroupSeries", "--version", "6.2")
    cli("--quiet", "package", "add", make_file(b"trio"), "--type", "Trio", "--version", "7.1")
    record_polls(
        home.db,
        [
            (Sighting("GS1", "GroupSeries", "6.1"), utc_now()),
            (Sighting("CAM1", "EagleEyeIV", "1.0", parent_serial="GS1"), utc_now()),
        ],
    )


# --- overview --type ---------------------------------------------------------------------


def test_overview_type_is_one_row_in_any_case(cli, fleet):
    assert [row["type"] for row in cli.json("overview")] == ["EagleEyeIV", "GroupSeries", "Trio"]
    [row] = cli.json("overview", "--type", "groupseries")
    assert row["type"] == "GroupSeries" and row["endpoints"] == 1
    result = cli("overview", "--type", "Trio")
    assert "Trio" in result.stdout and "GroupSeries" not in result.stdout


def test_overview_type_nobody_has_warns_and_is_empty(cli, fleet):
    result = cli("overview", "--type", "GroupSeris", "--json")
    assert json.loads(result.stdout) == []
    assert result.stderr == (
        "Warning: no package, policy or device has the type GroupSeris; did you mean GroupSeries?\n"
    )
    result = cli("overview", "--type", "Trio", "--json")  # a package, no device yet
    assert json.loads(result.stdout)[0]["endpoints"] == 0
    assert result.stderr == "Warning: no device of type Trio has polled yet.\n"


# --- endpoint list --type ----------------------------------------------------------------


def test_endpoint_list_of_a_type_nobody_has_warns(cli, fleet):
    result = cli("endpoint", "list", "--type", "Tiro", "--json")
    assert result.stdout == "[]\n"
    assert result.stderr == (
        "Warning: no package, policy or device has the type Tiro; did you mean Trio?\n"
    )
    result = cli("endpoint", "list", "--type", "VVX")
    assert result.stderr.startswith("Warning: no package, policy or device has the type VVX.")
    assert "Known types: EagleEyeIV, GroupSeries, Trio." in result.stderr


def test_endpoint_list_warns_only_when_nobody_has_the_type(cli, fleet):
    result = cli("endpoint", "list", "--type", "eagleeyeiv", "--json")
    assert [e["serial"] for e in json.loads(result.stdout)] == ["CAM1"] and result.stderr == ""
    # Devices of the type exist; the status filter leaves none: no warning, the usual note.
    result = cli("endpoint", "list", "--type", "GroupSeries", "--status", "failed")
    assert result.stderr == "No endpoints match.\n"


def test_a_hostile_type_in_the_warning_is_shown_literally(cli, fleet):
    result = cli("endpoint", "list", "--type", "[red]x\x1b[0m")
    assert "[red]x\\x1b[0m" in result.stderr and "\x1b" not in result.stderr


# --- package add of a new type -----------------------------------------------------------


def test_package_add_of_a_new_type_names_the_closest_one(cli, fleet, make_file):
    result = cli("package", "add", make_file(b"typo"), "--type", "GroupSeris", "--version", "6.3")
    assert result.stderr.splitlines()[0] == "New device type GroupSeris — did you mean GroupSeries?"
    # Known now: the next version of it says nothing of the kind.
    result = cli("package", "add", make_file(b"typo2"), "--type", "GroupSeris", "--version", "6.4")
    assert "New device type" not in result.stderr


def test_package_add_of_a_known_type_in_another_case_is_not_new(cli, fleet, make_file):
    result = cli("package", "add", make_file(b"gs2"), "--type", "GROUPSERIES", "--version", "6.3")
    assert "New device type" not in result.stderr
    # A type only devices have is known too: the first package of it is no typo.
    result = cli("package", "add", make_file(b"cam"), "--type", "EagleEyeIV", "--version", "1.1")
    assert "New device type" not in result.stderr


def test_new_type_notices_quiet_and_json(cli, fleet, make_file):
    result = cli("--quiet", "package", "add", make_file(b"v"), "--type", "VVX", "--version", "6")
    assert result.stderr == "", "a new type nothing resembles is a confirmation: --quiet"
    result = cli("--quiet", "package", "add", make_file(b"t"), "--type", "Trio8",
                 "--version", "1", "--json")  # fmt: skip
    assert result.stderr == "New device type Trio8 — did you mean Trio?\n", "a warning stays"
    assert json.loads(result.stdout)["type"] == "Trio8"


def test_a_refused_package_add_says_nothing_of_a_new_type(cli, fleet, tmp_path):
    result = cli("package", "add", tmp_path / "missing.pup", "--type", "Trio9", "--version", "1",
                 code=1)  # fmt: skip
    assert "New device type" not in result.stderr


# --- a new home --------------------------------------------------------------------------


def test_a_new_home_is_announced_once_on_stderr(cli, home_dir):
    result = cli("--quiet", "package", "list", "--json")
    assert result.stdout == "[]\n", "stdout stays JSON"
    assert result.stderr == f"Created a new home at {home_dir}\n", "even with --quiet"
    result = cli("package", "list", "--json")
    assert (result.stdout, result.stderr) == ("[]\n", "")


def test_an_existing_empty_folder_becomes_a_new_home(cli, tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()  # as systemd's StateDirectory= makes it
    result = cli("--home", folder, "overview", "--json")
    assert result.stderr == f"Created a new home at {folder}\n"


def test_serve_announces_a_new_home(start_server, tmp_path):
    home = tmp_path / "fresh"
    server = start_server(home, "--no-access-log")
    assert f"Created a new home at {home}\n" in server.log


# --- root's default home -----------------------------------------------------------------


def test_root_without_a_home_uses_var_lib(monkeypatch):
    monkeypatch.delenv("DYNUPDATE_HOME")
    monkeypatch.setattr(home_module, "_running_as_root", lambda: True)
    assert default_home() == SYSTEM_HOME == Path("/var/lib/dynupdate")
    monkeypatch.setattr(home_module, "_running_as_root", lambda: False)
    assert default_home() == platformdirs.user_data_path("dynupdate", appauthor=False)


def test_root_with_dynupdate_home_keeps_it(monkeypatch, home_dir):
    monkeypatch.setattr(home_module, "_running_as_root", lambda: True)
    assert default_home() == home_dir


def test_root_cli_without_a_home_creates_the_system_home(monkeypatch, tmp_path):
    """The whole path, with the system home moved under tmp_path."""
    system = tmp_path / "var-lib-dynupdate"
    monkeypatch.delenv("DYNUPDATE_HOME")
    monkeypatch.setattr(home_module, "_running_as_root", lambda: True)
    monkeypatch.setattr(home_module, "SYSTEM_HOME", system)
    result = CliRunner().invoke(app, ["overview", "--json"])
    assert result.exit_code == 0, result.output
    assert result.stderr == f"Created a new home at {system}\n"
    assert (system / "dynupdate.db").is_file()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a folder to another user")
def test_root_is_refused_in_a_home_another_user_owns(monkeypatch, tmp_path):
    """What root wrote there (package files, the lock) the service's user could not read."""
    service_home = tmp_path / "service"
    service_home.mkdir(mode=0o700)
    os.chown(service_home, 4711, 4711)  # as StateDirectory= makes it for the service's user
    monkeypatch.setattr(home_module, "_running_as_root", lambda: True)
    result = CliRunner().invoke(app, ["--home", str(service_home), "overview", "--json"])
    assert result.exit_code == 1 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert f"The home '{service_home}' belongs to the user " in line
    assert "sudo -u " in line and "Traceback" not in line
    assert list(service_home.iterdir()) == [], "nothing written"
