"""Staged rollouts in the poll server, over real HTTPS on 127.0.0.1 (SPEC section 6).

The rollout's state is read straight from the database, never through a
``rollout`` command: every such command evaluates the gates itself, and these
tests are about what the server does on its own.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from lxml import etree

from dynupdate.core.waves import bucket

GS, CAM = "GroupSeries", "EagleEyeIV"
POLL = (
    '<poll protocol="1"><endpoint serial="{serial}" type="{type}" version="{version}"/>'
    "{peripherals}</poll>"
)


@pytest.fixture
def gs(cli, make_file):
    """GroupSeries: 6.2.1 the version to use (exact), 6.2.2 uploaded to roll out."""
    cli("package", "add", make_file(b"6.2.1" * 50), "--type", GS, "--version", "6.2.1")
    cli("policy", "set", GS, "--version", "6.2.1")
    cli("package", "add", make_file(b"6.2.2" * 50), "--type", GS, "--version", "6.2.2")
    return cli


def serials_in(low: int, high: int, count: int, prefix: str = "D") -> list[str]:
    """``count`` serials whose bucket is in [low, high)."""
    found, n = [], 0
    while len(found) < count:
        serial = f"{prefix}{n}"
        if low <= bucket(serial) < high:
            found.append(serial)
        n += 1
    return found


def poll(server, serial, version, type_=GS, peripherals=(), conn=None) -> list[etree._Element]:
    """One poll; the answer's children (endpoint first), with serverTime on each."""
    extra = "".join(
        f'<peripheral serial="{s}" type="{t}" version="{v}"/>' for s, t, v in peripherals
    )
    body = POLL.format(serial=serial, type=type_, version=version, peripherals=extra)
    if conn is None:
        status, _headers, data = server.request("POST", "/poll", body)
    else:
        conn.request("POST", "/poll", body=body)
        response = conn.getresponse()
        status, data = response.status, response.read()
    assert status == 200, data
    root = etree.fromstring(data)
    for child in root:
        child.set("serverTime", root.get("serverTime"))
    return list(root)


def said(answer: etree._Element) -> str:
    """``update 6.2.2`` or the noUpdate reason."""
    if answer.tag == "update":
        return f"update {answer.get('version')}"
    return answer.get("reason")


def report(server, serial, version, state, detail="", type_=GS) -> None:
    body = (
        f'<report protocol="1"><device serial="{serial}" type="{type_}" version="{version}"'
        f' state="{state}" detail="{detail}"/></report>'
    )
    status, _headers, data = server.request("POST", "/report", body)
    assert status == 200, data


def db_row(home: Path, sql: str, *params):
    conn = sqlite3.connect(f"file:{home / 'dynupdate.db'}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchone()
    finally:
        conn.close()


def offered(home: Path, serial: str) -> str | None:
    """The version recorded as offered to a device, once its poll is written."""
    sql = "SELECT offered_version FROM endpoints WHERE serial = ?"
    return wait_for(lambda: db_row(home, sql, serial), f"{serial}'s poll to be written")[0]


def rollout_state(home: Path) -> tuple[str, int]:
    return db_row(home, "SELECT state, wave FROM rollouts ORDER BY id DESC LIMIT 1")


def wait_for(condition, what: str, timeout: float = 20.0):
    """Poll ``condition`` until it is true (returned) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def server_entries(cli) -> list[tuple[str, str]]:
    return [(e["action"], e["actor"]) for e in cli.json("log", "--limit", "0")]


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# The decision ----------------------------------------------------------------------------


def test_admitted_staged_up_to_date_and_the_stable_target(gs, start_server, home_dir):
    gs("rollout", "start", GS, "--version", "6.2.2", "--waves", "10%,100%")
    server = start_server(home_dir)
    inside, outside, old = serials_in(0, 1000, 1), *serials_in(1000, 10_000, 2, "L")
    (inside,) = inside
    assert said(poll(server, inside, "6.2.1")[0]) == "update 6.2.2"
    # Not admitted: the stable decision, with up-to-date answered staged.
    assert said(poll(server, outside, "6.2.1")[0]) == "staged"
    assert said(poll(server, old, "6.2.0")[0]) == "update 6.2.1"
    # On V or newer, admitted or not: up-to-date.
    for serial in (inside, outside):
        assert said(poll(server, serial, "6.2.2")[0]) == "up-to-date"
    assert said(poll(server, outside, "6.3")[0]) == "up-to-date"
    # Only a real offer of V is recorded as one.
    assert offered(home_dir, outside) is None
    assert offered(home_dir, inside) == "6.2.2"


def test_peripherals_follow_their_endpoint_and_trial_devices_lead(cli, make_file, start_server,
                                                                  home_dir):  # fmt: skip
    cli("package", "add", make_file(b"cam 1.4"), "--type", CAM, "--version", "1.4.0")
    cli("policy", "set", CAM, "--version", "1.4.0")
    cli("package", "add", make_file(b"cam 1.5"), "--type", CAM, "--version", "1.5.0")
    cli("rollout", "start", CAM, "--version", "1.5.0", "--waves", "10%,100%")
    server = start_server(home_dir)
    (low_end,), (high_end,) = serials_in(0, 1000, 1, "E"), serials_in(1000, 10_000, 1, "E")
    (low_cam,), (high_cam,) = serials_in(0, 1000, 1, "C"), serials_in(1000, 10_000, 1, "C")
    # A camera on an endpoint of the first wave is admitted whatever its own bucket ...
    answers = poll(server, low_end, "6.2.1", peripherals=[(high_cam, CAM, "1.4.0")])
    assert said(answers[1]) == "update 1.5.0"
    # ... and one on a later endpoint waits, even with a first-wave serial.
    answers = poll(server, high_end, "6.2.1", peripherals=[(low_cam, CAM, "1.4.0")])
    assert said(answers[1]) == "staged"
    # A trial endpoint's peripherals are trial devices.
    cli("trial", "add", high_end)
    answers = poll(server, high_end, "6.2.1", peripherals=[(low_cam, CAM, "1.4.0")])
    assert said(answers[1]) == "update 1.5.0"


def test_a_trial_wave_offers_the_trial_devices_alone(gs, start_server, home_dir):
    (trial_serial,), (other,) = serials_in(9000, 10_000, 1, "T"), serials_in(0, 100, 1, "O")
    gs("trial", "add", trial_serial)
    gs("rollout", "start", GS, "--version", "6.2.2", "--waves", "trial,100%")
    server = start_server(home_dir)
    assert said(poll(server, trial_serial, "6.2.1")[0]) == "update 6.2.2"
    assert said(poll(server, other, "6.2.1")[0]) == "staged"


def test_paused_or_halted_offers_v_to_nobody(gs, start_server, home_dir):
    first = serials_in(0, 10_000, 3)
    gs("rollout", "start", GS, "--version", "6.2.2", "--waves", "100%", "--max-failures", "1")
    server = start_server(home_dir)
    assert said(poll(server, first[0], "6.2.1")[0]) == "update 6.2.2"
    gs("rollout", "pause", GS)
    # Paused: even the device with an attempt open is not offered V again.
    assert [said(poll(server, s, "6.2.1")[0]) for s in first[:2]] == ["staged", "staged"]
    gs("rollout", "resume", GS)
    assert said(poll(server, first[1], "6.2.1")[0]) == "update 6.2.2"
    report(server, first[1], "6.2.2", "failed", "flash error")
    assert rollout_state(home_dir)[0] == "halted"
    assert said(poll(server, first[2], "6.2.1")[0]) == "staged"


def test_held_after_max_attempts(gs, start_server, home_dir):
    (serial,) = serials_in(0, 10_000, 1)
    gs("rollout", "start", GS, "--version", "6.2.2", "--waves", "100%", "--max-attempts", "2",
       "--max-failures", "10")  # fmt: skip
    server = start_server(home_dir)
    for attempt in range(2):
        assert said(poll(server, serial, "6.2.1")[0]) == "update 6.2.2", attempt
        # Polls during an open attempt get V again without opening another.
        assert said(poll(server, serial, "6.2.1")[0]) == "update 6.2.2", attempt
        report(server, serial, "6.2.2", "failed", f"attempt {attempt}")
    assert said(poll(server, serial, "6.2.1")[0]) == "held"
    assert db_row(home_dir, "SELECT count(*) FROM rollout_attempts") == (2,)
    gs("endpoint", "retry", serial)
    assert said(poll(server, serial, "6.2.1")[0]) == "update 6.2.2"


# Outcomes and gates ----------------------------------------------------------------------


@pytest.mark.slow
def test_verified_success_opens_the_next_wave_then_completes(gs, start_server, home_dir):
    (first,), (second,) = serials_in(0, 5000, 1, "A"), serials_in(5000, 10_000, 1, "B")
    # Two workers, each evaluating the gates: each transition is made (and logged) once.
    server = start_server(home_dir, "--workers", "2")
    for serial in (first, second):
        poll(server, serial, "6.2.1")  # known devices: each wave has live devices
    gs("rollout", "start", GS, "--version", "6.2.2", "--waves", "50%,100%", "--soak", "1s",
       "--min-devices", "1", "--install-timeout", "1h")  # fmt: skip
    assert said(poll(server, first, "6.2.1")[0]) == "update 6.2.2"
    assert said(poll(server, second, "6.2.1")[0]) == "staged"
    report(server, first, "6.2.2", "installed")
    # An installed report alone verifies nothing: the wave stays.
    assert db_row(home_dir, "SELECT count(succeeded_at) FROM rollout_devices") == (0,)
    assert said(poll(server, first, "6.2.2")[0]) == "up-to-date"  # back on V: verified
    wait_for(lambda: rollout_state(home_dir) == ("running", 2), "the server to open wave 2")
    assert said(poll(server, second, "6.2.1")[0]) == "update 6.2.2"
    poll(server, second, "6.2.2")
    wait_for(lambda: rollout_state(home_dir)[0] == "completed", "the server to complete")
    assert gs.json("policy", "show", GS)["version_to_use"] == "6.2.2"
    entries = server_entries(gs)
    assert entries.count(("rollout.wave-opened", "server")) == 1
    assert entries.count(("rollout.completed", "server")) == 1
    lines = "".join(server.log)
    assert lines.count("rollout: GroupSeries 6.2.2 wave 2 opened") == 1
    assert lines.count("rollout: GroupSeries 6.2.2 completed") == 1
    server.assert_no_traceback()


def test_a_failed_report_halts_before_it_is_answered(gs, start_server, home_dir):
    devices = serials_in(0, 10_000, 2)
    gs("rollout", "start", GS, "--version", "6.2.2", "--waves", "100%", "--max-failures", "1")
    server = start_server(home_dir)
    assert said(poll(server, devices[0], "6.2.1")[0]) == "update 6.2.2"
    report(server, devices[0], "6.2.2", "failed", "boot loop")
    # Read as soon as the answer came: the halt was committed with the report.
    state, reason = db_row(home_dir, "SELECT state, halt_reason FROM rollouts")
    assert (state, reason) == ("halted", "1 failed devices reached --max-failures 1")
    assert said(poll(server, devices[1], "6.2.1")[0]) == "staged"
    assert ("rollout.halted", "server") in server_entries(gs)
    wait_for(lambda: "rollout: GroupSeries 6.2.2 halted" in "".join(server.log), "the log line")
    server.assert_no_traceback()


def test_an_attempt_past_its_install_timeout_fails_and_halts(gs, start_server, home_dir):
    (serial,) = serials_in(0, 10_000, 1)
    gs("rollout", "start", GS, "--version", "6.2.2", "--waves", "100%", "--max-failures", "1",
       "--install-timeout", "2s", "--soak", "1h")  # fmt: skip
    server = start_server(home_dir)
    assert said(poll(server, serial, "6.2.1")[0]) == "update 6.2.2"
    # The device goes silent: the server's own evaluation times it out.
    wait_for(lambda: rollout_state(home_dir)[0] == "halted", "the server to halt")
    assert db_row(home_dir, "SELECT detail FROM rollout_devices") == ("timed out",)
    assert "".join(server.log).count("rollout: GroupSeries 6.2.2 halted") == 1


# Limits ----------------------------------------------------------------------------------


def test_max_in_flight_is_never_exceeded_by_concurrent_pollers(gs, start_server, home_dir):
    pollers, rounds, cap = 50, 8, 5
    gs("rollout", "start", GS, "--version", "6.2.2", "--waves", "100%",
       "--max-in-flight", str(cap))  # fmt: skip
    server = start_server(home_dir, "--workers", "2")
    serials = serials_in(0, 10_000, pollers, "P")
    offers: Counter[str] = Counter()
    limited: list[etree._Element] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    go = threading.Barrier(pollers)

    def run(serial: str) -> None:
        try:
            conn = server.connection(timeout=30)
            go.wait()
            for _ in range(rounds):
                (answer,) = poll(server, serial, "6.2.1", conn=conn)
                with lock:
                    if answer.tag == "update":
                        offers[serial] += 1
                    else:
                        limited.append(answer)
            conn.close()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in serials]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors[0]
    print(f"devices offered V: {len(offers)} (cap {cap}); offers {sum(offers.values())}")
    # No attempt ended, so the slots never freed: exactly the cap, never more.
    assert len(offers) == cap
    # ... and those five got V at every poll (their attempt stays open).
    assert set(offers.values()) == {rounds}
    assert len(limited) == (pollers - cap) * rounds
    for answer in limited:
        assert answer.get("reason") == "rate-limited"
        assert utc(answer.get("retryAt")) >= utc(answer.get("serverTime")) + timedelta(seconds=60)
    assert db_row(home_dir, "SELECT count(*) FROM rollout_attempts") == (cap,)
    assert db_row(home_dir, "SELECT count(*) FROM rollout_devices WHERE open_at IS NOT NULL") == (
        cap,
    )
    server.assert_no_traceback()


def test_max_per_hour_answers_rate_limited_with_retry_at(gs, start_server, home_dir):
    devices = serials_in(0, 10_000, 3)
    gs("rollout", "start", GS, "--version", "6.2.2", "--waves", "100%", "--max-per-hour", "2")
    server = start_server(home_dir)
    assert [said(poll(server, s, "6.2.1")[0]) for s in devices[:2]] == ["update 6.2.2"] * 2
    (answer,) = poll(server, devices[2], "6.2.1")
    assert answer.get("reason") == "rate-limited"
    # The first attempt of the hour ages out an hour after it opened.
    retry, now = utc(answer.get("retryAt")), utc(answer.get("serverTime"))
    assert retry >= now + timedelta(minutes=59)
    assert offered(home_dir, devices[2]) is None


def test_event_lines_are_logged_printable(caplog):
    from dynupdate import recording

    with caplog.at_level("WARNING", logger="dynupdate.serve"):
        recording._log_events(["GroupSeries 6.2.2: A\x1b[2J\u202e timed out"])
    (line,) = caplog.messages
    assert line == "rollout: GroupSeries 6.2.2: A\\x1b[2J\\u202e timed out"


def test_gates_that_cannot_be_evaluated_log_one_line_until_they_can(gs, home_dir, caplog):
    from dynupdate.core.db import connect
    from dynupdate.recording import EndpointWriter

    gs("rollout", "start", GS, "--version", "6.2.2")
    checks: list[str] = []
    denied = threading.Event()
    denied.set()

    def deny(action, table, *_):
        refuse = denied.is_set() and table == "rollout_devices"
        return sqlite3.SQLITE_DENY if refuse else sqlite3.SQLITE_OK

    def connect_db(path: Path):
        db = connect(path)
        db.conn.set_authorizer(deny)  # every evaluation fails, as on a broken database
        db.conn.set_trace_callback(
            lambda sql: checks.append(sql) if sql.startswith("SELECT 1 FROM rollouts") else None
        )
        return db

    writer = EndpointWriter(home_dir / "dynupdate.db", flush_interval=0.02,
                            connect_db=connect_db, gate_interval=0.02)  # fmt: skip
    with caplog.at_level("INFO", logger="dynupdate.serve"):
        writer.start()
        wait_for(lambda: len(checks) >= 5, "five evaluations")
        denied.clear()
        wait_for(lambda: "rollout gates evaluated again" in caplog.messages, "a working one")
        writer.stop()
    failing = [m for m in caplog.messages if "Could not evaluate" in m]
    assert len(failing) == 1 and "rollout_devices" in failing[0], caplog.messages
    assert "Traceback" not in caplog.text


def test_the_poll_paths_shortcuts_decide_as_section_6(gs, home_dir):
    """The server skips the bucket and the attempts read where they cannot change the
    answer (a rollout that does not run, a trial-only or 100 % wave, a trial device, a
    device on V or in a call): every answer equals section 6's decision given the
    device's whole standing, in every state and wave of a rollout."""
    from dynupdate.core.attempts import device_standing, reserve_attempt
    from dynupdate.core.decision import DeviceState, Standing, decide_rollout
    from dynupdate.core.gates import RolloutOptions
    from dynupdate.core.home import open_home
    from dynupdate.core.rollouts import (
        advance_rollout,
        pause_rollout,
        resume_rollout,
        start_rollout,
    )
    from dynupdate.core.trial import add_trial
    from dynupdate.core.waves import parse_waves
    from dynupdate.serve import PollApp

    home = open_home(home_dir)
    app = PollApp(home)
    app.start()
    try:
        db = home.db
        trial_endpoint, trial_camera = "T-EP", "T-CAM"
        add_trial(db, [trial_endpoint, trial_camera])
        options = RolloutOptions(waves=parse_waves("trial,1%,50%,100%"), manual=True)
        start_rollout(db, GS, "6.2.2", options)
        leads = [
            *serials_in(0, 100, 2, "A"),  # the 1 % wave
            *serials_in(100, 5000, 2, "B"),  # the 50 % wave
            *serials_in(5000, 10_000, 2, "C"),  # only at 100 %
            trial_endpoint,
        ]
        devices = [(lead, lead) for lead in leads]
        devices += [(trial_camera, leads[4]), (f"{leads[0]}-cam", leads[0])]
        now = datetime.now().astimezone()
        reserve_attempt(db, app.fleet().of(GS).rollout.id, leads[0], None, now=now)

        def check(phase: str) -> None:
            fleet = app.fleet()
            active = fleet.of(GS).rollout
            for serial, lead in devices:
                in_trial = serial in fleet.trial or lead in fleet.trial
                _, held, attempt_open = device_standing(db, active.id, serial, 3)
                whole = Standing(bucket(lead), in_trial, held, attempt_open)
                for version in ("6.2.0", "6.2.1", "6.2.2", "6.3"):
                    for in_call in (False, True):
                        state = DeviceState(serial, GS, version, in_call, None)
                        expected = decide_rollout(active.view, whole, fleet.window, state, now)
                        got = app._decide_in_rollout(fleet, active, state, lead, now)
                        assert got == expected, (phase, serial, version, in_call)

        check("trial wave")
        for phase in ("1% wave", "50% wave", "100% wave"):
            advance_rollout(db, GS)
            check(phase)
            pause_rollout(db, GS)
            check(f"{phase}, paused")
            resume_rollout(db, GS)
        with sqlite3.connect(home_dir / "dynupdate.db") as conn:
            conn.execute("UPDATE rollouts SET state = 'halted', halt_reason = 'test'")
        check("halted")
    finally:
        app.close()
