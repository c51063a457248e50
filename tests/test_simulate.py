"""dynupdate simulate: fleets of reference endpoints against a real server over HTTPS."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynupdate.cli import app
from dynupdate.core.errors import InvalidInput
from dynupdate.endpoint import EndpointClient
from dynupdate.endpoint.simulation import (
    Share,
    Simulation,
    build_fleet,
    parse_fleet,
    parse_percent,
    parse_seconds,
    split_counts,
)
from dynupdate.fingerprints import fingerprint


def cli(home: Path, *args, code: int = 0):
    result = CliRunner().invoke(app, ["--home", str(home), *map(str, args)])
    assert result.exit_code == code, f"{result.stdout}\n{result.stderr}"
    return result


def cli_json(home: Path, *args):
    return json.loads(cli(home, *args, "--json").stdout)


def publish(home: Path, tmp_path: Path, type_: str, version: str, size: int = 4096) -> None:
    path = tmp_path / f"{type_}-{version}.pup"
    path.write_bytes(os.urandom(size))
    cli(home, "package", "add", path, "--type", type_, "--version", version)
    cli(home, "policy", "set", type_, "--version", version)


def hhmm(moment: datetime) -> str:
    return moment.strftime("%H:%M")


# -- end to end ----------------------------------------------------------------------------


def test_rollout_of_300_endpoints_reaches_100_percent(start_server, tmp_path):
    home = tmp_path / "server"
    server = start_server(home, "--poll-interval", "5", "--no-access-log")
    publish(home, tmp_path, "GroupSeries", "6.2.2")
    publish(home, tmp_path, "Trio", "7.2.0")
    started = time.monotonic()
    result = cli(
        tmp_path / "unused-home",  # simulate talks HTTPS only; it never opens a home
        "simulate",
        "--url", f"https://127.0.0.1:{server.port}",
        "--cafile", server.cafile,
        "--endpoints", 300,
        "--fleet", "GroupSeries=6.2.1:70%,Trio=7.1.0:30%",
        "--in-call", "5%",
        "--call-length", "1s",
        "--until-done",
        "--duration", "45s",
        "--concurrency", 100,
        "--seed", 4,
        "--json",
    )  # fmt: skip
    summary = json.loads(result.stdout)
    assert summary["done"] is True, summary
    assert summary["counts"]["up-to-date"] == summary["devices"] == 300
    assert summary["errors"] == {} and summary["bytes_downloaded"] == 300 * 4096
    assert 0 < summary["time_to_50_percent"] <= summary["time_to_90_percent"]
    assert summary["time_to_90_percent"] <= summary["time_to_100_percent"]
    assert summary["time_to_100_percent"] <= summary["elapsed_seconds"]
    assert summary["elapsed_seconds"] <= time.monotonic() - started
    assert summary["polls"] >= 300 and summary["reports"] == 3 * 300
    assert {t["type"]: t["counts"]["up-to-date"] for t in summary["types"]} == {
        "GroupSeries": 210,
        "Trio": 90,
    }

    overview = {row["type"]: row for row in cli_json(home, "overview")}
    for type_, count, target in (("GroupSeries", 210, "6.2.2"), ("Trio", 90, "7.2.0")):
        row = overview[type_]
        assert (row["endpoints"], row["on_target_percent"]) == (count, 100.0)
        assert row["versions"] == [{"version": target, "count": count}]
    endpoints = cli_json(home, "endpoint", "list")
    assert len(endpoints) == 300
    assert {(e["report_state"], e["status"]) for e in endpoints} == {("installed", "up-to-date")}
    # The devices stay in the server's fleet: simulate says so, and how to remove them.
    assert "register in the server's database" in result.stderr
    assert "dynupdate endpoint forget --prefix SIM" in result.stderr
    assert cli(home, "endpoint", "forget", "--prefix", "SIM").stderr.startswith("Forgot 300 ")
    assert cli_json(home, "endpoint", "list") == []


def test_closed_window_holds_the_fleet_and_opening_it_moves_everyone(start_server, tmp_path):
    home = tmp_path / "server"
    server = start_server(home, "--poll-interval", "60", "--no-access-log")
    publish(home, tmp_path, "GroupSeries", "6.2.2")
    now = datetime.now(UTC)
    cli(home, "window", "set", "--start", hhmm(now + timedelta(hours=3)), "--duration", "1h")
    client = EndpointClient(
        f"https://127.0.0.1:{server.port}", pin=fingerprint(server.cafile), max_connections=100
    )
    fleet, _ = build_fleet(
        300, parse_fleet("GroupSeries=6.2.1"), download="head", poll_interval=2.0, seed=1
    )
    simulation = Simulation(client, fleet, seed=1)

    async def rollout():
        loop = asyncio.get_running_loop()
        run = asyncio.create_task(simulation.run(until_done=True, duration=50))
        deadline = loop.time() + 20
        while simulation.totals["not-polled"] and loop.time() < deadline:
            await asyncio.sleep(0.05)  # until every endpoint had its answer
        await asyncio.sleep(1.5)  # a bounded observation: nothing may move meanwhile
        held = dict(simulation.totals), client.stats.heads, client.stats.reports
        opened = (now - timedelta(minutes=30), "2h")
        window = ("window", "set", "--start", hhmm(opened[0]), "--duration", opened[1])
        dry_run = await loop.run_in_executor(None, cli_json, home, *window, "--dry-run")
        [overview] = await loop.run_in_executor(None, cli_json, home, "overview")
        assert overview["counts"]["pending"] == 300 and overview["on_target_percent"] == 0
        assert overview["pending_for_window"] == 300 and overview["window_open"] is False
        assert dry_run["totals"]["offered_now"] == 300 and dry_run["totals"]["changed"] == 300
        await loop.run_in_executor(
            None, cli, home, "window", "set", "--start", hhmm(opened[0]), "--duration", opened[1]
        )
        return held, await run

    (counts, heads, reports), summary = asyncio.run(asyncio.wait_for(rollout(), 55))
    assert counts["pending"] == 300 and counts.get("up-to-date", 0) == 0, counts
    assert (heads, reports) == (0, 0), "nothing moved while the window was closed"
    assert summary["done"] and summary["counts"]["up-to-date"] == 300, summary
    [row] = cli_json(home, "overview")
    assert row["on_target_percent"] == 100.0


def test_peripherals_calls_and_failures_reach_the_server(start_server, tmp_path):
    home = tmp_path / "server"
    server = start_server(home, "--poll-interval", "5", "--no-access-log")
    publish(home, tmp_path, "Trio", "7.2.0")
    publish(home, tmp_path, "EagleEyeIV", "2.0")
    result = cli(
        tmp_path / "unused-home",
        "simulate",
        "--url", f"https://127.0.0.1:{server.port}",
        "--pin", fingerprint(server.cafile).upper(),
        "--endpoints", 20,
        "--fleet", "Trio=7.1.0",
        "--peripherals", 2,
        "--peripheral-fleet", "EagleEyeIV=1.0",
        "--fail", "10%",
        "--download", "head",
        "--until-done",
        "--duration", "30s",
        "--seed", 9,
        "--json",
    )  # fmt: skip
    summary = json.loads(result.stdout)
    assert summary["done"] and summary["devices"] == 60 and summary["bytes_downloaded"] == 0
    assert (summary["counts"]["failed"], summary["counts"]["up-to-date"]) == (6, 54)
    endpoints = {e["serial"]: e for e in cli_json(home, "endpoint", "list")}
    failed = [e for e in endpoints.values() if e["status"] == "failed"]
    assert len(failed) == 6
    assert all(e["report_detail"].endswith("simulated install failure") for e in failed)
    assert endpoints["SIM000001-P1"]["parent_serial"] == "SIM000001"


def test_duration_and_poll_interval_set_the_pace(start_server, tmp_path):
    home = tmp_path / "server"
    server = start_server(home, "--poll-interval", "3600", "--no-access-log")
    result = cli(
        tmp_path / "unused-home",
        "simulate",
        "--url", f"https://127.0.0.1:{server.port}",
        "--cafile", server.cafile,
        "-n", 5,
        "--fleet", "Nobody=1.0",
        "--poll-interval", "0.2",
        "--duration", "1s",
    )  # fmt: skip
    assert "Rehearsal" in result.stdout and "Devices by type" in result.stdout
    elapsed = float(re.search(r"^ elapsed seconds +([0-9.]+)", result.stdout, re.M)[1])
    assert 1.0 <= elapsed < 5.0
    polls = int(re.search(r"^ polls +([0-9]+)", result.stdout, re.M)[1])
    assert polls >= 5 * 3, "every 0.2 s (± 10 %), not the server's 3600 s"


def test_until_done_not_reached_exits_1(start_server, tmp_path):
    home = tmp_path / "server"
    server = start_server(home, "--poll-interval", "60", "--no-access-log")
    publish(home, tmp_path, "Trio", "7.2.0")
    result = cli(
        tmp_path / "unused-home",
        "simulate",
        "--url", f"https://127.0.0.1:{server.port}",
        "--cafile", server.cafile,
        "-n", 3,
        "--fleet", "Trio=7.1.0",
        "--in-call", "100%",
        "--call-length", "1h",
        "--until-done",
        "--duration", "1s",
        "--json",
        code=1,
    )  # fmt: skip
    assert json.loads(result.stdout)["not_polled"] == 3
    assert "Not done after" in result.stderr and "3 devices" in result.stderr
    assert cli_json(home, "endpoint", "list") == [], "no poll was sent during the calls"


def simulate_json(server, *args, code: int = 0) -> dict:
    result = cli(
        server.home.parent / "unused-home",
        "simulate",
        "--url", f"https://127.0.0.1:{server.port}",
        "--cafile", server.cafile,
        "--seed", 2,
        "--json",
        *args,
        code=code,
    )  # fmt: skip
    return json.loads(result.stdout)


def history(home: Path, serial: str) -> list[tuple[str, str]]:
    shown = cli_json(home, "endpoint", "show", serial)
    return [(h["event"], h["version"]) for h in reversed(shown["history"])]


def test_fail_version_fails_that_share_of_installs_of_that_version_only(start_server, tmp_path):
    home = tmp_path / "server"
    server = start_server(home, "--poll-interval", "60", "--no-access-log")
    publish(home, tmp_path, "Trio", "7.2.0")
    publish(home, tmp_path, "EagleEyeIV", "2.0")
    summary = simulate_json(
        server,
        "-n", 20,
        "--fleet", "Trio=7.1.0",
        "--peripherals", 1,
        "--peripheral-fleet", "EagleEyeIV=1.0",
        # 7.2 is 7.2.0: five of the twenty phones; no camera is offered 9.0.
        "--fail-version", "trio=7.2:25%,EagleEyeIV=9.0:100%",
        "--until-done",
        "--duration", "30s",
    )  # fmt: skip
    assert summary["done"], summary
    assert (summary["counts"]["failed"], summary["counts"]["up-to-date"]) == (5, 35)
    failed = cli_json(home, "endpoint", "list", "--status", "failed")
    assert len(failed) == 5 and {e["type"] for e in failed} == {"Trio"}
    assert {e["report_detail"] for e in failed} == {"simulated install failure of 7.2.0"}
    cameras = cli_json(home, "endpoint", "list", "--type", "EagleEyeIV")
    assert {(e["version"], e["status"]) for e in cameras} == {("2.0", "up-to-date")}


def test_revert_version_reports_installed_then_polls_on_the_old_version(start_server, tmp_path):
    home = tmp_path / "server"
    server = start_server(home, "--poll-interval", "60", "--no-access-log")
    publish(home, tmp_path, "Trio", "7.2.0")
    summary = simulate_json(
        server,
        "-n", 10,
        "--fleet", "Trio=7.1.0",
        "--revert-version", "Trio=7.2.0:30%",
        "--poll-interval", "0.3",
        "--download", "head",
        "--duration", "3s",
    )  # fmt: skip
    assert summary["counts"]["up-to-date"] == 7 and summary["to_update"] == 3, summary
    reverted = []
    for endpoint in cli_json(home, "endpoint", "list"):
        events = history(home, endpoint["serial"])
        if ("version-changed", "7.1.0") in events:
            reverted.append(endpoint["serial"])
            # Its next poll after the installed report: no other event between them.
            back = (("installed", "7.2.0"), ("version-changed", "7.1.0"))
            assert back in itertools.pairwise(events), events
        else:
            assert endpoint["version"] == "7.2.0" and events[-1] == ("installed", "7.2.0"), events
    assert len(reverted) == 3, "each of the three came back on 7.1.0 after installing 7.2.0"


def test_brick_version_devices_go_silent_after_installing(start_server, tmp_path):
    home = tmp_path / "server"
    server = start_server(home, "--poll-interval", "60", "--no-access-log")
    publish(home, tmp_path, "Trio", "7.2.0")
    summary = simulate_json(
        server,
        "-n", 10,
        "--fleet", "Trio=7.1.0",
        "--brick-version", "Trio=7.2.0:20%",
        "--poll-interval", "0.2",
        "--download", "head",
        "--duration", "2s",
    )  # fmt: skip
    assert summary["silent"] == 2 and summary["to_update"] == 0, summary
    assert summary["counts"]["in-progress"] == 2 and summary["counts"]["up-to-date"] == 8
    assert summary["polls"] > 8 * 3, "the others kept polling all along"
    silent = []
    for endpoint in cli_json(home, "endpoint", "list"):
        shown = cli_json(home, "endpoint", "show", endpoint["serial"])
        last = shown["history"][0]
        if last["event"] == "installing":
            silent.append(endpoint["serial"])
            assert shown["last_poll"] <= last["at"], "no poll after the installing report"
            assert shown["version"] == "7.1.0"
        else:
            assert last["event"] == "installed" and shown["last_poll"] > last["at"], shown
    assert len(silent) == 2


def test_a_silent_fleet_is_done_with_until_done(start_server, tmp_path):
    home = tmp_path / "server"
    server = start_server(home, "--poll-interval", "60", "--no-access-log")
    publish(home, tmp_path, "Trio", "7.2.0")
    summary = simulate_json(
        server,
        "-n", 4,
        "--fleet", "Trio=7.1.0",
        "--brick-version", "Trio=7.2.0:100%",
        "--until-done",
        "--duration", "30s",
    )  # fmt: skip
    assert summary["done"] and summary["silent"] == 4 and summary["counts"]["in-progress"] == 4


def test_wrong_pin_fails_before_the_fleet_starts(start_server, tmp_path):
    home = tmp_path / "server"
    server = start_server(home, "--no-access-log")
    result = cli(
        tmp_path / "unused-home",
        "simulate",
        "--url", f"https://127.0.0.1:{server.port}",
        "--pin", "ab" * 32,
        "--fleet", "Trio=7.1.0",
        code=1,
    )  # fmt: skip
    assert "not the pinned" in result.stderr and fingerprint(server.cafile) in result.stderr
    assert cli_json(home, "endpoint", "list") == []


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--fleet", "GroupSeries"),
        ("--fleet", "GroupSeries=6.2.1:70%,Trio=7.1.0:20%"),
        ("--fleet", "Group Series=6.2.1"),
        ("--fleet", "Trio=7.1:abc"),
        ("--pin", "not-a-fingerprint"),
        ("--url", "http://127.0.0.1:8443"),
        ("--url", "127.0.0.1:8443"),
        ("--in-call", "120%"),
        ("--poll-interval", "soon"),
        ("--fail-version", "Trio=7.2.0"),
        ("--fail-version", "Trio=7.2.0:5%,Trio=7.2.0:6%"),
        ("--revert-version", "Trio=7.2.0:150%"),
        ("--revert-version", "Trio 7.2.0:5%"),
        ("--brick-version", "=7.2.0:5%"),
        ("--brick-version", "Trio=7 2:5%"),
    ],
)
def test_bad_options_exit_1_naming_the_value(tmp_path, option, value):
    args = {"--url": "https://127.0.0.1:1", "--fleet": "Trio=7.1.0", option: value}
    result = cli(tmp_path, "simulate", *[x for item in args.items() for x in item], code=1)
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: ") and value in line


def test_errors_are_counted_by_kind_in_the_summary(start_server, tmp_path):
    home = tmp_path / "server"
    server = start_server(home, "--poll-interval", "1", "--no-access-log")
    publish(home, tmp_path, "Trio", "7.2.0")
    [package] = cli_json(home, "package", "list")
    stored = home / "packages" / package["sha256"][:2] / package["sha256"]
    stored.chmod(0o600)
    stored.write_bytes(os.urandom(package["size"]))  # the same size, other bytes
    result = cli(
        tmp_path / "unused-home",
        "simulate",
        "--url", f"https://127.0.0.1:{server.port}",
        "--cafile", server.cafile,
        "-n", 10,
        "--fleet", "Trio=7.1.0",
        "--poll-interval", "0.2",
        "--until-done",
        "--duration", "20s",
        "--json",
    )  # fmt: skip
    summary = json.loads(result.stdout)
    # Failed is done: --until-done stops once every endpoint has failed its first try.
    assert summary["done"] and summary["counts"]["failed"] == 10, summary
    assert summary["errors"] == {"sha256-mismatch": 10} and summary["error_count"] == 10
    assert summary["time_to_50_percent"] is None and summary["time_to_100_percent"] is None
    assert summary["on_target_percent"] == 0.0 and summary["bytes_downloaded"] == 10 * 4096
    failed = cli_json(home, "endpoint", "list", "--status", "failed")
    assert len(failed) == 10 and all("SHA-256" in e["report_detail"] for e in failed)


def test_live_view_on_a_terminal(start_server, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from dynupdate.cli import simulate as command

    home = tmp_path / "server"
    server = start_server(home, "--poll-interval", "3600", "--no-access-log")
    publish(home, tmp_path, "Trio", "7.2.0")
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=120, color_system=None)
    monkeypatch.setattr(command, "stderr", terminal)
    result = cli(
        tmp_path / "unused-home",
        "simulate",
        "--url", f"https://127.0.0.1:{server.port}",
        "--cafile", server.cafile,
        "-n", 40,
        "--fleet", "Trio=7.1.0",
        "--peripherals", 1,
        "--in-call", "50%",
        "--call-length", "3s",  # 1.5-3 s: the live view refreshes every 0.5 s meanwhile
        "--until-done",
        "--duration", "20s",
        "--json",
    )  # fmt: skip
    assert json.loads(result.stdout)["done"] is True
    frames = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert f"Rehearsal https://127.0.0.1:{server.port}" in frames
    assert re.search(r"polls \d+ \(\d+/s\)  downloaded [0-9.]+ MB  errors: none", frames)
    columns = ["Type", "Devices", "On target", "Pending", "In progress", "Failed", "No policy"]
    assert re.search(" +".join([*columns, "Not polled yet", "Waiting", "Held"]), frames)
    # While the calls last: the other half is done; the cameras have no policy, and
    # those of endpoints in a call are not known yet (so count as managed: 20 of 60).
    assert re.search(r"Trio +40 +20 +0 +0 +0 +0 +20", frames), "20 on target, 20 in a call"
    assert re.search(r"EagleEyeIV +40 +0 +0 +0 +0 +20 +20", frames)
    assert "███████░░░░░░░░░░░░░ 33% on target" in frames
    assert "████████████████████ 100% on target" in frames
    assert re.search(r"Trio +40 +40 +0 +0 +0 +0 +0", frames)


def test_ctrl_c_stops_the_run_and_still_prints_the_summary(start_server, tmp_path):
    import signal
    import subprocess
    import sys

    home = tmp_path / "server"
    server = start_server(home, "--poll-interval", "3600")
    command = [
        sys.executable, "-m", "dynupdate", "--home", str(tmp_path / "unused-home"), "simulate",
        "--url", f"https://127.0.0.1:{server.port}", "--cafile", str(server.cafile),
        "-n", "5", "--fleet", "Nobody=1.0", "--duration", "1h", "--json",
    ]  # fmt: skip
    fleet = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while sum("POST /poll 200" in line for line in server.log) < 5:
            assert fleet.poll() is None and time.monotonic() < deadline, fleet.poll()
            time.sleep(0.02)
        fleet.send_signal(signal.SIGINT)
        out, err = fleet.communicate(timeout=20)
    finally:
        if fleet.poll() is None:
            fleet.kill()
            fleet.communicate()
    assert fleet.returncode == 0, err
    summary = json.loads(out)
    assert summary["polls"] == 5 and summary["counts"]["no-policy"] == 5
    assert summary["elapsed_seconds"] < 20


# -- the pieces ----------------------------------------------------------------------------


def test_parse_fleet_splits_what_is_left():
    assert parse_fleet("A=1:50%, B=2.0-7, C=3") == (
        Share("A", "1", 50.0),
        Share("B", "2.0-7", 25.0),
        Share("C", "3", 25.0),
    )


@pytest.mark.parametrize(
    "text",
    ["", "A=1,,B=2", "A=1:60%,A=1:40%", "A=1:50%,B=1:60%", "=1", "A=", "A=1:-5%"],
)
def test_parse_fleet_refuses(text):
    with pytest.raises(InvalidInput) as refused:
        parse_fleet(text)
    assert f"'{text}'" in str(refused.value)


@pytest.mark.parametrize(
    ("total", "percents", "counts"),
    [(10, [70, 30], [7, 3]), (300, [70, 30], [210, 90]), (7, [50, 25, 25], [3, 2, 2]),
     (1, [50, 50], [1, 0]), (0, [100], [0])],
)  # fmt: skip
def test_split_counts_is_exact(total, percents, counts):
    shares = [Share(f"T{i}", "1", p) for i, p in enumerate(percents)]
    assert split_counts(total, shares) == counts
    assert sum(split_counts(total, shares)) == total


def test_build_fleet_is_deterministic_and_honours_the_shares():
    def fleet():
        return build_fleet(
            100,
            parse_fleet("A=1:60%,B=2:40%"),
            peripherals=2,
            peripheral_shares=parse_fleet("Cam=1"),
            in_call=10,
            fail=5,
            seed=3,
        )

    endpoints, calling = fleet()
    again, calling_again = fleet()
    assert [e.device.type for e in endpoints] == [e.device.type for e in again]
    assert calling == calling_again and len(calling) == 10
    assert sum(e.device.type == "A" for e in endpoints) == 60
    assert sum(e.in_call for e in endpoints) == 10
    assert {len(e.peripherals) for e in endpoints} == {2}
    assert endpoints[0].serial == "SIM000001" and endpoints[0].peripherals[1].serial.endswith("P2")


def test_parse_percent_and_seconds():
    assert parse_percent("5%", "--fail") == parse_percent("5", "--fail") == 5.0
    assert parse_seconds("1h30m", "--duration") == 5400.0
    with pytest.raises(InvalidInput, match="'0'"):
        parse_seconds("0", "--poll-interval")


def test_every_option_is_documented():
    from typer.main import get_command

    root = Path(__file__).parent.parent
    docs = (root / "docs" / "simulate.md").read_text()
    synopsis = docs.split("## `dynupdate simulate`", 1)[1].split("### Example session", 1)[0]
    readme = (root / "README.md").read_text()
    summary = readme.split("### Rehearsing a rollout", 1)[1].split("\n```", 1)[0]
    options = [
        name
        for parameter in get_command(app).commands["simulate"].params
        for name in parameter.opts
        if name.startswith("--") and name != "--help"
    ]
    assert len(options) > 15
    for text, where in ((synopsis, "docs/simulate.md"), (summary, "the README")):
        missing = [name for name in options if not re.search(rf"{name}\b", text)]
        assert missing == [], f"options of simulate not in {where}"
