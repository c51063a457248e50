"""The poll server over real HTTPS on 127.0.0.1 (SPEC section 3)."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import sqlite3
import ssl
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from helpers import ServerProcess
from lxml import etree
from typer.testing import CliRunner

from dynupdate.cli import app

POLL = (
    '<poll protocol="1"><endpoint serial="{serial}" type="{type}" version="{version}"'
    ' model="RealPresence Group 500" in-call="{in_call}"{extra}/>{peripherals}</poll>'
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("serve") / "home"
    running = ServerProcess(home)
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def no_window(server):
    yield
    admin(server, "window", "clear")


def admin(server: ServerProcess, *args: str) -> str:
    result = CliRunner().invoke(app, ["--home", str(server.home), *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout


def add(server, tmp_path, type_, version, content=None) -> str:
    content = content or f"{type_}-{version}".encode() * 100
    path = tmp_path / f"{type_}-{version}.pup"
    path.write_bytes(content)
    admin(server, "package", "add", path, "--type", type_, "--version", version)
    return hashlib.sha256(content).hexdigest()


def poll(server, serial, type_, version, *, in_call="false", extra="", peripherals=""):
    body = POLL.format(
        serial=serial,
        type=type_,
        version=version,
        in_call=in_call,
        extra=extra,
        peripherals=peripherals,
    )
    status, headers, data = server.request("POST", "/poll", body)
    assert headers["Content-Type"] == "application/xml"
    assert status == 200, data
    root = etree.fromstring(data)
    assert root.tag == "pollResponse" and root.get("protocol") == "1"
    return root


def report(server, serial, type_, version, state, detail=None):
    attrs = f' detail="{detail}"' if detail else ""
    body = (
        f'<report protocol="1"><device serial="{serial}" type="{type_}" version="{version}"'
        f' state="{state}"{attrs}/></report>'
    )
    status, headers, data = server.request("POST", "/report", body)
    assert status == 200, data
    assert headers["Content-Type"] == "application/xml"
    assert etree.fromstring(data).tag == "reportResponse"


def endpoint(server, serial) -> dict:
    import json

    return json.loads(admin(server, "endpoint", "show", serial, "--json"))


def test_poll_offers_update_with_package_fields(server, tmp_path):
    sha = add(server, tmp_path, "GroupSeries", "6.2.2.0-100")
    admin(server, "policy", "set", "GroupSeries", "--version", "6.2.2.0-100")
    root = poll(
        server,
        "8211ABC",
        "GroupSeries",
        "6.2.1.1-600021",
        peripherals='<peripheral serial="EE4-17" type="EagleEyeIV" version="1.4.0"/>',
    )
    assert root.get("pollInterval") == "3600"
    assert root.get("serverTime").endswith("Z")
    update, peripheral = list(root)
    assert update.tag == "update"
    assert update.attrib == {
        "serial": "8211ABC",
        "type": "GroupSeries",
        "version": "6.2.2.0-100",
        "size": str(len(b"GroupSeries-6.2.2.0-100" * 100)),
        "sha256": sha,
        "name": "GroupSeries-6.2.2.0-100.pup",
        "url": f"https://127.0.0.1:{server.port}/packages/{sha}",
    }
    assert peripheral.tag == "noUpdate"
    assert peripheral.attrib == {"serial": "EE4-17", "type": "EagleEyeIV", "reason": "no-policy"}


def test_reasons_in_call_and_up_to_date(server, tmp_path):
    add(server, tmp_path, "Trio", "7.0.0")
    admin(server, "policy", "set", "Trio", "--version", "7.0.0")
    [child] = poll(server, "T1", "Trio", "6.0", in_call="true")
    assert (child.tag, child.get("reason")) == ("noUpdate", "in-call")
    [child] = poll(server, "T1", "Trio", "7.0")
    assert (child.tag, child.get("reason")) == ("noUpdate", "up-to-date")


def test_peripheral_inherits_in_call_and_keeps_order(server, tmp_path):
    add(server, tmp_path, "Cam", "2.0")
    admin(server, "policy", "set", "Cam", "--version", "2.0")
    peripherals = "".join(f'<peripheral serial="C{i}" type="Cam" version="1.0"/>' for i in range(3))
    root = poll(server, "HOST1", "Unmanaged", "1", in_call="true", peripherals=peripherals)
    assert [c.get("serial") for c in root] == ["HOST1", "C0", "C1", "C2"]
    assert [c.get("reason") for c in root[1:]] == ["in-call"] * 3
    root = poll(server, "HOST1", "Unmanaged", "1", peripherals=peripherals)
    assert [c.tag for c in root[1:]] == ["update"] * 3


def test_outside_window_gives_retry_at(server, tmp_path):
    add(server, tmp_path, "Win", "2.0")
    admin(server, "policy", "set", "Win", "--version", "2.0")
    now = datetime.now(UTC)
    closed_start = (now + timedelta(hours=3)).strftime("%H:%M")
    admin(server, "window", "set", "--start", closed_start, "--duration", "1h")
    [child] = poll(server, "W1", "Win", "1.0")
    assert child.get("reason") == "outside-window"
    retry = datetime.fromisoformat(child.get("retryAt").replace("Z", "+00:00"))
    assert now + timedelta(hours=2) < retry < now + timedelta(hours=4)
    open_start = (now - timedelta(minutes=30)).strftime("%H:%M")
    admin(server, "window", "set", "--start", open_start, "--duration", "2h")
    [child] = poll(server, "W1", "Win", "1.0")
    assert child.tag == "update", "a CLI window change is seen by the next poll"


def test_cli_changes_are_seen_by_next_poll(server, tmp_path):
    add(server, tmp_path, "Live", "1.0")
    [child] = poll(server, "L1", "Live", "0.9")
    assert child.get("reason") == "no-policy"
    admin(server, "policy", "set", "Live", "--version", "1.0", "--allow-newer")
    [child] = poll(server, "L1", "Live", "0.9")
    assert child.get("version") == "1.0"
    add(server, tmp_path, "Live", "1.1")
    [child] = poll(server, "L1", "Live", "0.9")
    assert child.get("version") == "1.1", "a new upload is the target at once"
    admin(server, "policy", "disable", "Live")
    [child] = poll(server, "L1", "Live", "0.9")
    assert child.get("reason") == "no-policy"


def test_poll_registration_visible_to_cli_within_a_second(server, tmp_path):
    poll(server, "VIS-1", "Seen", "3.1", extra=' mac="00:11:22:33:44:55" tz="Europe/Berlin"')
    deadline = time.monotonic() + 1.0
    while True:
        rows = [
            e
            for e in __import__("json").loads(admin(server, "endpoint", "list", "--json"))
            if e["serial"] == "VIS-1"
        ]
        if rows or time.monotonic() > deadline:
            break
    assert rows, "registered within one second"
    data = endpoint(server, "VIS-1")
    assert data["mac"] == "00:11:22:33:44:55" and data["tz"] == "Europe/Berlin"
    assert data["address"] == "127.0.0.1" and data["last_poll"].endswith("Z")


def test_reports_update_status_and_version(server, tmp_path):
    add(server, tmp_path, "Rep", "2.0")
    admin(server, "policy", "set", "Rep", "--version", "2.0")
    poll(server, "R1", "Rep", "1.0")
    report(server, "R1", "Rep", "2.0", "downloading")
    assert endpoint(server, "R1")["status"] == "in-progress"  # durable before the answer
    report(server, "R1", "Rep", "2.0", "failed", detail="checksum &lt;bad&gt;")
    data = endpoint(server, "R1")
    assert data["status"] == "failed" and data["report_detail"] == "checksum <bad>"
    report(server, "R1", "Rep", "2.0", "installed")
    data = endpoint(server, "R1")
    assert data["status"] == "up-to-date" and data["version"] == "2.0"


def send_report(server, *devices: tuple[str, str]) -> tuple[int, etree._Element]:
    """(status, answer root) of a report of (serial, state) devices of type Rep."""
    detail = "x" * 2000  # the longest a device may send: nothing of it may stay
    body = "".join(
        f'<device serial="{serial}" type="Rep" version="2.0" state="{state}" detail="{detail}"/>'
        for serial, state in devices
    )
    body = f'<report protocol="1">{body}</report>'
    status, headers, data = server.request("POST", "/report", body)
    assert headers["Content-Type"] == "application/xml"
    return status, etree.fromstring(data)


def stored(server, serial: str) -> tuple[tuple | None, list]:
    """A device's row (report columns) and its history events, straight from the database."""
    with contextlib.closing(sqlite3.connect(server.home / "dynupdate.db")) as db:
        row = db.execute(
            "SELECT report_state, report_version, last_report FROM endpoints WHERE serial = ?",
            (serial,),
        ).fetchone()
        events = db.execute(
            "SELECT event FROM endpoint_history WHERE serial = ? ORDER BY id", (serial,)
        ).fetchall()
    return row, [e for (e,) in events]


def test_a_report_about_a_device_that_never_polled_is_409_and_records_nothing(server):
    status, root = send_report(server, ("NEVER-1", "failed"))
    assert (status, root.tag, root.get("code")) == (409, "error", "unknown-device")
    assert "NEVER-1" in root.get("message")
    assert stored(server, "NEVER-1") == (None, [])
    # The fields are checked first: 400, not 409, for an invalid report of an unknown serial.
    status, root = send_report(server, ("NEVER-2", "exploded"))
    assert (status, root.get("code")) == (400, "invalid-request")
    # One unknown device refuses the whole report: the known one's part is not stored either.
    poll(server, "KNOWN-1", "NoPolicy", "1.0")
    status, root = send_report(server, ("KNOWN-1", "failed"), ("NEVER-3", "failed"))
    assert (status, root.get("code")) == (409, "unknown-device")
    assert "NEVER-3" in root.get("message") and "KNOWN-1" not in root.get("message")
    assert stored(server, "KNOWN-1") == ((None, None, None), ["first-seen"])
    assert stored(server, "NEVER-3") == (None, [])


def test_a_report_right_after_the_first_poll_is_stored(server):
    # The poll's grouped write has not happened yet when the report arrives.
    poll(server, "QUICK-1", "Rep", "1.0", peripherals='<peripheral serial="QUICK-CAM"'
         ' type="RepCam" version="1"/>')  # fmt: skip
    status, root = send_report(server, ("QUICK-1", "downloading"), ("QUICK-CAM", "failed"))
    assert (status, root.tag) == (200, "reportResponse"), etree.tostring(root)
    assert stored(server, "QUICK-1")[0][0] == "downloading"
    assert stored(server, "QUICK-CAM")[0][0] == "failed"


def test_with_several_workers_a_report_right_after_the_first_poll_is_stored(
    start_server, tmp_path
):
    # Each request on a new connection: the kernel spreads them over both workers, so
    # a report often reaches the worker that has not written the device's poll.
    running = start_server(tmp_path / "workers", "--workers", "2", "--no-access-log")
    for n in range(12):
        poll(running, f"SPREAD-{n}", "Rep", "1.0")
        status, root = send_report(running, (f"SPREAD-{n}", "installing"))
        assert (status, root.tag) == (200, "reportResponse"), etree.tostring(root)


@pytest.fixture(scope="module")
def package(server, tmp_path_factory):
    content = bytes(range(256)) * 4000  # 1,024,000 bytes
    sha = add(server, tmp_path_factory.mktemp("dl"), "Dl", "1.0", content)
    return sha, content


class TestDownloads:
    def test_get_whole(self, server, package):
        sha, content = package
        status, headers, data = server.request("GET", f"/packages/{sha}")
        assert status == 200 and data == content
        assert headers["Content-Type"] == "application/octet-stream"
        assert headers["ETag"] == f'"{sha}"' and headers["Accept-Ranges"] == "bytes"
        assert int(headers["Content-Length"]) == len(content)

    def test_head(self, server, package):
        sha, content = package
        status, headers, data = server.request("HEAD", f"/packages/{sha}")
        assert status == 200 and data == b"" and int(headers["Content-Length"]) == len(content)

    @pytest.mark.parametrize(
        ("spec", "start", "end"),
        [
            ("bytes=0-99", 0, 99),
            ("bytes=1000-", 1000, 1023999),
            ("bytes=-10", 1023990, 1023999),
            ("bytes=1023999-5000000", 1023999, 1023999),
        ],
    )
    def test_ranges(self, server, package, spec, start, end):
        sha, content = package
        status, headers, data = server.request("GET", f"/packages/{sha}", headers={"Range": spec})
        assert status == 206
        assert headers["Content-Range"] == f"bytes {start}-{end}/{len(content)}"
        assert data == content[start : end + 1]

    def test_unsatisfiable_range(self, server, package):
        sha, content = package
        status, headers, _ = server.request(
            "GET", f"/packages/{sha}", headers={"Range": "bytes=2000000-"}
        )
        assert status == 416 and headers["Content-Range"] == f"bytes */{len(content)}"

    def test_if_none_match_and_if_range(self, server, package):
        sha, content = package
        status, _, data = server.request(
            "GET", f"/packages/{sha}", headers={"If-None-Match": f'"{sha}"'}
        )
        assert status == 304 and data == b""
        status, _, data = server.request(
            "GET", f"/packages/{sha}", headers={"Range": "bytes=0-9", "If-Range": '"other"'}
        )
        assert status == 200 and data == content
        status, _, data = server.request(
            "GET", f"/packages/{sha}", headers={"Range": "bytes=0-9", "If-Range": f'"{sha}"'}
        )
        assert status == 206 and data == content[:10]

    @pytest.mark.parametrize(
        "spelling", [str.upper, lambda sha: sha[:32].upper() + sha[32:]], ids=["upper", "mixed"]
    )
    def test_a_hash_in_upper_or_mixed_case_gets_the_same_file(self, server, package, spelling):
        sha, content = package
        path = f"/packages/{spelling(sha)}"
        status, headers, data = server.request("GET", path)
        assert status == 200 and data == content
        assert headers["ETag"] == f'"{sha}"'  # the canonical name, whatever the spelling
        status, headers, _ = server.request("HEAD", path)
        assert status == 200 and int(headers["Content-Length"]) == len(content)
        # A download begun under one spelling resumes under another: one ETag.
        status, _, data = server.request(
            "GET", path, headers={"Range": "bytes=1000-", "If-Range": f'"{sha}"'}
        )
        assert status == 206 and data == content[1000:]

    @pytest.mark.parametrize(
        "path",
        [
            "/packages/" + "0" * 64,
            "/packages/" + "A" * 63 + "G",
            "/packages/abc",
            "/packages/../dynupdate.db",
            "/packages/%2e%2e/dynupdate.db",
            "/packages/",
            "/packages/..%2f..%2fetc%2fpasswd",
            "/packages//etc/passwd",
            "/packages/" + "A" * 64,
            "/packages/x%00",
        ],
    )
    def test_unknown_or_malformed_hash_is_404(self, server, path):
        status, headers, data = server.request("GET", path)
        assert status == 404
        assert headers["Content-Type"] == "application/xml"
        assert etree.fromstring(data).get("code") == "not-found"

    def test_removed_package_is_404(self, server, tmp_path):
        sha = add(server, tmp_path, "Gone", "1.0")
        admin(server, "package", "remove", "Gone", "1.0")
        assert server.request("GET", f"/packages/{sha}")[0] == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/poll", b"<poll", 400, "malformed-xml"),
        ("POST", "/poll", b"", 400, "malformed-xml"),
        (
            "POST",
            "/poll",
            b'<poll protocol="1"><endpoint serial="x" type="T"/></poll>',
            400,
            "invalid-request",
        ),
        (
            "POST",
            "/poll",
            b'<!DOCTYPE poll [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            b'<poll protocol="1"><endpoint serial="&x;" type="T" version="1"/></poll>',
            400,
            None,
        ),
        (
            "POST",
            "/report",
            b'<report protocol="1"><device serial="x" type="T" version="1"'
            b' state="exploded"/></report>',
            400,
            "invalid-request",
        ),
        ("GET", "/poll", None, 405, "method-not-allowed"),
        ("PUT", "/report", b"x", 405, "method-not-allowed"),
        ("POST", "/packages/" + "0" * 64, b"x", 405, "method-not-allowed"),
        ("GET", "/admin", None, 404, "not-found"),
        ("POST", "/poll", b"<poll>" + b" " * (65 * 1024) + b"</poll>", 413, None),
    ],
)
def test_errors_are_xml_4xx(server, method, path, body, status, code):
    got, headers, data = server.request(method, path, body)
    assert got == status, data
    assert headers["Content-Type"] == "application/xml"
    error = etree.fromstring(data)
    assert error.tag == "error" and error.get("message")
    if code:
        assert error.get("code") == code


def test_values_are_escaped_in_answers(server):
    body = (
        '<poll protocol="1"><endpoint serial="a&lt;b&amp;c&quot;d" type="Esc" version="1"/></poll>'
    )
    status, _, data = server.request("POST", "/poll", body)
    assert status == 200
    assert etree.fromstring(data)[0].get("serial") == 'a<b&c"d'
    assert b"a<b" not in data


def test_silent_and_plain_http_clients_do_not_delay_a_poll(server):
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
    half = []
    try:
        for _ in range(5):  # a TLS ClientHello that never finishes
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")
            half.append(s)
        plain = socket.create_connection(("127.0.0.1", server.port))
        plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        half.append(plain)
        started = time.monotonic()
        [child] = poll(server, "FAST", "Unmanaged", "1")
        assert child.get("reason") == "no-policy"
        assert time.monotonic() - started < 1.0
    finally:
        for s in silent + half:
            s.close()


def test_keepalive_polls_on_one_connection(server):
    # http.client reconnects silently after a "Connection: close": only the socket
    # and its local port tell that the five polls really shared one connection.
    conn = server.connection()
    try:
        sockets = []
        for i in range(5):
            body = POLL.format(
                serial=f"K{i}", type="Unmanaged", version="1", in_call="false", extra="",
                peripherals="",
            )
            conn.request("POST", "/poll", body)
            sockets.append((conn.sock, conn.sock.getsockname()))
            response = conn.getresponse()
            assert response.status == 200
            response.read()
            assert not response.will_close, response.getheader("Connection")
        assert all(pair == sockets[0] for pair in sockets), sockets
    finally:
        conn.close()


def test_concurrent_polls_and_cli_never_lock(server, tmp_path):
    add(server, tmp_path, "Busy", "1.0")
    errors = []

    def hammer(n):
        try:
            for i in range(30):
                poll(server, f"B{n}-{i}", "Busy", "0.1")
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for _ in range(10):
        admin(server, "policy", "set", "Busy", "--version", "1.0")
        admin(server, "policy", "disable", "Busy")
    for t in threads:
        t.join()
    assert errors == []
    assert not any("locked" in line for line in server.log)


def test_self_signed_certificate_and_fingerprint(server):
    assert (server.home / "tls" / "server.key").stat().st_mode & 0o077 == 0
    fingerprint_line = next(line for line in server.log if "fingerprint" in line)
    der = ssl.PEM_cert_to_DER_cert(server.cafile.read_text())
    assert hashlib.sha256(der).hexdigest() in fingerprint_line


def test_public_url_and_package_url(start_server, tmp_path, cli):
    home = tmp_path / "urls"
    proxied = start_server(home, "--public-url", "https://updates.example.com/")
    add(proxied, tmp_path, "Url", "1.0")
    admin(proxied, "policy", "set", "Url", "--version", "1.0")
    [child] = poll(proxied, "U1", "Url", "0.1")
    sha = child.get("sha256")
    assert child.get("url") == f"https://updates.example.com/packages/{sha}"
    proxied.stop()
    cdn = start_server(home, "--package-url", "https://cdn.example.com/dyn")
    [child] = poll(cdn, "U1", "Url", "0.1")
    assert child.get("url") == f"https://cdn.example.com/dyn/{sha[:2]}/{sha}"
    assert (home / "packages" / sha[:2] / sha).is_file(), "the same names as the store"


def test_host_header_is_echoed_only_when_plain(server, tmp_path):
    add(server, tmp_path, "Hosted", "1.0")
    admin(server, "policy", "set", "Hosted", "--version", "1.0")
    body = POLL.format(
        serial="H1", type="Hosted", version="0", in_call="false", extra="", peripherals=""
    )
    _, _, data = server.request("POST", "/poll", body, headers={"Host": 'evil"><x y="1'})
    url = etree.fromstring(data)[0].get("url")
    assert "evil" not in url and url.startswith("https://")


def test_poll_interval_option_and_sigterm_flushes_writes(start_server, tmp_path):
    home = tmp_path / "interval"
    running = start_server(home, "--poll-interval", "90m")
    root = poll(running, "LAST", "Unmanaged", "1")
    assert root.get("pollInterval") == "5400"
    running.stop()
    assert running.process.returncode == 0
    import sqlite3

    db = sqlite3.connect(home / "dynupdate.db")
    assert db.execute("SELECT count(*) FROM endpoints WHERE serial = 'LAST'").fetchone()[0] == 1


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--poll-interval", "0"], "--poll-interval"),
        (["--public-url", "ftp://x"], "ftp://x"),
        (["--package-url", "cdn.example.com"], "cdn.example.com"),
        (["--bind-serial"], "--client-ca"),
        (["--cert", "/nonexistent.pem"], "--key"),
        (["--request-timeout", "0"], "--request-timeout"),
        (["--request-timeout", "nan"], "--request-timeout"),
        (["--request-timeout", "soon"], "--request-timeout"),
    ],
)
def test_bad_serve_options_are_one_line_errors(cli, home_dir, args, named):
    result = cli("serve", "--port", "0", *args, code=1)
    assert named in result.stderr and "Traceback" not in result.output
    assert not home_dir.exists()  # refused before anything is made
