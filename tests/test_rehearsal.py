"""Dry runs of policy and window changes: what they would do, with nothing changed."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from dynupdate.core.errors import InvalidInput
from dynupdate.core.fleet import current_generation
from dynupdate.core.packages import add_package
from dynupdate.core.policies import get_policy, set_policy
from dynupdate.core.registry import Sighting, record_polls
from dynupdate.core.rehearsal import rehearse_policy, rehearse_window
from dynupdate.core.windows import make_window

NOW = datetime(2026, 11, 27, 16, 0, tzinfo=UTC)  # a Friday, 16:00 UTC


@pytest.fixture
def fleet(home, make_file):
    """GroupSeries 2.0 and 3.0 uploaded; seven devices seen at their last poll."""
    for version in ("2.0", "3.0"):
        add_package(home.db, home.store, make_file(f"gs {version}"), "GroupSeries", version)
    add_package(home.db, home.store, make_file("cam"), "EagleEye", "2.0")
    devices = [
        Sighting("A1", "GroupSeries", "1.0", tz="Europe/Berlin"),
        Sighting("A2", "GroupSeries", "1.0", tz="America/New_York"),
        Sighting("A3", "GroupSeries", "1.0", in_call=True),
        Sighting("B1", "GroupSeries", "2.0"),
        Sighting("B2", "groupseries", "2.0.0"),
        Sighting("C1", "GroupSeries", "3.0"),
        Sighting("A1-CAM", "EagleEye", "1.0", parent_serial="A1"),
    ]
    record_polls(home.db, [(s, NOW) for s in devices])
    return home


def groups(rehearsal) -> dict:
    return {(g.type.lower(), g.version): g.to_dict() for g in rehearsal.groups}


def test_policy_dry_run_counts_offers_by_current_version(fleet):
    generation = current_generation(fleet.db)
    rehearsal = rehearse_policy(fleet.db, "GroupSeries", "2.0", now=NOW)
    got = groups(rehearsal)
    assert got[("groupseries", "1.0")] | {"type": None} == {
        "type": None,
        "version": "1.0",
        "devices": 3,
        "offered_version": "2.0",
        "offered_version_before": None,
        "offered_now": 2,
        "offered_at_next_opening": 0,
        "in_call": 1,
        "up_to_date": 0,
    }
    assert got[("groupseries", "3.0")]["offered_version"] == "2.0", "exact: a downgrade too"
    assert got[("groupseries", "2.0")]["up_to_date"] == 1
    assert got[("groupseries", "2.0.0")]["up_to_date"] == 1, "versions are kept as spelled"
    assert rehearsal.totals() == {
        "devices": 6,
        "offered_now": 3,
        "offered_at_next_opening": 0,
        "in_call": 1,
        "up_to_date": 2,
        "no_policy": 0,
        "changed": 3,  # A1, A2, C1: A3's next poll, in a call, gets nothing either way
    }
    assert rehearsal.change == {
        "kind": "policy",
        "type": "GroupSeries",
        "version_to_use": "2.0",
        "allow_newer": False,
        "target_version": "2.0",
    }
    assert current_generation(fleet.db) == generation, "nothing was written"
    assert not get_policy(fleet.db, "GroupSeries").active


def test_allow_newer_targets_the_newest_and_never_downgrades(fleet):
    rehearsal = rehearse_policy(fleet.db, "groupseries", "2.0", allow_newer=True, now=NOW)
    got = groups(rehearsal)
    assert got[("groupseries", "1.0")]["offered_version"] == "3.0"
    assert got[("groupseries", "2.0")]["offered_version"] == "3.0"
    assert got[("groupseries", "3.0")]["offered_version"] is None
    assert rehearsal.change["target_version"] == "3.0"


def test_a_change_against_the_current_policy(fleet):
    set_policy(fleet.db, "GroupSeries", "3.0", allow_newer=True)
    rehearsal = rehearse_policy(fleet.db, "GroupSeries", "2.0", now=NOW)  # keeps allow-newer
    got = groups(rehearsal)
    assert rehearsal.change["allow_newer"] is True
    assert got[("groupseries", "1.0")]["offered_version_before"] == "3.0"
    assert got[("groupseries", "1.0")]["offered_version"] == "3.0"
    assert rehearsal.totals()["changed"] == 0, "2.0 or newer is still 3.0"
    exact = rehearse_policy(fleet.db, "GroupSeries", "2.0", allow_newer=False, now=NOW)
    assert exact.totals()["changed"] == 5  # all but A3, in a call


def test_outside_the_window_devices_wait_for_the_next_opening(fleet):
    from dynupdate.core.maintenance import save_window

    save_window(fleet.db, make_window(None, "22:00", "2h", "UTC"))
    rehearsal = rehearse_policy(fleet.db, "GroupSeries", "2.0", now=NOW)
    totals = rehearsal.totals()
    assert (totals["offered_now"], totals["offered_at_next_opening"]) == (0, 3)
    assert totals["in_call"] == 1
    assert rehearsal.next_opening == datetime(2026, 11, 27, 22, 0, tzinfo=UTC)
    assert rehearsal.to_dict()["next_opening"] == "2026-11-27T22:00:00Z"


def test_window_dry_run_on_endpoint_clocks(fleet):
    set_policy(fleet.db, "GroupSeries", "3.0")
    # 16:00 UTC is 17:00 in Berlin, 11:00 in New York; UTC for devices without a zone.
    window = make_window(None, "16:30", "1h", "endpoint")
    rehearsal = rehearse_window(fleet.db, window, now=NOW)
    got = groups(rehearsal)
    assert got[("groupseries", "1.0")]["offered_now"] == 1  # A1, Berlin
    assert got[("groupseries", "1.0")]["offered_at_next_opening"] == 1  # A2, New York
    assert got[("groupseries", "2.0")]["offered_at_next_opening"] == 1  # UTC: opens 16:30
    assert rehearsal.next_opening == datetime(2026, 11, 27, 16, 30, tzinfo=UTC)
    assert rehearsal.no_policy == 1, "the camera's type has no policy"
    assert rehearsal.change == {"kind": "window", "window": window.to_dict()}
    assert rehearsal.totals()["changed"] == 3, "A2, B1, B2 wait for their opening now"
    data = rehearsal.to_dict()
    assert data["dry_run"] is True and data["window"]["tz"] == "endpoint"
    assert json.loads(json.dumps(data)) == data


def test_clearing_the_window_releases_everyone(fleet):
    from dynupdate.core.maintenance import save_window

    set_policy(fleet.db, "GroupSeries", "3.0")
    save_window(fleet.db, make_window(None, "22:00", "2h", "UTC"))
    rehearsal = rehearse_window(fleet.db, None, now=NOW)
    assert rehearsal.totals()["offered_now"] == 4 and rehearsal.next_opening is None
    assert rehearsal.totals()["changed"] == 4


def test_unknown_version_is_refused_like_policy_set(fleet):
    with pytest.raises(InvalidInput) as dry:
        rehearse_policy(fleet.db, "GroupSeries", "9.9")
    with pytest.raises(InvalidInput) as real:
        set_policy(fleet.db, "GroupSeries", "9.9")
    assert str(dry.value) == str(real.value)
    with pytest.raises(InvalidInput, match="Invalid device type"):
        rehearse_policy(fleet.db, "Group Series", "2.0")


def test_no_endpoints_yet(home, make_file):
    add_package(home.db, home.store, make_file("x"), "Trio", "7.0")
    rehearsal = rehearse_policy(home.db, "Trio", "7.0", now=NOW)
    assert rehearsal.groups == () and rehearsal.totals()["devices"] == 0


# -- the commands (dynupdate policy set / window set --dry-run) ------------------------------


def test_policy_set_dry_run_changes_nothing(cli, fleet):
    data = cli.json("policy", "set", "GroupSeries", "--version", "2.0", "--dry-run")
    assert data["dry_run"] is True and data["totals"]["in_call"] == 1
    assert {(g["version"], g["offered_version"]) for g in data["groups"]} >= {("1.0", "2.0")}
    assert cli.json("policy", "show", "GroupSeries")["active"] is False
    text = cli("policy", "set", "GroupSeries", "--version", "2.0", "--dry-run")
    assert "Dry run" in text.stdout and "in a call" in text.stderr
    cli("policy", "set", "GroupSeries", "--version", "9", "--dry-run", code=1)


def test_window_set_dry_run_changes_nothing(cli, fleet):
    cli("policy", "set", "GroupSeries", "--version", "3.0")
    data = cli.json("window", "set", "--start", "22:00", "--duration", "1h", "--dry-run")
    assert data["change"]["window"]["start"] == "22:00"
    assert data["totals"]["offered_now"] + data["totals"]["offered_at_next_opening"] == 4
    assert cli.json("window", "show")["set"] is False
