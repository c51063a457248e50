"""What one client can make the real ``dynupdate serve`` hold (issue 9, items 1, 8 and 11).

Everything runs over HTTPS on 127.0.0.1 (and 127.0.0.2 as a second client
address). Memory is the server process's RSS from /proc; no client here
sleeps to wait for the server: each polls for what it expects.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from pathlib import Path

import pytest
from conftest import ServerProcess
from test_httpd import read_response
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
