"""Database faults and crashes under the real ``dynupdate serve`` (issue 5, items 3 and 4).

A write lock held by someone else, a full disk (``RLIMIT_FSIZE`` on the
server process) and ``kill -9`` mid-stream: polls keep being answered,
reports wait or get ``503`` with ``Retry-After`` (never ``500``, never a
hang), and no report the server acknowledged is lost.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import resource
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import ServerProcess
from lxml import etree

from dynupdate.core.db import connect
from dynupdate.core.registry import Sighting
from dynupdate.recording import EndpointWriter

BUSY_TIMEOUT = 15.0  # seconds: dynupdate.core.db.BUSY_TIMEOUT_MS
# The issue says 10 s; 6 s shows the same (a lock held well past any poll) and keeps CI fast.
LOCK_HELD = 6.0
DEVICES = 40  # per report in the kill -9 test


def poll_body(serial: str, type_: str = "Faulty", version: str = "1.0") -> bytes:
    return (
        f'<poll protocol="1"><endpoint serial="{serial}" type="{type_}"'
        f' version="{version}"/></poll>'
    ).encode()


def report_body(serial: str, version: str = "2.0", state: str = "installed") -> bytes:
    return (
        f'<report protocol="1"><device serial="{serial}" type="Faulty" version="{version}"'
        f' state="{state}"/></report>'
    ).encode()


def poll(server: ServerProcess, serial: str) -> float:
    """Poll once; the seconds it took."""
    started = time.monotonic()
    status, headers, data = server.request("POST", "/poll", poll_body(serial))
    assert status == 200 and headers["Content-Type"] == "application/xml", data
    assert etree.fromstring(data).tag == "pollResponse"
    return time.monotonic() - started


def report(server: ServerProcess, serial: str, version: str = "2.0", timeout: float = 30):
    conn = server.connection(timeout=timeout)
    try:
        conn.request("POST", "/report", body=report_body(serial, version))
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def stored_report(home: Path, serial: str) -> tuple[str, str] | None:
    with contextlib.closing(sqlite3.connect(home / "dynupdate.db")) as db:
        return db.execute(
            "SELECT report_state, report_version FROM endpoints WHERE serial = ?", (serial,)
        ).fetchone()


def polls_stored(home: Path, prefix: str) -> int:
    with contextlib.closing(sqlite3.connect(home / "dynupdate.db")) as db:
        query = "SELECT count(*) FROM endpoints WHERE last_poll IS NOT NULL AND serial LIKE ?"
        return db.execute(query, (prefix + "%",)).fetchone()[0]


def assert_unavailable(status: int, headers: dict, data: bytes) -> None:
    assert status == 503, data
    assert headers["Content-Type"] == "application/xml"
    assert int(headers["Retry-After"]) > 0
    assert etree.fromstring(data).get("code") == "unavailable"


@pytest.mark.slow
def test_a_held_write_lock_never_delays_polls_and_reports_wait(start_server, home_dir):
    server = start_server(home_dir)
    poll(server, "LOCK-1")
    assert report(server, "LOCK-1", "1.0")[0] == 200

    lock = sqlite3.connect(home_dir / "dynupdate.db", isolation_level=None, timeout=5)
    answer: dict = {}

    def send_report() -> None:
        started = time.monotonic()
        try:
            answer["result"] = report(server, "LOCK-1", "2.0", timeout=BUSY_TIMEOUT + 10)
        except Exception as e:  # reported below
            answer["error"] = e
        answer["seconds"] = time.monotonic() - started

    reporter = threading.Thread(target=send_report)
    try:
        lock.execute("BEGIN IMMEDIATE")  # a CLI command's write transaction, held
        locked = time.monotonic()
        reporter.start()
        timings = []
        pace = threading.Event()
        while time.monotonic() - locked < LOCK_HELD:
            timings.append(poll(server, f"LOCK-POLL-{len(timings)}"))
            pace.wait(0.1)  # paces this client; it does not wait for the server
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
    reporter.join(timeout=BUSY_TIMEOUT + 15)
    assert not reporter.is_alive(), "a report hung past the busy timeout"

    assert len(timings) > 20 and max(timings) < 1.0, f"polls under a held lock: {timings}"
    assert "error" not in answer, answer
    status, headers, data = answer["result"]
    assert answer["seconds"] < BUSY_TIMEOUT + 2
    if status == 200:
        assert stored_report(home_dir, "LOCK-1") == ("installed", "2.0")
    else:
        assert_unavailable(status, headers, data)
    # The polls queued meanwhile are written once the lock is gone.
    deadline = time.monotonic() + 3
    while polls_stored(home_dir, "LOCK-POLL-") < len(timings) and time.monotonic() < deadline:
        threading.Event().wait(0.05)
    assert polls_stored(home_dir, "LOCK-POLL-") == len(timings)
    server.assert_no_traceback()


def test_a_full_disk_answers_503_to_reports_and_polls_go_on(start_server, home_dir):
    server = start_server(home_dir)
    poll(server, "FULL-1")
    assert report(server, "FULL-1", "1.0")[0] == 200
    pid = server.process.pid
    # No write may reach past the first KiB of any file: every WAL frame fails (EFBIG).
    # Only the soft limit: raising a hard limit again needs privileges.
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (1024, hard))
    try:
        try:
            result = report(server, "FULL-1", "2.0")
        except (OSError, http.client.HTTPException) as e:
            result = e
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.process.wait(timeout=2)
        code = server.process.poll()
        assert code is None, (
            f"the server died on a full disk (exit {code}; -{signal.SIGXFSZ} is SIGXFSZ)"
        )
        assert_unavailable(*result)
        assert poll(server, "FULL-2") < 1.0
        assert poll(server, "FULL-3") < 1.0
        assert report(server, "FULL-3")[0] == 503
    finally:
        if server.process.poll() is None:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
    # Space is back: the next report is stored, and nothing refused was kept.
    assert report(server, "FULL-1", "3.0")[0] == 200
    assert stored_report(home_dir, "FULL-1") == ("installed", "3.0")
    assert stored_report(home_dir, "FULL-3") == (None, None)  # its poll, not its report
    with contextlib.closing(sqlite3.connect(home_dir / "dynupdate.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # Each refused report is one log line naming the error, not a traceback.
    server.stop()
    refused = [line for line in server.log if "Could not store a report" in line]
    assert len(refused) == 2 and all("answered 503" in line for line in refused), server.log
    server.assert_no_traceback()


def wait_stored(home: Path, prefix: str, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while (stored := polls_stored(home, prefix)) < count:
        assert time.monotonic() < deadline, f"{stored} of {count} {prefix}* polls recorded"
        pause.wait(0.05)


def test_polls_during_a_full_disk_are_recorded_once_space_is_back(start_server, home_dir):
    """Issue 9, item 10: answered polls are kept, written later, and logged once."""
    server = start_server(home_dir, "--no-access-log")
    poll(server, "SPACE-0")
    wait_stored(home_dir, "SPACE-", 1)
    pid = server.process.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (1024, hard))  # every WAL frame fails: EFBIG
    try:
        pace = threading.Event()
        for n in range(1, 11):
            assert poll(server, f"SPACE-{n}") < 1.0
            pace.wait(0.1)  # paces this client over several grouped writes (every 0.2 s)
        assert poll(server, "SPACE-3") < 1.0  # a device polling twice is kept once
        # A report is never acknowledged unless stored, even for a device whose poll is kept.
        assert_unavailable(*report(server, "SPACE-3"))
        assert polls_stored(home_dir, "SPACE-") == 1
        assert server.process.poll() is None
    finally:
        if server.process.poll() is None:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
    # Space is back: the kept polls are written without waiting for another poll.
    wait_stored(home_dir, "SPACE-", 11)
    assert report(server, "SPACE-3")[0] == 200
    server.stop()
    # About polls (reports get a line each, as they get a 503 each): one line per episode.
    lines = [line for line in server.log if "record" in line and "report" not in line]
    started = [line for line in lines if "cannot record polls" in line]
    ended = [line for line in lines if "recorded 10 polls kept during" in line]
    assert len(started) == 1 and "registrations to retry" in started[0], lines
    assert len(ended) == 1 and len(lines) == 2, lines
    server.assert_no_traceback()


def test_the_writer_keeps_a_bounded_number_of_polls_while_the_database_is_full(
    home, home_dir, caplog
):
    """The bound on kept polls, with a real SQLITE_FULL: a page limit on the writer's database."""

    def full_database(path: Path):
        db = connect(path)
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")  # no room to grow
        return db

    def sightings(prefix: str, count: int) -> list:
        now = datetime.now(UTC)
        return [(Sighting(f"{prefix}-{n:03d}", "Faulty", "1.0"), now) for n in range(count)]

    def lines(text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if text in r.getMessage()]

    path = home_dir / "dynupdate.db"
    writer = EndpointWriter(path, flush_interval=0.05, max_unrecorded=50, connect_db=full_database)
    with caplog.at_level(logging.INFO, logger="dynupdate.serve"):
        writer.start()
        writer.polls(sightings("FIRST", 120))  # 50 kept, 70 dropped
        deadline = time.monotonic() + 10
        pause = threading.Event()
        while not lines("cannot keep more than"):
            assert time.monotonic() < deadline, caplog.text
            pause.wait(0.02)
        writer.polls(sightings("FIRST", 10) + sightings("LATER", 10))  # 10 kept anew, 10 dropped
        writer.stop()
    [started] = lines("cannot record polls")
    assert "database or disk is full" in started and "keeping 50 registrations" in started
    [dropped] = lines("cannot keep more than")
    assert "50 registrations" in dropped
    [stopped] = lines("stopping with")
    assert "50 polls not recorded" in stopped
    assert len(caplog.records) == 3, caplog.text
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*) FROM endpoints").fetchone()[0] == 0


def test_kill_9_under_load_loses_no_acknowledged_report(start_server, home_dir):
    server = start_server(home_dir, "--no-access-log")
    acked: list[tuple[str, str]] = []
    killed = threading.Event()
    counting = threading.Lock()
    failures: list[BaseException] = []

    def sender(prefix: str) -> None:
        conn = server.connection(timeout=10)
        try:
            for i in range(5000):
                # Several devices a report: the server has real work between its answer
                # and the end of its COMMIT, were it to answer first.
                devices = [(f"{prefix}-{i}-{d}", f"1.{i}.{d}") for d in range(DEVICES)]
                # Only a device that has polled may report: the first is the endpoint.
                peripherals = "".join(
                    f'<peripheral serial="{serial}" type="Faulty" version="1.0"/>'
                    for serial, _ in devices[1:]
                )
                first = devices[0][0]
                poll_xml = poll_body(first).decode().replace("</poll>", peripherals + "</poll>")
                body = "".join(
                    f'<device serial="{serial}" type="Faulty" version="{version}"'
                    ' state="installed"/>'
                    for serial, version in devices
                )
                try:
                    conn.request("POST", "/poll", body=poll_xml)
                    conn.getresponse().read()
                    conn.request("POST", "/report", body=f'<report protocol="1">{body}</report>')
                    response = conn.getresponse()
                    response.read()
                except (OSError, http.client.HTTPException):
                    return  # the server is gone
                if response.status != 200:
                    failures.append(AssertionError(f"{devices[0]}: {response.status}"))
                    return
                with counting:
                    acked.extend(devices)
                    if len(acked) == 60 * DEVICES:
                        # At once, from the thread that saw the answer: a server that
                        # answered before its COMMIT was durable is caught in the gap.
                        os.kill(server.process.pid, signal.SIGKILL)
                        killed.set()
        finally:
            conn.close()

    senders = [threading.Thread(target=sender, args=(f"KILL{n}",)) for n in range(3)]
    for thread in senders:
        thread.start()
    try:
        assert killed.wait(timeout=30), f"only {len(acked)} reports acknowledged"
    finally:
        if not killed.is_set():
            server.process.kill()
        server.process.wait(timeout=10)
        for thread in senders:
            thread.join(timeout=15)
    assert not failures, failures
    assert server.process.returncode == -signal.SIGKILL

    with contextlib.closing(sqlite3.connect(home_dir / "dynupdate.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = dict(
            db.execute(
                "SELECT serial, report_version FROM endpoints WHERE"
                " serial LIKE 'KILL%' AND report_state = 'installed'"
            )
        )
        history = set(
            db.execute("SELECT serial, version FROM endpoint_history WHERE event = 'installed'")
        )
    lost = [(s, v) for s, v in acked if rows.get(s) != v or (s, v) not in history]
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged reports lost: {lost[:5]}"

    again = ServerProcess(home_dir, "--no-access-log")  # the killed server's home starts again
    try:
        assert poll(again, "AFTER-KILL") < 1.0
        assert report(again, "AFTER-KILL")[0] == 200
    finally:
        again.stop()


FSIZE_SCRIPT = """
import errno, os, resource, signal, sys
from dynupdate.server.messages import Response
from dynupdate.server.workers import run

signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # as in a program embedding Python

async def app(request):
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(4):
            os.write(fd, b"x" * 1024)
        answer = "written"
    except OSError as e:
        answer = errno.errorcode[e.errno]
    finally:
        os.close(fd)
    return Response(200, [("Content-Type", "text/plain")], answer.encode())

def ready(addresses):
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))
    print(addresses[0][1], flush=True)

run(lambda: app, "127.0.0.1", 0, None, workers=1, ready=ready)
"""


def test_a_file_size_limit_is_an_error_not_the_servers_death(tmp_path):
    script = tmp_path / "fsize.py"
    script.write_text(FSIZE_SCRIPT)
    args = [sys.executable, "-B", str(script), str(tmp_path / "big")]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([process.stdout], [], [], 15)[0], "the server did not start"
        port = int(process.stdout.readline())
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/")
            answer = conn.getresponse().read()
        except (OSError, http.client.HTTPException) as e:
            answer = repr(e).encode()
        finally:
            conn.close()
        assert answer == b"EFBIG", (answer, process.poll())
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
    assert process.returncode == 0
