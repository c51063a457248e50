"""docs/protocol.md, the device developer's guide, checked against the XSD and a real server.

Every XML block of the guide is valid against ``dynupdate/protocol.xsd``, but
the examples of refused requests (marked ``refused``, and then really not
valid). Every request block is sent over HTTPS to a ``dynupdate serve`` whose
home the guide's own "example server" commands set up, in the guide's order,
and answered as the guide shows: the status, and an answer with the same
elements, attributes, reasons and codes (times may differ). The guide's HTTP
exchanges (downloads) are sent too, and the error table lists exactly the
(status, code) pairs the server can answer, each triggered live but for 403
(sent by the bind-serial examples), 500 and 503.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import shlex
import socket
import sqlite3
import ssl
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from helpers import ServerProcess
from lxml import etree
from typer.testing import CliRunner

from dynupdate import protocol
from dynupdate.cli import app
from dynupdate.protocol_client import parse_poll_response
from dynupdate.server.messages import ERROR_CODES

ROOT = Path(__file__).parent.parent
GUIDE = ROOT / "docs" / "protocol.md"
SCHEMA = etree.XMLSchema(etree.parse(str(ROOT / "dynupdate" / "protocol.xsd")))
TIMES = {"serverTime", "retryAt"}  # present in both, values may differ
READY_WITHIN = 15.0  # seconds a poll's grouped write gets to land (usually 0.2)


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    note: str  # the one-line HTML comment right above the fence, "" when none
    line: int  # of the opening fence, 1-based

    @property
    def options(self) -> list[str]:
        """``send POST /poll: 200; window closed`` → ["window closed"]."""
        return [part.strip() for part in self.note.split(";")[1:]]

    def sent(self) -> tuple[str, str, int]:
        """(method, path, status) of a ``send METHOD PATH: STATUS`` block."""
        head = self.note.split(";")[0].removeprefix("send").strip()
        target, _, status = head.partition(":")
        method, path = target.split()
        return method, path, int(status)


def read_blocks(text: str) -> list[Block]:
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```") and len(line) > 3:
            above = lines[i - 1].strip() if i else ""
            note = above[4:-3].strip() if above.startswith("<!--") and above.endswith("-->") else ""
            end = lines.index("```", i + 1)
            blocks.append(Block(line[3:], "\n".join(lines[i + 1 : end]) + "\n", note, i + 1))
            i = end + 1
        else:
            i += 1
    return blocks


BLOCKS = read_blocks(GUIDE.read_text())
XML_BLOCKS = [b for b in BLOCKS if b.lang == "xml"]
REQUESTS = ("poll", "report")


def parse(text: str) -> etree._Element:
    # Not the protocol's hardened parser: the guide's own refused examples hold a DOCTYPE.
    parser = etree.XMLParser(remove_blank_text=True, resolve_entities=False, no_network=True)
    return etree.fromstring(text.encode(), parser)


def root_tag(block: Block) -> str:
    try:
        return str(parse(block.text).tag)
    except etree.XMLSyntaxError:
        return "poll"  # the deliberately broken examples are polls


def pairs() -> list[tuple[Block, Block]]:
    """Each sent XML request with the answer block that follows it."""
    found = []
    for i, block in enumerate(XML_BLOCKS):
        if block.note.startswith("send"):
            answer = XML_BLOCKS[i + 1] if i + 1 < len(XML_BLOCKS) else None
            assert answer is not None and answer.note == "answer", (
                f"line {block.line}: a request the guide sends needs its answer block after it"
            )
            found.append((block, answer))
    return found


# -- the blocks themselves ------------------------------------------------------------------


def test_the_guide_has_its_examples():
    sent = pairs()
    assert len(sent) >= 25
    tags = {str(parse(answer.text).tag) for _, answer in sent}
    assert tags == {"pollResponse", "reportResponse", "error"}
    reasons = {
        child.get("reason")
        for _, answer in sent
        for child in parse(answer.text)
        if child.tag == "noUpdate"
    }
    shown = {"no-policy", "in-call", "up-to-date", "outside-window", "staged", "rate-limited",
             "held", "forbidden"}  # fmt: skip
    assert reasons == shown
    assert len([b for b in BLOCKS if b.lang == "http" and b.note == "send"]) >= 4


@pytest.mark.parametrize("block", XML_BLOCKS, ids=lambda b: f"line{b.line}")
def test_each_xml_block_is_valid_against_the_xsd_unless_marked(block):
    if "refused" in block.options:
        # An example of a refused request: not well-formed, a DOCTYPE (which no
        # schema speaks of), or refused by the XSD too.
        try:
            document = parse(block.text)
        except etree.XMLSyntaxError:
            return
        if document.getroottree().docinfo.doctype:
            return
        assert not SCHEMA.validate(document), f"line {block.line} is valid after all"
        return
    document = parse(block.text)
    assert SCHEMA.validate(document), f"line {block.line}: {SCHEMA.error_log.last_error}"
    if document.tag in REQUESTS:
        assert block.note.startswith("send"), f"line {block.line}: a request never sent"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    kept = "".join(c for c in heading.strip().lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def test_the_contents_links_lead_to_headings():
    text = GUIDE.read_text()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # no shell comments
    anchors = {slug(line.lstrip("#")) for line in prose.splitlines() if line.startswith("#")}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) >= 10
    assert set(links) <= anchors, set(links) - anchors


def error_table() -> set[tuple[int, str]]:
    rows = set()
    for line in GUIDE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].isdigit() and cells[1].startswith("`"):
            rows.add((int(cells[0]), cells[1].strip("`")))
    return rows


# Every (status, code) the server answers: the transport's and the protocol's.
SERVER_ERRORS = set(ERROR_CODES.items()) | {
    (400, protocol.MALFORMED_XML),
    (400, protocol.INVALID_REQUEST),
    (409, protocol.UNKNOWN_DEVICE),
}


def test_the_error_table_lists_every_code_the_server_answers():
    assert error_table() == SERVER_ERRORS


# -- the example server ---------------------------------------------------------------------


def setup_lines() -> tuple[list[str], list[str]]:
    """The example server's commands before ``serve``, and ``serve``'s own options."""
    [block] = [b for b in BLOCKS if b.note == "example server"]
    commands, serve = [], []
    for line in block.text.splitlines():
        args = shlex.split(line, comments=True)
        if not args or args[0] == "export":
            continue  # the test's own home replaces DYNUPDATE_HOME
        if args[:2] == ["dynupdate", "serve"]:
            options = args[2:]
            for name in ("--host", "--port"):  # ServerProcess listens on 127.0.0.1, port 0
                at = options.index(name)
                del options[at : at + 2]
            serve = options
        else:
            commands.append(line)
    return commands, serve


def make_home(folder: Path) -> tuple[Path, list[str]]:
    """A home set up by the guide's commands, run as written (files in ``folder``)."""
    home = folder / "home"
    commands, serve = setup_lines()
    runner = CliRunner()
    with contextlib.chdir(folder):
        for line in commands:
            args = shlex.split(line)
            if args[0] == "dynupdate":
                result = runner.invoke(app, ["--home", str(home), *args[1:]])
                assert result.exit_code == 0, f"{line}\n{result.output}"
            else:
                subprocess.run(["sh", "-c", line], check=True)
    return home, serve


class Example:
    """A server of the guide, and how to send it what the guide sends."""

    def __init__(self, server: ServerProcess, home: Path) -> None:
        self.server = server
        self.home = home
        self.window_closed = False

    def context(self, serial: str | None) -> ssl.SSLContext:
        return self.server.context

    def send(self, method: str, path: str, body: bytes, serial: str | None = None):
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.server.port, context=self.context(serial), timeout=30
        )
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/xml"})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def cli(self, *args: str) -> None:
        result = CliRunner().invoke(app, ["--home", str(self.home), *args])
        assert result.exit_code == 0, result.output

    def set_window(self, closed: bool) -> None:
        """A maintenance window closed now (opening in six hours), or none."""
        if closed and not self.window_closed:
            start = (datetime.now(UTC) + timedelta(hours=6)).strftime("%H:00")
            self.cli("window", "set", "--start", start, "--duration", "1h", "--tz", "UTC")
        elif not closed and self.window_closed:
            self.cli("window", "clear")
        self.window_closed = closed

    def wait_recorded(self, poll: etree._Element) -> None:
        """Until the poll's devices are registered on the versions it gave (grouped writes)."""
        wanted = {(d.get("serial"), d.get("version")) for d in poll}
        deadline = time.monotonic() + READY_WITHIN
        with contextlib.closing(
            sqlite3.connect(f"file:{self.home / 'dynupdate.db'}?mode=ro", uri=True)
        ) as db:
            while True:
                rows = set(db.execute("SELECT serial, version FROM endpoints").fetchall())
                if wanted <= rows or time.monotonic() > deadline:
                    assert wanted <= rows, f"never recorded: {wanted - rows}"
                    return
                time.sleep(0.05)


class BoundExample(Example):
    def __init__(self, server: ServerProcess, home: Path, ca: trustme.CA) -> None:
        super().__init__(server, home)
        self.ca = ca
        self.contexts: dict[str, ssl.SSLContext] = {}

    def context(self, serial: str | None) -> ssl.SSLContext:
        assert serial is not None, "a bound server's example names its certificate: 'as SERIAL'"
        if serial not in self.contexts:
            context = ssl.create_default_context(cafile=str(self.server.cafile))
            self.ca.issue_cert(serial, common_name=serial).configure_cert(context)
            self.contexts[serial] = context
        return self.contexts[serial]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    folder = tmp_path_factory.mktemp("example")
    home, serve = make_home(folder)
    server = ServerProcess(home, *serve)
    yield Example(server, home)
    server.stop()
    server.assert_no_traceback()


@pytest.fixture(scope="module")
def bound(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bound")
    home, serve = make_home(folder)
    ca = trustme.CA()
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    for i, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert_file), append=i > 0)
    leaf.private_key_pem.write_to_path(str(key_file))
    server = ServerProcess(
        home, *serve, "--cert", str(cert_file), "--key", str(key_file),
        "--client-ca", str(ca_file), "--bind-serial", cafile=ca_file,
    )  # fmt: skip
    yield BoundExample(server, home, ca)
    server.stop()
    server.assert_no_traceback()


def assert_same(expected: etree._Element, got: etree._Element, where: str) -> None:
    """Same element, attributes, values (times aside) and children, in order."""
    assert got.tag == expected.tag, f"{where}: <{got.tag}>, the guide shows <{expected.tag}>"
    assert set(got.attrib) == set(expected.attrib), f"{where}: {dict(got.attrib)}"
    for name, value in expected.attrib.items():
        actual = got.get(name)
        if name in TIMES:
            continue
        if name == "message" and value.endswith("…"):
            assert actual.startswith(value[:-1]), f"{where}: message={actual!r}"
        else:
            assert actual == value, f"{where}: {name}={actual!r}, the guide shows {value!r}"
    assert [c.tag for c in got] == [c.tag for c in expected], f"{where}: {etree.tostring(got)}"
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        assert_same(e, g, f"{where} child {i + 1}")


def check_times(got: bytes) -> None:
    """retryAt is a later time: at least 60 s after serverTime when rate-limited."""
    answer = parse_poll_response(got)
    for item in answer.answers:
        if isinstance(item, protocol.NoOffer) and item.retry_at is not None:
            least = timedelta(seconds=60 if item.reason == "rate-limited" else 1)
            assert item.retry_at >= answer.server_time + least, item


def run_examples(example: Example, server_option: str | None) -> int:
    """Send the guide's requests for one server, in order; the number sent."""
    count = 0
    for request, answer in pairs():
        options = request.options
        if ("server bound" in options) != (server_option == "server bound"):
            continue
        method, path, status = request.sent()
        where = f"docs/protocol.md line {request.line}"
        example.set_window("window closed" in options)
        serial = next((o.removeprefix("as ").strip() for o in options if o.startswith("as ")),
                      None)  # fmt: skip
        got_status, headers, body = example.send(method, path, request.text.encode(), serial)
        assert got_status == status, f"{where}: HTTP {got_status} {body[:300]!r}"
        assert headers["Content-Type"] == "application/xml", where
        assert_same(parse(answer.text), etree.fromstring(body), where)
        if got_status == 200 and path == "/poll":
            check_times(body)
            example.wait_recorded(parse(request.text))
        count += 1
    example.set_window(False)
    return count


def test_each_request_is_answered_as_the_guide_shows(example):
    assert run_examples(example, None) >= 20


def test_the_bind_serial_requests_are_answered_as_the_guide_shows(bound):
    assert run_examples(bound, "server bound") >= 4


# -- downloads: the guide's HTTP exchanges --------------------------------------------------


def exchange(block: Block) -> tuple[str, str, list[tuple[str, str]], str, list[tuple[str, str]]]:
    """(method, target, headers, status line, answer headers) of an ```http block."""
    request, _, response = block.text.strip().partition("\n\n")
    first, *fields = request.splitlines()
    method, target, _ = first.split()
    status, *answer = response.splitlines()
    split = [tuple(part.strip() for part in f.split(":", 1)) for f in (*fields, *answer)]
    return method, target, split[: len(fields)], status, split[len(fields) :]


HTTP_BLOCKS = [b for b in BLOCKS if b.lang == "http" and b.note == "send"]


@pytest.mark.parametrize("block", HTTP_BLOCKS, ids=lambda b: f"line{b.line}")
def test_each_download_exchange_is_answered_as_the_guide_shows(example, block):
    method, target, fields, status_line, expected = exchange(block)
    conn = http.client.HTTPSConnection(
        "127.0.0.1", example.server.port, context=example.server.context, timeout=30
    )
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in fields:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
        got = dict(response.getheaders())
    finally:
        conn.close()
    _, code, reason = status_line.split(" ", 2)
    assert (response.status, response.reason) == (int(code), reason), got
    for name, value in expected:
        assert name in got, f"line {block.line}: no {name} in {got}"
        if name not in ("Date", "Last-Modified"):  # values of the moment
            assert got[name] == value, f"line {block.line}: {name}: {got[name]}"
    if method == "GET":
        assert len(body) == int(got["Content-Length"])


# -- every error of the table, live ---------------------------------------------------------

PACKAGE = "30e14955ebf1352266dc2ff8067e68104607e750abb9d3b36582b8af909fcb58"  # the guide's GS
POLL = b'<poll protocol="1"><endpoint serial="ERR-1" type="GroupSeries" version="1"/></poll>'
REPORT_UNKNOWN = (
    b'<report protocol="1"><device serial="NEVER-POLLED" type="GroupSeries" version="1"'
    b' state="installed"/></report>'
)


def post(path: str, body: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        path.encode(), len(body), body
    )


TRIGGERS = {
    (400, "malformed-xml"): post("/poll", b"<poll protocol='1'>"),
    (400, "invalid-request"): post("/poll", b'<poll protocol="1"/>'),
    (404, "not-found"): b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n",
    (405, "method-not-allowed"): b"GET /poll HTTP/1.1\r\nHost: x\r\n\r\n",
    (409, "unknown-device"): post("/report", REPORT_UNKNOWN),
    (411, "length-required"): b"POST /poll HTTP/1.1\r\nHost: x\r\n\r\n" + POLL,
    (413, "too-large"): b"POST /report HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n",
    (414, "invalid-request"): b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    (416, "invalid-request"): (
        b"GET /packages/%s HTTP/1.1\r\nHost: x\r\nRange: bytes=2000000-\r\n\r\n" % PACKAGE.encode()
    ),
    (431, "invalid-request"): b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n",
}
NOT_TRIGGERED = {
    (403, "forbidden"): "sent by the bind-serial examples above",
    (500, "internal"): "no request makes the server fail, by design",
    (503, "unavailable"): "needs the database locked past its busy timeout: tests/test_faults.py",
}


def test_every_error_of_the_table_is_triggered_or_said_why_not():
    assert set(TRIGGERS) | set(NOT_TRIGGERED) == SERVER_ERRORS
    assert not set(TRIGGERS) & set(NOT_TRIGGERED)


@pytest.mark.parametrize("pair", sorted(TRIGGERS), ids=lambda p: f"{p[0]}-{p[1]}")
def test_each_error_is_answered_with_the_tables_status_and_code(example, pair):
    raw = socket.create_connection(("127.0.0.1", example.server.port), timeout=30)
    with example.server.context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(TRIGGERS[pair])
        response = http.client.HTTPResponse(sock, method="GET")
        response.begin()
        body = response.read()
    assert response.status == pair[0], body
    assert response.getheader("Content-Type") == "application/xml"
    document = etree.fromstring(body)
    assert SCHEMA.validate(document)
    assert document.get("code") == pair[1]
