"""What one client can make the real ``dynupdate serve`` hold (issue 9, items 1, 8 and 11).

Everything runs over HTTPS on 127.0.0.1 (and 127.0.0.2 as a second client
address). Memory is the server process's RSS from /proc; no client here
sleeps to wait for the server: each polls for what it expects.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import resource
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ServerProcess
from test_httpd import read_response, wait_for
from typer.testing import CliRunner

from dynupdate.cli import app

POLL = b'<poll protocol="1"><endpoint serial="FLOOD-1" type="Flood" version="1.0"/></poll>'


def admin(server: ServerProcess, *args: object) -> None:
    result = CliRunner().invoke(app, ["--home", str(server.home), *map(str, args)])
    assert result.exit_code == 0, result.output


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def poll_request(host: bytes = b"127.0.0.1", body: bytes = POLL) -> bytes:
    return (
        b"POST /poll HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: application/xml\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


def tls_socket(server: ServerProcess, *, rcvbuf: int | None = None, source: str | None = None,
               timeout: float = 5.0) -> ssl.SSLSocket:
    raw = socket.socket()
    if rcvbuf is not None:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source is not None:
        raw.bind((source, 0))
    raw.settimeout(timeout)
    try:
        raw.connect(("127.0.0.1", server.port))
        return server.context.wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


@pytest.fixture
def flood_server(start_server, tmp_path):
    server = start_server(tmp_path / "home", "--no-access-log")
    package = tmp_path / "flood-2.0.pup"
    package.write_bytes(b"flood" * 1000)
    admin(server, "package", "add", package, "--type", "Flood", "--version", "2.0")
    admin(server, "policy", "set", "Flood", "--version", "2.0")
    yield server
    server.assert_alive()
    server.assert_no_traceback()


# ---------------------------------------------------------------------------
# Item 1: one connection, bounded memory


def test_pipelining_without_reading_holds_bounded_memory(flood_server):
    server = flood_server
    # Warm up: serving polls at all grows the server (SQLite's page cache, the
    # allocator's arenas) until about 10,000 polls; that is not the point here.
    with tls_socket(server, timeout=10) as sock:
        answers = sock.makefile("rb")
        batch = poll_request() * 100
        for _ in range(120):
            sock.sendall(batch)
            for _ in range(100):
                assert read_response(answers)[0] == 200
    before = rss_kib(server.process.pid)
    batch = poll_request() * 200  # 200 polls, about 40 KB
    limit = 32 * 1024 * 1024  # what an unbounded server would take in, then hold answers for
    sent = 0
    sock = tls_socket(server, rcvbuf=4096, timeout=2.0)
    try:
        with contextlib.suppress(TimeoutError, OSError):
            while sent < limit:  # ends when the server stops reading: the send times out
                sock.sendall(batch)
                sent += len(batch)
        # Another client is still answered, while the flooding connection is open.
        status, _, body = server.request("POST", "/poll", POLL.replace(b"FLOOD-1", b"OTHER"))
        assert status == 200 and b"<update" in body
        grown = rss_kib(server.process.pid) - before
    finally:
        sock.close()
    assert sent < limit, "the server read everything a client that reads nothing sent"
    assert grown < 4 * 1024, f"the server grew by {grown} KiB for one connection"


def test_a_long_host_is_refused_before_it_is_copied_into_answers(flood_server):
    server = flood_server
    with tls_socket(server) as sock:
        sock.sendall(poll_request(host=b"h" * 57_000))
        answer = sock.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"Host header is longer than 255" in answer
    assert len(answer) < 2000
    longest = ".".join(["a" * 63] * 4)  # 255 characters: still a host name, still used
    status, _, body = server.request("POST", "/poll", POLL, headers={"Host": longest})
    assert status == 200 and f"https://{longest}/packages/".encode() in body


# ---------------------------------------------------------------------------
# Item 8: file descriptors and connections per client


def serve_under_file_limit(home: Path, soft: int, hard: int, *args: str) -> subprocess.Popen:
    """``dynupdate serve`` started with RLIMIT_NOFILE (soft, hard); stderr piped."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    command = [sys.executable, "-m", "dynupdate", "--home", str(home), "serve",
               "--host", "127.0.0.1", "--port", "0", "--workers", "1", *args]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, preexec_fn=limit)


def lines_until_serving(process: subprocess.Popen) -> list[str]:
    lines = []
    while line := process.stderr.readline():
        lines.append(line)
        if line.startswith("Serving "):
            return lines
    raise AssertionError("serve exited:\n" + "".join(lines))


def test_serve_raises_the_file_limit_and_lowers_max_connections_to_fit(tmp_path):
    process = serve_under_file_limit(tmp_path / "home", 256, 512)
    try:
        lines = lines_until_serving(process)
        said = "".join(lines)
        assert "--max-connections 10000 lowered to 448: the limit of open files is 512" in said
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        assert re.search(r"Max open files\s+512\s+512", limits), limits
        port = int(re.search(r"127\.0\.0\.1:(\d+)", lines[-1]).group(1))
        context = ssl.create_default_context(cafile=str(tmp_path / "home" / "tls" / "server.crt"))
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        conn.request("POST", "/poll", body=POLL)
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        process.terminate()
        process.communicate(timeout=20)


def test_serve_says_nothing_when_max_connections_fits(tmp_path):
    process = serve_under_file_limit(tmp_path / "home", 256, 256, "--max-connections", "100")
    try:
        assert not any("lowered" in line for line in lines_until_serving(process))
    finally:
        process.terminate()
        process.communicate(timeout=20)


def test_connections_per_client_address_are_capped(start_server, tmp_path):
    server = start_server(tmp_path / "home", "--max-per-client", "3")
    kept = [tls_socket(server) for _ in range(3)]
    try:
        for sock in kept:
            sock.sendall(poll_request())
            assert read_response(sock.makefile("rb"))[0] == 200
        with pytest.raises((OSError, ssl.SSLError)):  # closed at once: no handshake
            tls_socket(server).close()
        assert wait_for(lambda: any(
            " 127.0.0.1 refused: 3 connections open from this address" in line
            for line in server.log
        ))
        # Another address is still served: 127.0.0.2 is loopback on Linux.
        with tls_socket(server, source="127.0.0.2") as other:
            other.sendall(poll_request())
            assert read_response(other.makefile("rb"))[0] == 200
        kept.pop().close()
        accepted = None
        deadline = time.monotonic() + 5
        while accepted is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ssl.SSLError):  # the close not seen yet
                accepted = tls_socket(server)
        assert accepted is not None, "a connection is accepted again once one has closed"
        kept.append(accepted)
        accepted.sendall(poll_request())
        assert read_response(accepted.makefile("rb"))[0] == 200
    finally:
        for sock in kept:
            sock.close()


# ---------------------------------------------------------------------------
# Item 11: what an admin sees of connections that fail


STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def test_the_log_shows_plain_http_and_failed_handshakes_with_a_time(start_server, tmp_path):
    server = start_server(tmp_path / "home")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as plain:
        plain.sendall(poll_request())
        assert plain.recv(12) == b"HTTP/1.1 400"
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
    assert server.request("POST", "/poll", POLL)[0] == 200

    def logged(pattern: str) -> bool:
        return any(re.fullmatch(pattern, line.rstrip("\n")) for line in server.log)

    assert wait_for(lambda: logged(
        STAMP + r" 127\.0\.0\.1 plain HTTP on the HTTPS port: the client must use https://"
    ))
    assert wait_for(lambda: logged(
        STAMP + r" 127\.0\.0\.1 TLS handshake failed: TLSV1_ALERT_UNKNOWN_CA .*"
    ))
    assert wait_for(lambda: logged(STAMP + r" 127\.0\.0\.1 POST /poll 200 \d+ .*"))
