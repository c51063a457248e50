"""--log-format: the text lines as they always were, or one JSON object a line."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import time

import pytest
from test_httpd import Running, assert_recent_utc, read_response, wait_for
from test_workers import _workers

from dynupdate.server.logs import LogFormat, connection_line
from dynupdate.server.messages import Request, Response
from dynupdate.server.tls import ensure_self_signed, server_context

# What a client may put in a request target (httptools refuses control and non-ASCII
# bytes there) and what an app may repeat of a device's text: quotes, backslashes,
# a newline, ESC, NUL, a bidi override.
HOSTILE_TARGET = b"/p\"a\\t%0a'<>{}"
HOSTILE_DETAIL = 'SN"1\\ poll\nforged line \x1b[31m\x00 \u202e'


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory):
    return ensure_self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def serve(tls_files):
    """A Server on 127.0.0.1 in a thread of this process (its app and options given)."""
    started: list[Running] = []

    def start(app=None, **options) -> Running:
        running = Running(app or _repeat, server_context(*tls_files), **options).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def connect(tls_files):
    opened: list[socket.socket] = []
    client = ssl.create_default_context(cafile=str(tls_files[0]))

    def open_tls(running: Running) -> socket.socket:
        sock = client.wrap_socket(
            socket.create_connection(("127.0.0.1", running.port), timeout=5),
            server_hostname="127.0.0.1",
        )
        opened.append(sock)
        return sock

    yield open_tls
    for sock in opened:
        sock.close()


async def _repeat(request: Request) -> Response:
    return Response(200, [("Content-Type", "text/plain")], b"ok", log=HOSTILE_DETAIL)


def _get(sock: socket.socket, target: bytes) -> int:
    sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    return read_response(sock.makefile("rb"))[0]


def test_json_access_lines_escape_what_clients_sent(serve, connect):
    lines: list[str] = []
    running = serve(_repeat, access_log=lines.append, log_format="json")
    assert _get(connect(running), HOSTILE_TARGET) == 200
    assert wait_for(lambda: len(lines) == 1)
    line = lines[0]
    # One line, nothing a terminal would obey: every such character is an escape.
    assert line.isascii() and line.isprintable(), line
    record = json.loads(line)
    assert list(record) == [
        "time", "kind", "client", "method", "path", "status", "bytes", "duration_ms", "detail"
    ]  # fmt: skip
    assert_recent_utc(record["time"])
    assert record["kind"] == "access" and record["client"] == "127.0.0.1"
    assert record["method"] == "GET" and record["status"] == 200 and record["bytes"] == 2
    assert record["path"] == HOSTILE_TARGET.decode("latin-1")
    assert record["detail"] == HOSTILE_DETAIL
    assert isinstance(record["duration_ms"], float) and record["duration_ms"] >= 0


def test_text_access_lines_are_unchanged(serve, connect):
    lines: list[str] = []
    running = serve(_repeat, access_log=lines.append)
    assert _get(connect(running), HOSTILE_TARGET) == 200
    assert wait_for(lambda: len(lines) == 1)
    stamp, rest = lines[0].split(" ", 1)
    assert_recent_utc(stamp)
    # The detail as the app wrote it (what it puts there is the app's business).
    assert re.fullmatch(
        re.escape(f"127.0.0.1 GET {HOSTILE_TARGET.decode()} 200 2 ")
        + r"\d+\.\dms "
        + re.escape(HOSTILE_DETAIL),
        rest,
    ), rest


def test_json_connection_lines(serve):
    lines: list[str] = []
    running = serve(connection_log=lines.append, log_format="json")
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(plain.makefile("rb"))[0] == 400
    assert wait_for(lambda: len(lines) == 1)
    record = json.loads(lines[0])
    assert_recent_utc(record.pop("time"))
    assert record == {
        "kind": "connection",
        "client": "127.0.0.1",
        "message": "plain HTTP on the HTTPS port: the client must use https://",
    }


@pytest.mark.parametrize("fmt", list(LogFormat))
def test_the_count_of_lines_not_logged(fmt):
    line = connection_line(fmt, "2026-12-02T13:04:05Z", None, "3 more connection failures "
                           "not logged (at most 20 lines in 60 s)", not_logged=3)  # fmt: skip
    if fmt is LogFormat.TEXT:
        assert line == (
            "2026-12-02T13:04:05Z 3 more connection failures not logged (at most 20 lines in 60 s)"
        )
    else:
        assert json.loads(line) == {
            "time": "2026-12-02T13:04:05Z",
            "kind": "connection",
            "client": None,
            "message": "3 more connection failures not logged (at most 20 lines in 60 s)",
            "not_logged": 3,
        }


# ---------------------------------------------------------------------------
# The real server: every line it writes while serving is one JSON object


POLL = (
    '<poll protocol="1"><endpoint serial="{serial}" type="Group&quot;Series" '
    'version="6.2.1" in-call="false"/></poll>'
)


def _records(server) -> list[dict]:
    """The JSON lines of the log (the lines before "Serving" are for the admin at start)."""
    log = server.log[next(i for i, line in enumerate(server.log) if "Serving" in line) + 1 :]
    return [json.loads(line) for line in log]


def _wait_for(server, text: str) -> None:
    end = time.monotonic() + 20
    while not any(text in line for line in server.log):
        assert time.monotonic() < end, f"no {text!r} in the log:\n" + "".join(server.log)
        time.sleep(0.05)


def test_serve_log_format_json(start_server, home_dir):
    server = start_server(home_dir, "--log-format", "json", "--workers", "2")
    serial = 'Q"1\\é'
    body = POLL.format(serial=serial.replace('"', "&quot;"))
    headers = {"Content-Type": "application/xml"}
    status, _, answer = server.request("POST", "/poll", body.encode(), headers)
    assert status == 200, answer
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert plain.recv(12) == b"HTTP/1.1 400"
    _wait_for(server, '"kind": "connection"')
    server.process.send_signal(signal.SIGHUP)
    _wait_for(server, "Reloaded the TLS certificate")
    # A worker that dies: the supervisor's error, through Python's logging, is JSON too.
    worker = min(_workers(server.process.pid))
    os.kill(worker, signal.SIGKILL)
    _wait_for(server, "exited")
    records = _records(server)
    kinds = {record["kind"]: record for record in records}
    assert set(kinds) == {"access", "connection", "server"}, records
    access = kinds["access"]
    assert access["path"] == "/poll" and access["status"] == 200
    assert access["detail"] == f"{serial} poll no-policy"
    assert kinds["connection"]["message"].startswith("plain HTTP on the HTTPS port")
    server_lines = [r for r in records if r["kind"] == "server"]
    assert any(r["message"].startswith("Reloaded the TLS certificate") for r in server_lines)
    died = next(r for r in server_lines if "exited" in r["message"])
    assert died["level"] == "error"
    assert died["message"] == f"Worker {worker} exited (status 9); starting another."
    assert all(line.isascii() for line in server.log)
    server.assert_no_traceback()
