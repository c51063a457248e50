"""Issue 12's rehearsal: 1,000 reference endpoints against a real server, a bad and a good release.

The proof that a halted release stayed in its first wave is read from the
server's own records (rollout_devices, rollout_attempts, the ``offered``
events of endpoint_history), each serial checked against its bucket.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynupdate.cli import app
from dynupdate.core.waves import bucket
from dynupdate.endpoint import EndpointClient
from dynupdate.endpoint.simulation import Simulation, build_fleet, parse_fault_options, parse_fleet
from dynupdate.fingerprints import fingerprint

pytestmark = pytest.mark.slow

GS, OLD, NEW = "GroupSeries", "6.2.1", "6.2.2"
ENDPOINTS = 1000
WAVES = "10%,50%,100%"
FIRST_WAVE = 1000  # basis points: a bucket below it is in wave 1
POLL_INTERVAL = 2.0  # the simulator's time scale; the server says 60 s
# Longer than any run of these tests: on a busy machine (a parallel suite, a CI
# neighbour) an install can outlast a few seconds with nothing wrong, and a
# timed-out attempt counts as failed, halting a good release (seen: "3 of 29
# outcomes failed"). Install timeouts have their own test in test_rollout_server.
INSTALL_TIMEOUT = "10m"
# The most a rehearsal may take before the test gives up: a generous bound, not
# a measure (an idle machine needs a fraction of it).
WAIT = 150


def cli(home: Path, *args) -> str:
    result = CliRunner().invoke(app, ["--home", str(home), *map(str, args)])
    assert result.exit_code == 0, f"{result.stdout}\n{result.stderr}"
    return result.stdout


def prepare(home: Path, tmp_path: Path, *rollout_options: str) -> None:
    """The fleet's stable version as policy, then a rollout of the new one."""
    for version in (OLD, NEW):
        path = tmp_path / f"gs-{version}.pup"
        path.write_bytes(os.urandom(4096))
        cli(home, "package", "add", path, "--type", GS, "--version", version)
    cli(home, "policy", "set", GS, "--version", OLD)
    cli(home, "rollout", "start", GS, "--version", NEW, "--waves", WAVES, *rollout_options)


def query(home: Path, sql: str, *params) -> list[tuple]:
    conn = sqlite3.connect(f"file:{home / 'dynupdate.db'}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def rollout_row(home: Path) -> tuple:
    [row] = query(
        home, "SELECT state, wave, halt_reason, started_at, stopped_at, finished_at FROM rollouts"
    )
    return row


def seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def fleet_simulation(server, faults: str | None = None) -> Simulation:
    client = EndpointClient(
        f"https://127.0.0.1:{server.port}", pin=fingerprint(server.cafile), max_connections=100
    )
    fleet, _ = build_fleet(
        ENDPOINTS,
        parse_fleet(f"{GS}={OLD}"),
        faults=parse_fault_options(fail=faults, revert=None, brick=None),
        download="head",
        poll_interval=POLL_INTERVAL,
        seed=12,
    )
    return Simulation(client, fleet, seed=12)


async def run_until(simulation: Simulation, condition, what: str, timeout: float) -> float:
    """Run the fleet until ``condition()`` holds (polled), then stop it; the seconds it took."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    run = asyncio.create_task(simulation.run(stop=stop, duration=timeout + 5))
    started = loop.time()
    try:
        while not await loop.run_in_executor(None, condition):
            if run.done() or loop.time() - started > timeout:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.2)
        return loop.time() - started
    finally:
        stop.set()
        await run


def test_a_release_failing_on_30_percent_halts_in_wave_1_and_reaches_no_one_else(
    start_server, tmp_path
):
    home = tmp_path / "server"
    server = start_server(home, "--poll-interval", "60", "--no-access-log")
    prepare(
        home, tmp_path, "--soak", "2s", "--install-timeout", INSTALL_TIMEOUT, "--min-devices", "5"
    )
    simulation = fleet_simulation(server, faults=f"{GS}={NEW}:30%")

    stats = simulation.client.stats
    polls_at_halt: list[int] = []
    halt_seen: list[float] = []

    def halted_and_heard_again() -> bool:
        # Past the halt, a whole round of polls more: a device outside wave 1 offered V
        # by a stale decision would show up in the records read below.
        if not polls_at_halt:
            if rollout_row(home)[0] != "halted":
                return False
            polls_at_halt.append(stats.polls)
            halt_seen.append(simulation.elapsed())
        return stats.polls >= polls_at_halt[0] + ENDPOINTS

    elapsed = asyncio.run(run_until(simulation, halted_and_heard_again, "the halt", WAIT))
    state, wave, reason, started_at, stopped_at, _ = rollout_row(home)
    assert (state, wave) == ("halted", 1), reason
    assert "failed" in reason, reason

    offered = {
        s: b
        for s, b in query(
            home, "SELECT serial, bucket FROM rollout_devices WHERE offered_at IS NOT NULL"
        )
    }
    attempted = {s for (s,) in query(home, "SELECT DISTINCT serial FROM rollout_attempts")}
    in_history = {
        s
        for (s,) in query(
            home,
            "SELECT DISTINCT serial FROM endpoint_history WHERE event = 'offered' AND version = ?",
            NEW,
        )
    }
    registered = {s for (s,) in query(home, "SELECT serial FROM endpoints")}
    assert len(registered) == ENDPOINTS
    wave_1 = {s for s in registered if bucket(s) < FIRST_WAVE}
    assert 50 < len(wave_1) < 150, "about a tenth of the fleet"
    assert offered and all(bucket(s) == b for s, b in offered.items()), "buckets as recorded"
    assert set(offered) == attempted == in_history, "the three records agree"
    outside = (set(offered) | attempted | in_history) - wave_1
    assert not outside, f"{len(outside)} offered {NEW} outside wave 1: {sorted(outside)[:5]}…"
    on_new = {s for (s,) in query(home, "SELECT serial FROM endpoints WHERE version = ?", NEW)}
    assert on_new <= wave_1
    details = query(home, "SELECT detail FROM rollout_devices WHERE failures > 0")
    failed = len(details)
    assert failed and set(details) == {(f"simulated install failure of {NEW}",)}
    print(
        f"\nbad release: wave 1 holds {len(wave_1)} of {ENDPOINTS}; offered {len(offered)},"
        f" failed {failed}, on {NEW} {len(on_new)}; halt seen {halt_seen[0]:.1f} s into the fleet's"
        f" run ({started_at} → {stopped_at}), test over after {elapsed:.1f} s; {reason}"
    )


def test_a_good_release_opens_every_wave_and_completes(start_server, tmp_path):
    home = tmp_path / "server"
    server = start_server(home, "--poll-interval", "60", "--no-access-log")
    prepare(
        home, tmp_path, "--soak", "1s", "--install-timeout", INSTALL_TIMEOUT, "--min-devices", "5"
    )
    simulation = fleet_simulation(server)

    def completed_and_all_on_new() -> bool:
        if rollout_row(home)[0] != "completed":
            return False
        [(left,)] = query(home, "SELECT count(*) FROM endpoints WHERE version != ?", NEW)
        return left == 0 and simulation.totals["up-to-date"] == ENDPOINTS

    elapsed = asyncio.run(run_until(simulation, completed_and_all_on_new, "completion", WAIT))
    state, wave, reason, started_at, _, finished_at = rollout_row(home)
    assert (state, wave, reason) == ("completed", 3, None)
    [(count,)] = query(home, "SELECT count(*) FROM endpoints WHERE version = ?", NEW)
    assert count == ENDPOINTS
    [(failed,)] = query(home, "SELECT count(*) FROM rollout_devices WHERE failures > 0")
    assert failed == 0
    server_sql = "SELECT action, time FROM audit_log WHERE actor = 'server' ORDER BY id"
    entries = query(home, server_sql)
    opened = [action for action, _ in entries]
    assert opened == ["rollout.wave-opened", "rollout.wave-opened", "rollout.completed"]
    # Each device was first offered V once its own wave had opened (times to the second).
    wave_2, wave_3 = (datetime.fromisoformat(at) for _, at in entries[:2])
    first_offers = query(home, "SELECT serial, offered_at FROM rollout_devices")
    assert len(first_offers) == ENDPOINTS
    for serial, offered_at in first_offers:
        lead = bucket(serial)
        opens = wave_3 if lead >= 5000 else wave_2 if lead >= FIRST_WAVE else None
        if opens is not None:
            assert datetime.fromisoformat(offered_at) >= opens.replace(microsecond=0), serial
    print(
        f"\ngood release: completed {seconds_between(started_at, finished_at):.1f} s after the"
        f" start, every device on {NEW} after {elapsed:.1f} s of fleet; server actions: {opened}"
    )
