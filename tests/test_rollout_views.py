"""What admins see during a rollout: statuses, filters, counts and endpoint show (SPEC section 6).

The registry is built as the server builds it (``record_polls``/``record_reports``
on a temp home), rollouts are started and attempts recorded through core
(``start_rollout``, ``reserve_attempt``, ``note_devices``), and what an admin
sees is read through the CLI.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from dynupdate.cli._output import visible
from dynupdate.cli.rollout import gate_in_words
from dynupdate.core import attempts, rollout_records, rollouts, trial
from dynupdate.core.attempts import Seen
from dynupdate.core.db import write
from dynupdate.core.endpoints import list_endpoints, overview
from dynupdate.core.fleet import STATUSES, load_fleet_state
from dynupdate.core.gates import RolloutOptions
from dynupdate.core.packages import add_package
from dynupdate.core.policies import set_policy
from dynupdate.core.registry import Sighting, StatusReport, record_polls, record_reports
from dynupdate.core.times import format_utc
from dynupdate.core.waves import bucket, parse_waves

# Recent, not fixed: CLI commands evaluate the rollout at the real time, and an
# attempt opened over --install-timeout (2h) before that would time out under them.
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
TYPE = "GroupSeries"
# Halts are tested elsewhere: here failures must not stop the rollout under the views.
NO_HALT = {"max_failures": 10_000, "max_failure_rate": 10_000}


def serials_in(low: int, high: int, count: int, prefix: str) -> list[str]:
    """``count`` serials whose bucket is in [low, high)."""
    found, n = [], 0
    while len(found) < count:
        serial = f"{prefix}{n}"
        if low <= bucket(serial) < high:
            found.append(serial)
        n += 1
    return found


def poll(home, serial, version, parent=None, type_=TYPE, at=T0):
    record_polls(home.db, [(Sighting(serial, type_, version, parent_serial=parent), at)])


def report(home, serial, state, version="6.2.2", detail=None, at=T0):
    record_reports(home.db, [(StatusReport(serial, TYPE, version, state, detail), at)])


def fail(home, rollout_id, serial, detail="disk full", at=T0):
    """One attempt at 6.2.2 that fails: offered, then a failed report."""
    assert attempts.reserve_attempt(home.db, rollout_id, serial, None, now=at) is None
    report(home, serial, "failed", detail=detail, at=at)
    with write(home.db):
        attempts.note_devices(home.db, rollout_id, [Seen(serial, "6.2.2", "failed", detail)], at)


@pytest.fixture
def gs(home, make_file):
    """GroupSeries 6.2.1 (the version to use, exact) and 6.2.2 uploaded."""
    add_package(home.db, home.store, make_file(b"6.2.1"), TYPE, "6.2.1")
    add_package(home.db, home.store, make_file(b"6.2.2"), TYPE, "6.2.2")
    set_policy(home.db, TYPE, "6.2.1")
    return home


@pytest.fixture
def rolling(gs):
    """A rollout of GroupSeries 6.2.2 in wave 1 (1%), one device of each status.

    A* are in wave 1, B1 in wave 2, W* in no wave before the last, T1 is a trial
    device (outside wave 1 by bucket) and P1 its peripheral.
    """
    a1, a2, a3, a4, a5 = serials_in(0, 100, 5, "A")
    (b1,) = serials_in(100, 1000, 1, "B")
    w1, w2, t1 = serials_in(5000, 10_000, 3, "W")
    names = {"A1": a1, "A2": a2, "A3": a3, "A4": a4, "A5": a5, "B1": b1, "W1": w1, "W2": w2}
    names["T1"], names["P1"] = t1, "P1"
    for serial in (a1, a2, a3, a4, b1, w1, t1):
        poll(gs, serial, "6.2.1")
    poll(gs, a5, "6.2.2")
    poll(gs, w2, "6.2.0")
    poll(gs, "P1", "6.2.1", parent=t1)
    trial.add_trial(gs.db, [t1])
    rollout = rollouts.start_rollout(gs.db, TYPE, "6.2.2", RolloutOptions(**NO_HALT), now=T0)
    assert attempts.reserve_attempt(gs.db, rollout.id, a2, None, now=T0) is None
    report(gs, a2, "downloading")
    fail(gs, rollout.id, a3)
    for _ in range(3):  # --max-attempts 3
        fail(gs, rollout.id, a4)
    gs.names = names
    gs.rollout = rollout
    return gs


EXPECTED = {
    "A1": "pending",  # admitted, not offered yet
    "A2": "in-progress",
    "A3": "failed",
    "A4": "held",
    "A5": "up-to-date",  # on V
    "B1": "waiting",  # on the stable version, wave 2 not open
    "W1": "waiting",
    "W2": "pending",  # older than the stable version: the stable decision updates it
    "T1": "pending",  # a trial device is in every wave
    "P1": "pending",  # and so are its peripherals
}


def statuses(cli, home) -> dict[str, str]:
    by_serial = {row["serial"]: row["status"] for row in cli.json("endpoint", "list")}
    return {name: by_serial[serial] for name, serial in home.names.items()}


def counts(cli) -> dict[str, int]:
    (row,) = [r for r in cli.json("overview") if r["type"] == TYPE]
    return row["counts"]


def test_every_status_of_a_running_rollout(cli, rolling):
    assert statuses(cli, rolling) == EXPECTED
    expected = Counter(EXPECTED.values())
    assert counts(cli) == {status: expected[status] for status in STATUSES}


@pytest.mark.parametrize("status", ["pending", "in-progress", "failed", "held", "waiting"])
def test_status_filter(cli, rolling, status):
    found = cli.json("endpoint", "list", "--status", status, "--type", TYPE)
    wanted = {rolling.names[name] for name, s in EXPECTED.items() if s == status}
    assert {row["serial"] for row in found} == wanted
    assert all(row["status"] == status for row in found)


def test_targets_during_a_rollout(cli, rolling):
    targets = {row["serial"]: row["target_version"] for row in cli.json("endpoint", "list")}
    names = rolling.names
    assert targets[names["A1"]] == targets[names["A4"]] == targets[names["T1"]] == "6.2.2"
    assert targets[names["W1"]] == targets[names["B1"]] == "6.2.1"  # the stable version


def test_pause_resume_advance_and_abort_change_statuses_at_once(cli, rolling):
    cli("rollout", "pause", TYPE)
    paused = {**EXPECTED, "A1": "waiting", "T1": "waiting", "P1": "waiting"}
    assert statuses(cli, rolling) == paused  # no poll in between
    assert counts(cli)["waiting"] == 5
    cli("rollout", "resume", TYPE)
    assert statuses(cli, rolling) == EXPECTED
    cli("rollout", "advance", TYPE)
    assert statuses(cli, rolling) == {**EXPECTED, "B1": "pending"}
    cli("rollout", "abort", TYPE)
    # The policy decides again: 6.2.1 exactly, so a device on 6.2.2 is offered it back.
    after = {
        "A1": "up-to-date", "A2": "up-to-date", "A3": "up-to-date", "A4": "up-to-date",
        "A5": "pending", "B1": "up-to-date", "W1": "up-to-date", "W2": "pending",
        "T1": "up-to-date", "P1": "up-to-date",
    }  # fmt: skip
    assert statuses(cli, rolling) == after
    row = next(r for r in cli.json("overview") if r["type"] == TYPE)
    assert row["rollout"] is None and row["counts"]["waiting"] == row["counts"]["held"] == 0


def test_retry_clears_held(cli, rolling):
    a4 = rolling.names["A4"]
    cli("endpoint", "retry", a4)
    shown = cli.json("endpoint", "show", a4)
    assert (shown["status"], shown["attempts"], shown["admitted"]) == ("failed", 0, True)


def test_endpoint_show_fields_during_a_rollout(cli, rolling):
    names = rolling.names
    held = cli.json("endpoint", "show", names["A4"])
    assert held["bucket"] == bucket(names["A4"])
    assert (held["status"], held["attempts"], held["admitted"]) == ("held", 3, True)
    assert held["rollout"]["id"] == rolling.rollout.id and held["rollout"]["held"] is True
    staged = cli.json("endpoint", "show", names["W1"])
    assert (staged["attempts"], staged["admitted"]) == (0, False)
    assert staged["rollout"]["device_wave"] == 4  # 1%, 10%, 50% do not cover it
    # A peripheral leads with its endpoint's bucket, and a trial endpoint's peripheral is admitted.
    peripheral = cli.json("endpoint", "show", "P1")
    assert peripheral["bucket"] == bucket(names["T1"]) and peripheral["admitted"] is True
    [listed] = cli.json("endpoint", "show", names["T1"])["peripherals"]
    assert (listed["serial"], listed["admitted"]) == ("P1", True)


def test_endpoint_show_says_it_in_words(cli, rolling):
    names = rolling.names
    held = cli("endpoint", "show", names["A4"]).stdout
    assert "held after 3 failed attempts (disk full):" in held
    assert f"dynupdate endpoint retry {names['A4']}" in held
    assert "in wave 1 (1%): admitted" in cli("endpoint", "show", names["A1"]).stdout
    assert "staged until wave 2 (10%)" in cli("endpoint", "show", names["B1"]).stdout
    assert "a trial device, in every wave: admitted" in cli("endpoint", "show", "P1").stdout
    cli("rollout", "pause", TYPE)
    assert "not offered while paused" in cli("endpoint", "show", names["A1"]).stdout


def test_endpoint_show_after_the_rollout_and_without_one(cli, rolling, make_file):
    a4 = rolling.names["A4"]
    cli("rollout", "abort", TYPE)
    data = cli.json("endpoint", "show", a4)
    # Over: the attempts of the type's latest rollout, and no admission to speak of.
    assert (data["attempts"], data["admitted"], data["rollout"]["state"]) == (3, None, "aborted")
    assert "6.2.2 aborted; 3 attempts" in cli("endpoint", "show", a4).stdout
    poll(rolling, "CAM", "1.0", type_="EagleEyeIV")
    data = cli.json("endpoint", "show", "CAM")
    assert (data["attempts"], data["admitted"], data["rollout"]) == (0, None, None)
    assert data["bucket"] == bucket("CAM")


def test_overview_shows_the_active_rollout(cli, rolling):
    row = next(r for r in cli.json("overview") if r["type"] == TYPE)
    assert row["rollout"] == {
        "id": rolling.rollout.id,
        "version": "6.2.2",
        "state": "running",
        "wave": 1,
        "waves": ["1%", "10%", "50%", "100%"],
    }
    table = cli("overview").stdout
    assert "6.2.2 running" in table and "wave 1/4 (1%)" in table
    assert "waiting" in table and "held" in table


def test_overview_without_a_rollout_has_no_rollout_columns(cli, gs):
    poll(gs, "X1", "6.2.1")
    row = cli.json("overview")[0]
    assert row["rollout"] is None and row["counts"]["waiting"] == 0
    assert "Rollout" not in cli("overview").stdout


def test_unknown_status_names_the_choices(cli, gs):
    result = cli("endpoint", "list", "--status", "stuck", code=1)
    assert "'stuck'" in result.stderr and "waiting" in result.stderr and "held" in result.stderr


# The overview counts by groups and corrections; endpoint list decides per row.
# They must agree on any fleet, on either side of every wave's border.


@pytest.mark.parametrize(
    ("waves", "advances", "state"),
    [
        ("1%,10%,100%", 0, "running"),
        ("1%,60%,100%", 1, "running"),  # past half the buckets: counted from the other side
        ("1%,60%,100%", 2, "running"),  # the last wave: everyone admitted
        ("trial,100%", 0, "running"),  # the trial devices alone
        ("1%,60%,100%", 1, "paused"),
        ("1%,60%,100%", 1, "halted"),
    ],
)
def test_overview_counts_agree_with_each_device(gs, waves, advances, state):
    rng = random.Random(f"{waves}{advances}{state}")
    serials = [f"R{n}" for n in range(300)]
    versions = ["6.2.0", "6.2.1", "6.2.1", "6.2.1", "6.2.2", "6.3"]
    for serial in serials:
        poll(gs, serial, rng.choice(versions))
    for n, serial in enumerate(rng.sample(serials, 40)):
        poll(gs, f"{serial}-cam", rng.choice(versions), parent=serial)
        if n % 3 == 0:
            report(gs, f"{serial}-cam", rng.choice(["downloading", "installing", "failed"]))
    trial.add_trial(gs.db, rng.sample(serials, 15))
    options = RolloutOptions(waves=parse_waves(waves), **NO_HALT)
    rollout = rollouts.start_rollout(gs.db, TYPE, "6.2.2", options, now=T0)
    for _ in range(advances):
        rollouts.advance_rollout(gs.db, TYPE)
    fleet = load_fleet_state(gs.db)
    admitted = [r["serial"] for r in list_endpoints(gs.db, fleet) if r["target_version"] == "6.2.2"]
    at = T0 + timedelta(minutes=1)
    for serial in rng.sample(admitted, min(60, len(admitted))):
        kind = rng.randrange(4)
        if kind == 0:
            attempts.reserve_attempt(gs.db, rollout.id, serial, None, now=at)
            report(gs, serial, rng.choice(["downloading", "installing"]), at=at)
        elif kind == 1:
            fail(gs, rollout.id, serial, at=at)
        else:  # held, or 3 failures and then a fresh, open attempt
            for _ in range(3):
                fail(gs, rollout.id, serial, at=at)
            if kind == 3:
                attempts.retry_device(gs.db, serial)
                attempts.reserve_attempt(gs.db, rollout.id, serial, None, now=at)
    if state == "paused":
        rollouts.pause_rollout(gs.db, TYPE)
    elif state == "halted":
        with write(gs.db):
            gs.db.execute("UPDATE rollouts SET state = 'halted' WHERE id = ?", (rollout.id,))
    fleet = load_fleet_state(gs.db)
    per_device = Counter(r["status"] for r in list_endpoints(gs.db, fleet, type_=TYPE))
    (row,) = [r for r in overview(gs.db, fleet) if r["type"] == TYPE]
    assert row["counts"] == {status: per_device[status] for status in STATUSES}
    # Enough of a mix that a wrong correction would show.
    assert len([s for s in STATUSES if per_device[s]]) >= 3
    for status in STATUSES:
        filtered = list_endpoints(gs.db, fleet, type_=TYPE, status=status)
        assert len(filtered) == per_device[status]


# rollout status --watch: the view an admin leaves open during a release.


def test_gate_in_words(gs):
    (a1,) = serials_in(0, 100, 1, "A")
    poll(gs, a1, "6.2.1")
    rollout = rollouts.start_rollout(gs.db, TYPE, "6.2.2", RolloutOptions(**NO_HALT), now=T0)
    assert attempts.reserve_attempt(gs.db, rollout.id, a1, None, now=T0) is None

    def words() -> str:
        (summary,) = rollout_records.rollout_views(gs.db, TYPE, now=T0 + timedelta(minutes=1))
        return gate_in_words(summary)

    soak_end = format_utc(T0 + timedelta(hours=1))
    assert words() == (
        f"Next wave (10%) from {soak_end} if ≥ 95% of ≥ 1 outcome succeed; waiting for:"
        f" soaking until {soak_end}; 0 of 1 outcomes; 1 attempt in flight"
    )
    rollouts.pause_rollout(gs.db, TYPE)
    assert words() == f"Paused: 6.2.2 is offered to nobody; dynupdate rollout resume {TYPE}"
    rollouts.resume_rollout(gs.db, TYPE)
    for _ in range(3):
        rollouts.advance_rollout(gs.db, TYPE)
    assert words().startswith("Completes from ")
    rollouts.abort_rollout(gs.db, TYPE)
    assert words() == ""


def test_gate_in_words_for_a_manual_rollout_and_a_wave_without_live_devices(gs):
    rollouts.start_rollout(gs.db, TYPE, "6.2.2", RolloutOptions(manual=True), now=T0)
    (summary,) = rollout_records.rollout_views(gs.db, TYPE, now=T0)
    assert gate_in_words(summary) == f"Next wave (10%) by hand: dynupdate rollout advance {TYPE}"
    rollouts.abort_rollout(gs.db, TYPE)
    rollouts.start_rollout(gs.db, TYPE, "6.2.2", now=T0)
    (summary,) = rollout_records.rollout_views(gs.db, TYPE, now=T0)
    assert gate_in_words(summary).startswith(
        f"Next wave (10%) from {format_utc(T0 + timedelta(hours=1))} (no live device of its own)"
    )


HOSTILE_DETAIL = "flash failed \x1b[2J [red]x[/red] :smile:"


def test_rollout_status_watch_draws_waves_gate_and_halt(gs, make_file):
    """The real command on a forced terminal, read until it has drawn twice, then ended."""
    add_package(gs.db, gs.store, make_file(b"t7.1"), "Trio", "7.1")
    add_package(gs.db, gs.store, make_file(b"t7.2"), "Trio", "7.2")
    set_policy(gs.db, "Trio", "7.1")
    bad = serials_in(0, 100, 2, "A")
    for serial in bad:
        poll(gs, serial, "6.2.1")
    poll(gs, "TRIO-1", "7.1", type_="Trio")
    rollout = rollouts.start_rollout(gs.db, TYPE, "6.2.2", RolloutOptions(max_failures=2), now=T0)
    fail(gs, rollout.id, bad[0], detail=HOSTILE_DETAIL)
    fail(gs, rollout.id, bad[1], detail="disk full")
    rollouts.start_rollout(gs.db, "Trio", "7.2", RolloutOptions(), now=T0)
    environment = {**os.environ, "FORCE_COLOR": "1", "TERM": "xterm-256color",
                   "COLUMNS": "200", "LINES": "80"}  # fmt: skip
    environment.pop("NO_COLOR", None)
    watch = subprocess.Popen(
        [sys.executable, "-m", "dynupdate", "--home", str(gs.path), "rollout", "status",
         "--watch", "--interval", "1s"],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        os.set_blocking(watch.stdout.fileno(), False)
        seen = b""
        deadline = time.monotonic() + 30
        while seen.count("Rollouts —".encode()) < 2:
            assert watch.poll() is None, watch.stderr.read().decode()
            assert time.monotonic() < deadline, seen
            seen += watch.stdout.read() or b""
            time.sleep(0.05)
    finally:
        watch.terminate()
        watch.wait(timeout=10)
        watch.stdout.close()
        watch.stderr.close()
    text = seen.decode()
    # The halt in red, its reason, each failing device with what it said (literally).
    assert "\x1b[1;31mHALTED" in text
    assert "\x1b[1;31mHalted: 2 failed devices reached --max-failures 2" in text
    assert visible(HOSTILE_DETAIL) in text and "\x1b[2J" not in text
    assert bad[1] in text and "disk full" in text
    assert f"dynupdate rollout resume {TYPE}" in text
    # A bar per wave and the gate in words for the running one.
    assert "GroupSeries 6.2.1 → 6.2.2" in text and "Trio 7.1 → 7.2" in text
    assert "░░░░░░░░░░░░░░░░░░░░ 0/1" in text  # Trio's device, in no open wave yet
    assert "Next wave (10%) from" in text and "waiting for: soaking until" in text
    assert "offered 2" in text and "failed 2" in text
