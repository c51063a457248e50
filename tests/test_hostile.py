"""Hostile requests and slow clients against the real ``dynupdate serve`` (issue 5, items 1-2).

Everything goes over HTTPS on 127.0.0.1. Raw TLS sockets send what
http.client refuses to (broken framing, CR/LF in targets, oversized heads).
Each case is one row: what is sent, the status expected and, for an XML
error, its ``code``. Every answer must be well-formed XML with
``Content-Type: application/xml``, never a 5xx, and never carry file
content or a hostile value unescaped.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import resource
import socket
import ssl
import threading
import time
from dataclasses import dataclass

import pytest
from helpers import ServerProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree
from typer.testing import CliRunner

from dynupdate.cli import app

PACKAGE = b"hostile-package-content" * 50
# Bytes that must never reach a client: the database, key files, /etc/passwd.
SECRETS = (b"SQLite format", b"PRIVATE KEY", b"CERTIFICATE", b"root:", b"/bin/")
_SAFE_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("hostile") / "home"
    running = ServerProcess(home, "--no-access-log")
    package = tmp_path_factory.mktemp("pkg") / "hostile-2.0.pup"
    package.write_bytes(PACKAGE)
    admin(running, "package", "add", package, "--type", "Hostile", "--version", "2.0")
    admin(running, "policy", "set", "Hostile", "--version", "2.0")
    yield running
    running.stop()
    running.assert_no_traceback()


@pytest.fixture(autouse=True)
def server_survives(server):
    yield
    server.assert_alive()


@pytest.fixture(scope="module")
def sha() -> str:
    return hashlib.sha256(PACKAGE).hexdigest()


def admin(server: ServerProcess, *args) -> str:
    result = CliRunner().invoke(app, ["--home", str(server.home), *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout


# -- raw HTTPS -------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    head: bytes  # status line and header lines, as received
    body: bytes
    seconds: float  # from the first byte sent to the whole answer read

    def xml(self) -> etree._Element:
        assert self.headers.get("content-type") == "application/xml", self.head
        return etree.fromstring(self.body, _SAFE_PARSER)

    def error_code(self) -> str:
        error = self.xml()
        assert error.tag == "error", self.body
        assert error.get("message") and error.get("message").isprintable(), self.body
        return error.get("code")


def tls(server: ServerProcess, timeout: float = 10.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    try:
        return server.context.wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


def read_answer(stream, started: float) -> Answer:
    status_line = stream.readline(65537)
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    lines = []
    for _ in range(200):
        line = stream.readline(65537)
        if line in (b"\r\n", b""):
            break
        lines.append(line)
    headers = {}
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers.get("content-length", "0")))
    head = status_line + b"".join(lines)
    return Answer(int(status_line.split()[1]), headers, head, body, time.monotonic() - started)


def exchange(server: ServerProcess, data: bytes) -> Answer:
    """Send ``data`` on a fresh TLS connection and read one answer."""
    with tls(server) as sock:
        started = time.monotonic()
        # The server may refuse the head and close before the rest is sent.
        with contextlib.suppress(OSError):
            sock.sendall(data)
        with sock.makefile("rb") as stream:
            return read_answer(stream, started)


def raw_request(
    method: str, target: str | bytes, body: bytes | None = None, head: bytes = b""
) -> bytes:
    if isinstance(target, str):
        target = target.encode()
    data = method.encode() + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + head
    if body is not None:
        data += b"Content-Type: application/xml\r\nContent-Length: %d\r\n" % len(body)
    return data + b"\r\n" + (body or b"")


def no_secrets(answer: Answer) -> None:
    for secret in SECRETS:
        assert secret not in answer.body, (secret, answer.body[:300])


# -- 1. hostile bodies -----------------------------------------------------------------------

POLL = b'<poll protocol="1"><endpoint serial="H1" type="Hostile" version="1.0"/></poll>'
END = b'<poll protocol="1"><endpoint serial="H1" type="Hostile" version="1.0"/>'


def _laughs() -> bytes:
    entities = b'<!ENTITY lol "lol">' + b"".join(
        b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    )
    return b'<?xml version="1.0"?><!DOCTYPE poll [' + entities + b"]>" + END + b"&lol9;</poll>"


def _quadratic() -> bytes:
    return (
        b'<!DOCTYPE poll [<!ENTITY a "'
        + b"a" * 20_000
        + b'">]>'
        + END
        + b"&a;" * 5_000
        + b"</poll>"
    )


def _nested(depth: int) -> bytes:
    return END + b"<x>" * depth + b"</x>" * depth + b"</poll>"


BODIES = [
    # (path, body, status, code)
    pytest.param("/poll", b"", 400, "malformed-xml", id="empty"),
    pytest.param("/report", b"", 400, "malformed-xml", id="empty-report"),
    pytest.param("/poll", b"  \r\n\t ", 400, "malformed-xml", id="whitespace"),
    pytest.param("/poll", b"\xef\xbb\xbf", 400, "malformed-xml", id="bom-only"),
    pytest.param("/poll", END, 400, "malformed-xml", id="truncated"),
    pytest.param("/poll", POLL[:30], 400, "malformed-xml", id="truncated-in-attribute"),
    pytest.param(
        "/report",
        b'<report protocol="1"><device serial=',
        400,
        "malformed-xml",
        id="truncated-report",
    ),
    pytest.param("/poll", b"hello, world", 400, "malformed-xml", id="text"),
    pytest.param("/poll", b'{"poll": {"serial": "H1"}}', 400, "malformed-xml", id="json"),
    pytest.param("/poll", bytes(range(256)) * 4, 400, "malformed-xml", id="binary"),
    pytest.param("/poll", b"<html><body>hi</body></html>", 400, "invalid-request", id="html"),
    pytest.param("/poll", POLL + POLL, 400, "malformed-xml", id="two-roots"),
    pytest.param("/poll", POLL.replace(b"H1", b"H\xff1"), 400, "malformed-xml", id="invalid-utf8"),
    pytest.param(
        "/poll", POLL.replace(b"H1", b"H\xc0\xaf1"), 400, "malformed-xml", id="overlong-utf8"
    ),
    pytest.param(
        "/poll", POLL.replace(b"H1", b"H\xed\xa0\x801"), 400, "malformed-xml", id="surrogate-utf8"
    ),
    pytest.param("/poll", POLL.decode().encode("utf-16"), 400, "malformed-xml", id="utf16"),
    pytest.param("/poll", POLL.replace(b"H1", b"H\x001"), 400, "malformed-xml", id="nul"),
    pytest.param(
        "/poll",
        b'<?xml version="1.0" encoding="ISO-8859-1"?>' + POLL,
        400,
        "malformed-xml",
        id="latin1-declared",
    ),
    pytest.param(
        "/poll",
        b'<?xml version="1.0" encoding="UTF-7"?>+ADw-!DOCTYPE poll+AD4-' + POLL,
        400,
        "malformed-xml",
        id="utf7-declared",
    ),
    # DTDs and entities: refused before parsing, so nothing is expanded or read.
    pytest.param("/poll", b"<!DOCTYPE poll>" + POLL, 400, "malformed-xml", id="doctype"),
    pytest.param(
        "/poll",
        b"\xef\xbb\xbf<!-- hi -->\n<!DOCTYPE poll []>" + POLL,
        400,
        "malformed-xml",
        id="doctype-after-comment",
    ),
    pytest.param("/poll", b"<!doctype poll>" + POLL, 400, "malformed-xml", id="doctype-lower"),
    pytest.param(
        "/poll",
        b'<!DOCTYPE poll [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
        + END
        + b"<x>&xxe;</x></poll>",
        400,
        "malformed-xml",
        id="xxe-file",
    ),
    pytest.param(
        "/poll",
        b'<!DOCTYPE poll [<!ENTITY xxe SYSTEM "http://127.0.0.1:9/x">]>'
        + END
        + b"<x>&xxe;</x></poll>",
        400,
        "malformed-xml",
        id="xxe-http",
    ),
    pytest.param(
        "/poll",
        b'<!DOCTYPE poll SYSTEM "file:///etc/passwd">' + POLL,
        400,
        "malformed-xml",
        id="external-dtd",
    ),
    pytest.param(
        "/poll",
        b'<!DOCTYPE poll PUBLIC "-//A//B" "http://127.0.0.1:9/x.dtd">' + POLL,
        400,
        "malformed-xml",
        id="public-dtd",
    ),
    pytest.param(
        "/poll",
        b'<!DOCTYPE poll [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>' + POLL,
        400,
        "malformed-xml",
        id="parameter-entity",
    ),
    pytest.param(
        "/poll",
        b'<!DOCTYPE poll [<!ENTITY % d SYSTEM "http://127.0.0.1:9/e.dtd"> %d;]>' + POLL,
        400,
        "malformed-xml",
        id="parameter-entity-oob",
    ),
    pytest.param("/poll", _laughs(), 400, "malformed-xml", id="billion-laughs"),
    pytest.param("/poll", _quadratic(), 400, "malformed-xml", id="quadratic-blowup"),
    pytest.param(
        "/report",
        b'<!DOCTYPE report [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b'<report protocol="1"><device serial="R" type="T" version="1" state="failed"'
        b' detail="&x;"/></report>',
        400,
        "malformed-xml",
        id="xxe-report",
    ),
    pytest.param(
        "/poll",
        END.replace(b"H1", b"&undeclared;") + b"</poll>",
        400,
        "malformed-xml",
        id="undeclared-entity",
    ),
    # Not DTD features: XInclude and stylesheet PIs are simply not processed.
    pytest.param(
        "/poll",
        END + b'<xi:include xmlns:xi="http://www.w3.org/2001/XInclude"'
        b' href="file:///etc/passwd" parse="text"/></poll>',
        200,
        None,
        id="xinclude",
    ),
    pytest.param(
        "/poll",
        b'<?xml-stylesheet type="text/xsl" href="file:///etc/passwd"?>' + POLL,
        200,
        None,
        id="stylesheet-pi",
    ),
    pytest.param("/poll", _nested(300), 400, "malformed-xml", id="depth-300"),
    pytest.param("/poll", _nested(5000), 400, "malformed-xml", id="depth-5000"),
]


@pytest.mark.parametrize(("path", "body", "status", "code"), BODIES)
def test_hostile_bodies(server, path, body, status, code):
    answer = exchange(server, raw_request("POST", path, body))
    assert answer.status == status, answer.body
    assert answer.seconds < 1.0
    no_secrets(answer)
    if code is None:
        assert answer.xml().tag == "pollResponse"
    else:
        assert answer.error_code() == code


@pytest.fixture
def fifo(tmp_path):
    """A named pipe: a server that opened it to read would block on it, and be seen."""
    path = tmp_path / "canary"
    os.mkfifo(path)
    yield path
    with contextlib.suppress(OSError):  # release a reader stuck on it, if any
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize(
    "template",
    [
        b'<!DOCTYPE poll [<!ENTITY x SYSTEM "file://{}">]>' + END + b"<x>&x;</x></poll>",
        b'<!DOCTYPE poll [<!ENTITY % x SYSTEM "file://{}"> %x;]>' + POLL,
        b'<!DOCTYPE poll SYSTEM "file://{}">' + POLL,
        b"<!DOCTYPE poll SYSTEM '{}'>" + POLL,
        END + b'<xi:include xmlns:xi="http://www.w3.org/2001/XInclude" href="file://{}"/></poll>',
    ],
    ids=["entity", "parameter-entity", "external-dtd", "relative-dtd", "xinclude"],
)
def test_nothing_is_read_from_disk(server, fifo, template):
    answer = exchange(server, raw_request("POST", "/poll", template.replace(b"{}", bytes(fifo))))
    assert answer.status in (200, 400) and answer.seconds < 1.0
    # A writer can open a FIFO without blocking only while someone has it open to read.
    with pytest.raises(OSError, match="No such device"):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


# -- 1. framing and sizes ----------------------------------------------------------------------

FRAMING = [
    # (raw request, status, code)
    pytest.param(
        b"POST /poll HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n",
        413,
        "too-large",
        id="10MB-announced",
    ),
    pytest.param(
        b"POST /report HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n<rep",
        413,
        "too-large",
        id="10MB-report",
    ),
    pytest.param(
        b"POST /poll HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        400,
        "invalid-request",
        id="length-overflow",
    ),
    pytest.param(
        b"POST /poll HTTP/1.1\r\nHost: x\r\n\r\n" + POLL, 411, "length-required", id="no-length"
    ),
    pytest.param(
        b"POST /poll HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n" + POLL,
        400,
        "invalid-request",
        id="negative-length",
    ),
    pytest.param(
        b"POST /poll HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n" + POLL,
        400,
        "invalid-request",
        id="non-numeric-length",
    ),
    pytest.param(
        b"POST /poll HTTP/1.1\r\nHost: x\r\nContent-Length: 0x10\r\n\r\n" + POLL,
        400,
        "invalid-request",
        id="hex-length",
    ),
    pytest.param(
        b"POST /poll HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n" + POLL,
        400,
        "invalid-request",
        id="two-lengths",
    ),
    pytest.param(
        b"POST /poll HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(POLL), POLL),
        411,
        "length-required",
        id="chunked",
    ),
    pytest.param(
        b"POST /poll HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "invalid-request",
        id="chunked-and-length",
    ),
    pytest.param(
        b"POST /poll HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        411,
        "length-required",
        id="transfer-encoding-gzip",
    ),
    pytest.param(
        b"GET /poll HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n",
        431,
        "invalid-request",
        id="70kB-header-line",
    ),
    pytest.param(
        b"GET /poll HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(150))
        + b"\r\n",
        431,
        "invalid-request",
        id="150-headers",
    ),
    pytest.param(
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        414,
        "invalid-request",
        id="70kB-request-line",
    ),
    pytest.param(
        b"GET /packages/" + b"%2e%2e/" * 10_000 + b" HTTP/1.1\r\n\r\n",
        414,
        "invalid-request",
        id="70kB-traversal-line",
    ),
    pytest.param(b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400, "invalid-request", id="http-9.9"),
    pytest.param(b"\x16\x03\x01 not http\r\n\r\n", 400, "invalid-request", id="garbage"),
]


@pytest.mark.parametrize(("raw", "status", "code"), FRAMING)
def test_framing_and_size_limits(server, raw, status, code):
    answer = exchange(server, raw)
    assert (answer.status, answer.error_code()) == (status, code), answer.body
    assert answer.seconds < 1.0  # answered before any (announced) body is read
    assert answer.headers["connection"] == "close"


# -- 1. paths --------------------------------------------------------------------------------

TRAVERSALS = [
    "/packages/../dynupdate.db",
    "/packages/../../../../../../etc/passwd",
    "/packages/%2e%2e/dynupdate.db",
    "/packages/%2E%2E/dynupdate.db",
    "/packages/%2e%2e%2fdynupdate.db",
    "/packages/..%2fdynupdate.db",
    "/packages/..%2Fdynupdate.db",
    "/packages/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/packages/%252e%252e%252fdynupdate.db",
    "/packages/%c0%ae%c0%ae/dynupdate.db",
    "/packages/..;/dynupdate.db",
    "/packages/..\\dynupdate.db",
    "/packages/..\\..\\..\\etc\\passwd",
    "/packages/%5c..%5cdynupdate.db",
    "/packages//etc/passwd",
    "/packages///dynupdate.db",
    "/packages/{sha}/../../dynupdate.db",
    "/packages/{sha}%00",
    "/packages/{sha}%00.db",
    "/packages/{sha}/",
    "/packages/{sha}/.",
    "/packages/{sha}%2f..%2f..%2fdynupdate.db",
    "/packages/{SHA}%00",  # the hash in upper case is the package (test_serve); more is not
    "/packages/{short}/{sha}",
    "/packages/.tmp",
    "/packages/tls/server.key",
    "/packages/../tls/server.key",
    "/packages/?file=../dynupdate.db",
    "/packages/x?path=../../../etc/passwd",
    "/packages/%3f../dynupdate.db",
    "/../dynupdate.db",
    "/%2e%2e/%2e%2e/etc/passwd",
    "//etc/passwd",
    "/dynupdate.db",
    "/dynupdate.db?x=../",
    "/tls/server.key",
    "/poll/../dynupdate.db",
    "/poll%2f..%2fdynupdate.db",
    "/report/..",
    "/.git/config",
    "/packages",
    "/PACKAGES/{sha}",
    "/%70ackages/{sha}",
    "/packages/{sha}#../../dynupdate.db",
    "*",
]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("template", TRAVERSALS)
def test_path_traversal_is_404(server, sha, template, method):
    target = template.format(sha=sha, SHA=sha.upper(), short=sha[:2])
    if method == "HEAD":
        with tls(server) as sock:
            sock.sendall(raw_request("HEAD", target))
            with sock.makefile("rb") as stream:
                status_line = stream.readline()
        assert status_line.startswith(b"HTTP/1.1 404 "), status_line
        return
    answer = exchange(server, raw_request(method, target))
    assert (answer.status, answer.error_code()) == (404, "not-found"), answer.body
    no_secrets(answer)
    assert PACKAGE not in answer.body


def test_a_query_string_does_not_change_the_file(server, sha):
    answer = exchange(server, raw_request("GET", f"/packages/{sha}?x=../../dynupdate.db"))
    assert answer.status == 200 and answer.body == PACKAGE


ALLOWED_HEADERS = {"date", "content-type", "content-length", "connection", "allow", "retry-after"}


@pytest.mark.parametrize(
    ("target", "status"),
    [
        (b"/packages/%0d%0aX-Injected:%20yes", 404),
        (b"/packages/%0D%0AX-Injected:%20yes%0D%0A%0D%0A<evil/>", 404),
        (b"/%0d%0aSet-Cookie:%20session=evil", 404),
        (b"/poll%0d%0aX-Injected:%20yes", 404),
        (b"/packages/%0aX-Injected:%20yes", 404),
        (b"/packages/%0dX-Injected:%20yes", 404),
        (b"/packages/x\rX-Injected: yes", 400),
        (b"/packages/x\nX-Injected: yes", 404),  # read as HTTP/0.9: "GET /packages/x"
        (b"/packages/x\r\nX-Injected: yes", 404),
    ],
    ids=lambda v: (
        v.decode("latin-1").encode("unicode_escape").decode() if isinstance(v, bytes) else None
    ),
)
def test_cr_lf_in_paths_is_never_reflected_into_headers(server, target, status):
    answer = exchange(server, raw_request("GET", target))
    assert answer.status == status
    assert set(answer.headers) <= ALLOWED_HEADERS, answer.head
    for line in answer.head.split(b"\r\n")[1:-1]:
        assert line.split(b":", 1)[0].lower().decode() in ALLOWED_HEADERS, answer.head
    assert b"injected" not in answer.head.lower() and b"set-cookie" not in answer.head.lower()
    answer.error_code()
    assert b"<evil" not in answer.body


# -- 1. hostile values -------------------------------------------------------------------------

EVIL = "&lt;evil/&gt;&amp;&quot;&apos;"  # as written in the request: <evil/>&"'
LONG = "S" * 10_000


def poll_body(serial="V1", type_="Values", version="1.0", extra="") -> bytes:
    return (
        f'<poll protocol="1"><endpoint serial="{serial}" type="{type_}" version="{version}"'
        f"{extra}/></poll>"
    ).encode()


def report_body(serial="V1", type_="Values", version="1.0", state="failed", extra="") -> bytes:
    return (
        f'<report protocol="1"><device serial="{serial}" type="{type_}" version="{version}"'
        f' state="{state}"{extra}/></report>'
    ).encode()


VALUES = [
    # (path, body, status, code)
    pytest.param("/poll", poll_body(serial=f"a{EVIL}b"), 200, None, id="serial-markup"),
    pytest.param("/poll", poll_body(type_=EVIL), 200, None, id="type-markup"),
    pytest.param("/poll", poll_body(version=f"1{EVIL}"), 200, None, id="version-markup"),
    pytest.param(
        "/poll",
        poll_body(type_="Hostile", version=f"1{EVIL}"),
        200,
        None,
        id="version-markup-with-policy",
    ),
    pytest.param(
        "/poll", poll_body(extra=f' model="{EVIL}" mac="{EVIL}"'), 200, None, id="model-mac-markup"
    ),
    pytest.param("/poll", poll_body(serial=LONG), 400, "invalid-request", id="serial-10k"),
    pytest.param("/poll", poll_body(type_=LONG), 400, "invalid-request", id="type-10k"),
    pytest.param("/poll", poll_body(version=LONG), 400, "invalid-request", id="version-10k"),
    pytest.param(
        "/poll", poll_body(extra=f' model="{LONG}"'), 400, "invalid-request", id="model-10k"
    ),
    pytest.param("/poll", poll_body(extra=f' tz="{LONG}"'), 400, "invalid-request", id="tz-10k"),
    pytest.param(
        "/poll", poll_body(serial=EVIL * 400), 400, "invalid-request", id="serial-10k-markup"
    ),
    pytest.param(
        "/poll", poll_body(serial="\u0661\u0662\u0663"), 200, None, id="serial-arabic-digits"
    ),
    pytest.param(
        "/poll", poll_body(serial="\uff11\uff12\uff13"), 200, None, id="serial-fullwidth-digits"
    ),
    pytest.param(
        "/poll",
        poll_body(type_="Hostile", version="\u0661.\u0660"),
        200,
        None,
        id="version-arabic-digits",
    ),
    pytest.param(
        "/poll",
        poll_body(type_="Hostile", version="\U0001d7d0.\U0001d7ce"),
        200,
        None,
        id="version-math-digits",
    ),
    pytest.param("/poll", poll_body(serial="a&#1;b"), 400, "malformed-xml", id="serial-charref-1"),
    pytest.param(
        "/poll", poll_body(serial="&#x1b;[31mred"), 400, "malformed-xml", id="serial-charref-esc"
    ),
    pytest.param(
        "/poll", poll_body(serial="\x1b[31mred"), 400, "malformed-xml", id="serial-raw-esc"
    ),
    pytest.param(
        "/poll", poll_body(serial="a&#xd800;b"), 400, "malformed-xml", id="serial-surrogate-ref"
    ),
    pytest.param(
        "/poll", poll_body(serial="a&#xfffe;b"), 400, "malformed-xml", id="serial-nonchar-ref"
    ),
    pytest.param("/poll", poll_body(serial="a&#x85;b"), 400, "invalid-request", id="serial-nel"),
    pytest.param("/poll", poll_body(serial="a&#x9b;31m"), 400, "invalid-request", id="serial-csi"),
    pytest.param("/poll", poll_body(serial="a&#x202e;b"), 400, "invalid-request", id="serial-bidi"),
    pytest.param(
        "/poll", poll_body(type_="a&#x200b;b"), 400, "invalid-request", id="type-zero-width"
    ),
    pytest.param("/poll", poll_body(serial="a&#9;b"), 400, "invalid-request", id="serial-tab"),
    pytest.param("/poll", poll_body(version="1&#10;2"), 400, "invalid-request", id="version-lf"),
    pytest.param(
        "/poll", poll_body(extra=f' in-call="{EVIL}"'), 400, "invalid-request", id="in-call-markup"
    ),
    pytest.param(
        "/poll",
        poll_body().replace(b'protocol="1"', f'protocol="{EVIL}"'.encode()),
        400,
        "invalid-request",
        id="protocol-markup",
    ),
    pytest.param("/poll", b'<evil-root protocol="1"/>', 400, "invalid-request", id="root-name"),
    pytest.param(
        "/poll",
        poll_body(type_="Hostile", extra=' tz="../../../../etc/passwd"'),
        200,
        None,
        id="tz-traversal",
    ),
    pytest.param(
        "/poll", poll_body(type_="Hostile", extra=' tz="/etc/passwd"'), 200, None, id="tz-absolute"
    ),
    pytest.param(
        "/poll", poll_body(type_="Hostile", extra=f' tz="{EVIL}"'), 200, None, id="tz-markup"
    ),
    pytest.param(
        "/report",
        report_body(serial=f"r{EVIL}", extra=f' detail="{EVIL}"'),
        200,
        None,
        id="report-markup",
    ),
    pytest.param(
        "/report", report_body(extra=f' detail="{LONG}"'), 200, None, id="report-detail-10k"
    ),
    pytest.param(
        "/report",
        report_body(extra=' detail="a&#x9b;31m"'),
        400,
        "invalid-request",
        id="report-detail-csi",
    ),
    pytest.param(
        "/report",
        report_body(extra=' detail="\x1b[31m"'),
        400,
        "malformed-xml",
        id="report-detail-raw-esc",
    ),
    pytest.param(
        "/report", report_body(state=EVIL), 400, "invalid-request", id="report-state-markup"
    ),
    pytest.param(
        "/report", report_body(version=LONG), 400, "invalid-request", id="report-version-10k"
    ),
    pytest.param(
        "/report", report_body(serial="\u0661\u0662"), 200, None, id="report-serial-digits"
    ),
    pytest.param(
        "/report",
        report_body(serial=f"never{EVIL}"),
        409,
        "unknown-device",
        id="report-unknown-markup",
    ),
]
# Never in an answer: the markup sent, a terminal escape, a C1 control, a bidi override.
RAW = (b"<evil", b"\x1b", b"\xc2\x85", b"\xc2\x9b", b"\xe2\x80\xae", b"\xe2\x80\x8b")


@pytest.mark.parametrize(("path", "body", "status", "code"), VALUES)
def test_hostile_values_are_refused_or_escaped(server, path, body, status, code):
    if path == "/report" and status == 200:
        # A report is stored only for a device that has polled (SPEC 3): poll as it first.
        device = etree.fromstring(body, _SAFE_PARSER)[0]
        poll = etree.Element("poll", protocol="1")
        etree.SubElement(poll, "endpoint", dict(device.attrib))
        assert exchange(server, raw_request("POST", "/poll", etree.tostring(poll))).status == 200
    answer = exchange(server, raw_request("POST", path, body))
    assert answer.status == status, answer.body
    for raw in RAW:
        assert raw not in answer.body, (raw, answer.body[:300])
    if code is not None:
        assert answer.error_code() == code
        return
    root = answer.xml()
    if path == "/report":
        assert root.tag == "reportResponse"
        return
    sent = etree.fromstring(body, _SAFE_PARSER)[0]
    [child] = root
    assert (child.get("serial"), child.get("type")) == (sent.get("serial"), sent.get("type"))


def test_a_hostile_host_header_is_not_echoed(server):
    body = poll_body(serial="HOST-1", type_="Hostile")
    answer = exchange(
        server, raw_request("POST", "/poll", body, b'Host: evil.example"><evil/>\r\n')
    )
    assert answer.status == 200
    [update] = answer.xml()
    assert update.tag == "update" and "evil" not in update.get("url")
    assert b"<evil" not in answer.body


# -- 1. property-based: arbitrary bytes as a poll body ----------------------------------------

FRAGMENTS = [
    b"<poll",
    b' protocol="1"',
    b">",
    b"</poll>",
    b"<endpoint",
    b"<peripheral",
    b' serial="P"',
    b' type="T"',
    b' version="1"',
    b' in-call="true"',
    b"/>",
    b'"',
    b"&",
    b"&lt;",
    b"&#1;",
    b"&#x1b;",
    b"<!DOCTYPE",
    b"<!ENTITY",
    b"[",
    b"]>",
    b"<![CDATA[",
    b"]]>",
    b"<?xml",
    b"?>",
    b"\xff",
    b"\x00",
    b"\xc3\x28",
    b"\xe2\x80\xae",
    b" ",
    b"\n",
    b"<x>" * 40,
]
BODY = st.one_of(
    st.binary(max_size=2048),
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map(b"".join),
)


class Keepalive:
    """One keep-alive connection for many polls; reconnects when the server closes it."""

    def __init__(self, server: ServerProcess) -> None:
        self.conn = server.connection()

    def post(self, body: bytes) -> tuple[int, str | None, bytes]:
        for attempt in range(2):
            try:
                self.conn.request("POST", "/poll", body=body)
                response = self.conn.getresponse()
                return response.status, response.getheader("Content-Type"), response.read()
            except (http.client.HTTPException, OSError):
                self.conn.close()  # the next request opens a new connection
                if attempt:
                    raise
        raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def keepalive(server):
    client = Keepalive(server)
    yield client
    client.conn.close()


@settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(body=BODY)
def test_arbitrary_poll_bodies_get_200_or_a_4xx_xml_answer(keepalive, body):
    status, content_type, data = keepalive.post(body)
    assert status == 200 or 400 <= status < 500, data
    assert content_type == "application/xml"
    root = etree.fromstring(data, _SAFE_PARSER)
    assert root.tag == ("pollResponse" if status == 200 else "error")


# -- 2. slow and silent clients ----------------------------------------------------------------


def serve_has(option: str) -> bool:
    return option in CliRunner().invoke(app, ["serve", "--help"], terminal_width=200).output


def poll_once(server: ServerProcess, serial: str) -> float:
    started = time.monotonic()
    status, headers, data = server.request("POST", "/poll", poll_body(serial=serial))
    assert status == 200 and headers["Content-Type"] == "application/xml", data
    return time.monotonic() - started


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the peer closes (EOF or reset) within ``seconds``; data is drained."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


def test_a_slow_header_sender_is_cut_off_by_the_whole_request_deadline(start_server, tmp_path):
    assert serve_has("--request-timeout"), "serve needs --request-timeout"
    server = start_server(tmp_path / "slow", "--request-timeout", "2")
    with tls(server) as sock:
        started = time.monotonic()
        cut = False
        for byte in b"POST /poll HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 40:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                cut = True
                break
            if closed_within(sock, 0.3):  # one byte every 0.3 s: no single read ever times out
                cut = True
                break
        elapsed = time.monotonic() - started
    assert cut, "a client trickling a header was never cut off"
    assert 1.5 < elapsed < 3.5
    assert poll_once(server, "AFTER-SLOW") < 1.0


def _partial_client_hello() -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    hello = outgoing.read()
    return hello[: len(hello) // 2]


def _raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def test_idle_connections_and_half_handshakes_do_not_delay_a_poll(server):
    _raise_open_files(2048)
    hello = _partial_client_hello()
    bad: list[socket.socket] = []
    try:
        for _ in range(500):
            bad.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            bad.append(sock)
            sock.sendall(hello)
        timings = [poll_once(server, f"BUSY-{i}") for i in range(3)]
        assert max(timings) < 1.0, timings
    finally:
        for sock in bad:
            sock.close()


def test_max_connections_refuses_cleanly_and_recovers(start_server, tmp_path):
    server = start_server(tmp_path / "capped", "--max-connections", "20")
    body = poll_body(serial="CAP")
    kept = [server.connection() for _ in range(20)]

    def poll_on(conn: http.client.HTTPSConnection) -> int:
        conn.request("POST", "/poll", body=body)
        response = conn.getresponse()
        response.read()
        return response.status

    try:
        assert [poll_on(conn) for conn in kept] == [200] * 20
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
            assert extra.recv(1) == b"", "past the cap a connection is closed, not left waiting"
        with pytest.raises(OSError):
            tls(server, timeout=5).close()
        assert time.monotonic() - started < 1.0
        assert [poll_on(conn) for conn in kept] == [200] * 20, "existing connections still work"
        for conn in kept[:5]:
            conn.close()
        deadline = time.monotonic() + 5
        accepted = False
        while not accepted and time.monotonic() < deadline:
            fresh = server.connection(timeout=5)
            try:
                accepted = poll_on(fresh) == 200
            except (OSError, http.client.HTTPException):
                threading.Event().wait(0.05)  # the server has not seen the closes yet
            finally:
                fresh.close()
        assert accepted, "a connection is accepted again once others have closed"
    finally:
        for conn in kept:
            conn.close()
