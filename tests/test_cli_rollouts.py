"""rollout, trial and endpoint retry through the CLI (SPEC sections 4 and 6)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dynupdate.core.home import open_home
from dynupdate.core.registry import Sighting, record_polls
from dynupdate.core.waves import bucket

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@pytest.fixture
def gs(cli, make_file):
    cli("package", "add", make_file(b"a"), "--type", "GroupSeries", "--version", "6.2.1")
    cli("policy", "set", "GroupSeries", "--version", "6.2.1")
    cli("package", "add", make_file(b"b"), "--type", "GroupSeries", "--version", "6.2.2")
    return cli


def register(home_dir, serials):
    home = open_home(home_dir)
    try:
        record_polls(
            home.db,
            [
                (Sighting(s, "GroupSeries", "6.2.1", None, None, None, False, "a", None, None), T0)
                for s in serials
            ],
        )
    finally:
        home.close()


def test_start_status_and_the_one_line_commands(gs):
    started = gs("rollout", "start", "GroupSeries", "--version", "6.2.2", "--soak", "2h")
    assert "wave 1 of 4 (1%) open" in started.stderr
    (status,) = gs.json("rollout", "status")
    assert status["state"] == "running" and status["waves"] == ["1%", "10%", "50%", "100%"]
    assert status["gate"]["blocked_by"].startswith("soaking until")
    for command, said in (
        ("pause", "paused"),
        ("resume", "running (wave 1)"),
        ("advance", "wave 2 opened"),
        ("abort", "aborted: 6.2.2 blocked, target 6.2.1"),
    ):
        result = gs("rollout", command, "GroupSeries")
        assert result.stderr.strip() == f"Rollout of GroupSeries 6.2.2 {said}."
    assert gs.json("rollout", "status")[0]["state"] == "aborted"
    assert [e["action"] for e in gs.json("log", "--limit", "5")] == [
        "rollout.abort",
        "rollout.wave-opened",
        "rollout.advance",
        "rollout.resume",
        "rollout.pause",
    ]
    blocked = gs.json("package", "show", "GroupSeries", "6.2.2")["blocked"]
    assert blocked is True


def test_refusals_name_the_state_and_the_fix(gs):
    gs("rollout", "start", "GroupSeries", "--version", "6.2.2")
    result = gs("rollout", "resume", "GroupSeries", code=1)
    assert "is running: rollout resume works only when it is paused or halted" in result.stderr
    result = gs("policy", "set", "GroupSeries", "--version", "6.2.2", code=1)
    assert result.stderr.strip() == (
        "Error: A rollout of GroupSeries is running (wave 1 of 4): the policy is frozen until "
        "it ends; dynupdate rollout abort GroupSeries first."
    )
    result = gs("rollout", "pause", "Trio", code=1)
    assert "No active rollout of Trio" in result.stderr


@pytest.mark.parametrize(
    ("option", "value", "names"),
    [
        ("--waves", "10%,5%,100%", "shares must go up"),
        ("--waves", "50", "Invalid --waves '50'"),
        ("--soak", "soon", "Invalid duration 'soon'"),
        ("--min-success", "0.95", "Invalid --min-success '0.95'"),
    ],
)
def test_bad_options_are_refused_before_anything_changes(gs, option, value, names):
    result = gs("rollout", "start", "GroupSeries", "--version", "6.2.2", option, value, code=1)
    assert names in result.stderr and result.stderr.count("\n") == 1
    assert gs.json("rollout", "list") == []


def test_min_devices_zero_is_a_usage_error(gs):
    gs("rollout", "start", "GroupSeries", "--version", "6.2.2", "--min-devices", "0", code=2)


def test_dry_run_prints_devices_per_wave_and_logs_nothing(gs, home_dir):
    serials = [f"S{n}" for n in range(400)]
    register(home_dir, serials)
    entries = len(gs.json("log"))
    waves = gs.json("rollout", "start", "GroupSeries", "--version", "6.2.2", "--dry-run")
    expected = [sum(1 for s in serials if bucket(s) < share) for share in (100, 1000, 5000)]
    assert waves == [
        {"wave": "1%", "devices": expected[0]},
        {"wave": "10%", "devices": expected[1]},
        {"wave": "50%", "devices": expected[2]},
        {"wave": "100%", "devices": 400},
    ]
    assert gs.json("rollout", "list") == [] and len(gs.json("log")) == entries
    # and it refuses as a start would
    gs("rollout", "start", "GroupSeries", "--version", "6.2.1", "--dry-run", code=1)


def test_package_add_rollout_starts_in_the_upload_and_inherits_options(gs, make_file):
    gs("rollout", "start", "GroupSeries", "--version", "6.2.2", "--waves", "trial,100%",
       "--max-in-flight", "7")  # fmt: skip
    gs("rollout", "advance", "GroupSeries")
    gs("rollout", "advance", "GroupSeries")  # completed: policy → 6.2.2
    result = gs(
        "package", "add", make_file(b"c"), "--type", "GroupSeries", "--version", "6.3",
        "--rollout", "--soak", "3h",
    )  # fmt: skip
    assert "Rollout of GroupSeries 6.3 started" in result.stderr
    (latest, *_) = gs.json("rollout", "list")
    assert (latest["version"], latest["stable_version"]) == ("6.3", "6.2.2")
    assert latest["waves"] == ["trial", "100%"]
    assert latest["options"]["max_in_flight"] == 7 and latest["options"]["soak"] == 3 * 3600
    # the identical file again: a no-op while a rollout of it is active
    again = gs(
        "package", "add", make_file(b"c"), "--type", "GroupSeries", "--version", "6.3",
        "--rollout",
    )  # fmt: skip
    assert "Rollout" not in again.stderr and len(gs.json("rollout", "list")) == 2


def test_rollout_options_need_rollout(gs, make_file):
    result = gs("package", "add", make_file(b"d"), "--type", "GroupSeries", "--version", "7",
                "--waves", "100%", code=2)  # fmt: skip
    assert "--waves needs --rollout" in result.output


def test_trial_devices(gs):
    gs("trial", "add", "8211ABC", "9300XYZ")
    listed = gs.json("trial", "list")
    assert [(t["serial"], t["type"]) for t in listed] == [("8211ABC", None), ("9300XYZ", None)]
    assert all(t["added_at"].endswith("Z") for t in listed)
    result = gs("trial", "remove", "8211ABC", "NOPE", code=1)
    assert "'NOPE' is not a trial device" in result.stderr
    assert len(gs.json("trial", "list")) == 2
    gs("trial", "remove", "8211ABC")
    assert [e["action"] for e in gs.json("log", "--limit", "2")] == ["trial.remove", "trial.add"]
    assert gs.json("log", "--limit", "1")[0]["type"] is None


def test_endpoint_retry_is_only_for_held_devices(gs, home_dir):
    register(home_dir, ["8211ABC"])
    result = gs("endpoint", "retry", "8211ABC", code=1)
    assert "8211ABC is not held" in result.stderr
    gs("endpoint", "retry", "NOPE", code=1)


def test_status_and_list_are_arrays(gs):
    assert gs.json("rollout", "status") == [] and gs.json("rollout", "list") == []
    gs("rollout", "status")  # a table (or a message) without a rollout


def test_dry_run_estimates_the_time_to_100_percent(gs, home_dir):
    register(home_dir, [f"S{n}" for n in range(120)])
    result = gs("rollout", "start", "GroupSeries", "--version", "6.2.2", "--dry-run",
                "--waves", "10%,100%", "--soak", "2h", "--max-per-hour", "20",
                "--max-in-flight", "5")  # fmt: skip
    # 120 devices at 20 an hour outlast two soaks of 2 h
    assert "100 % at the earliest after 6h (120 devices at --max-per-hour 20)" in result.stderr
    assert "fewer than 5 installs at a time" in result.stderr
    quick = gs("rollout", "start", "GroupSeries", "--version", "6.2.2", "--dry-run",
               "--waves", "10%,100%", "--soak", "2h")  # fmt: skip
    assert "after 4h (2 waves, each open at least --soak 2h)" in quick.stderr
