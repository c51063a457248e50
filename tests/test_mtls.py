"""Who may speak for a device: ``serve --client-ca`` and ``--bind-serial`` (issue 5, item 5).

Everything goes over real HTTPS on 127.0.0.1 to a ``dynupdate serve`` process.
One trustme CA signs the server's certificate and the endpoints' client
certificates (the serial as CN, or as a SAN); a second CA stands for anyone else.
"""

from __future__ import annotations

import contextlib
import http.client
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from helpers import ServerProcess
from lxml import etree

from dynupdate.core.home import open_home

ENDPOINT = "8211ABC"  # the serial in the endpoint's certificate (CN)
OTHER = "9300XYZ"  # another endpoint, with its own certificate
ALIAS = "sn-4711"  # a serial given only as a SAN (trustme writes SANs in lower case)


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path

    def serve_args(self, *args: str) -> list[str]:
        return ["--cert", str(self.cert_file), "--key", str(self.key_file), *args]

    def client(self, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
        """A client trusting the server, presenting ``cert`` (none: no client certificate)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if cert is not None:
            cert.configure_cert(context)
        return context

    def endpoint(self, serial: str) -> ssl.SSLContext:
        """The client of the endpoint whose certificate names ``serial`` as its CN."""
        return self.client(self.ca.issue_cert(serial, common_name=serial))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    pki = Pki(ca, folder / "ca.pem", folder / "server.pem", folder / "server.key")
    ca.cert_pem.write_to_path(str(pki.ca_file))
    for i, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(str(pki.cert_file), append=i > 0)
    server.private_key_pem.write_to_path(str(pki.key_file))
    return pki


@pytest.fixture(scope="module")
def bound(pki, tmp_path_factory):
    """A server requiring client certificates, each speaking only for its own serial."""
    home = tmp_path_factory.mktemp("bound") / "home"
    args = pki.serve_args("--client-ca", str(pki.ca_file), "--bind-serial")
    running = ServerProcess(home, *args, cafile=pki.ca_file)
    yield running
    running.stop()
    running.assert_no_traceback()


@pytest.fixture(autouse=True)
def _no_server_died(request):
    yield
    if "bound" in request.fixturenames:
        server = request.getfixturevalue("bound")
        server.assert_alive()


def poll_body(serial: str, *peripherals: str, type_: str = "GroupSeries") -> bytes:
    children = "".join(
        f'<peripheral serial="{p}" type="EagleEyeIV" version="1.4.0"/>' for p in peripherals
    )
    return (
        f'<poll protocol="1"><endpoint serial="{serial}" type="{type_}"'
        f' version="6.2.1"/>{children}</poll>'
    ).encode()


def answers(answer) -> dict[str, tuple[str, str | None]]:
    """serial → (update or noUpdate, reason) of a 200 poll answer."""
    status, root = answer
    assert (status, root.tag) == (200, "pollResponse"), etree.tostring(root)
    return {child.get("serial"): (child.tag, child.get("reason")) for child in root}


def report_body(*serials: str, state: str = "downloading") -> bytes:
    devices = "".join(
        f'<device serial="{s}" type="GroupSeries" version="6.2.2" state="{state}"/>'
        for s in serials
    )
    return f'<report protocol="1">{devices}</report>'.encode()


def post(server: ServerProcess, context: ssl.SSLContext, path: str, body: bytes):
    """(status, the XML answer's root element) of one request on a fresh connection."""
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
    try:
        conn.request("POST", path, body=body)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    assert response.getheader("Content-Type") == "application/xml", data
    return response.status, etree.fromstring(data)


def assert_forbidden(answer, serial: str) -> None:
    status, root = answer
    assert (status, root.tag, root.get("code")) == (403, "error", "forbidden"), (
        status,
        etree.tostring(root),
    )
    assert serial in root.get("message")


def assert_refused(server: ServerProcess, context: ssl.SSLContext) -> None:
    """No HTTP answer: the handshake fails (under TLS 1.3, the client sees it on its first read)."""
    with pytest.raises((OSError, http.client.HTTPException)):
        post(server, context, "/poll", poll_body(ENDPOINT))


def registered(home: Path, serial: str) -> tuple | None:
    """(parent_serial, report_state) of a device, None when unknown."""
    with contextlib.closing(sqlite3.connect(home / "dynupdate.db")) as db:
        return db.execute(
            "SELECT parent_serial, report_state FROM endpoints WHERE serial = ?", (serial,)
        ).fetchone()


def wait_registered(home: Path, serial: str, timeout: float = 5.0) -> tuple:
    """Polls are written in groups (every 0.2 s): wait until this one is."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while (row := registered(home, serial)) is None:
        assert time.monotonic() < deadline, f"{serial} was never registered"
        pause.wait(0.05)
    return row


# -- mutual TLS ----------------------------------------------------------------------------


def test_a_client_without_a_certificate_is_refused(bound, pki):
    assert_refused(bound, pki.client())
    assert post(bound, pki.endpoint(ENDPOINT), "/poll", poll_body(ENDPOINT))[0] == 200


def test_a_certificate_from_another_ca_is_refused(bound, pki):
    stranger = trustme.CA().issue_cert(ENDPOINT, common_name=ENDPOINT)
    assert_refused(bound, pki.client(stranger))


def test_without_bind_serial_any_valid_certificate_speaks_for_any_serial(
    start_server, pki, tmp_path
):
    home = tmp_path / "open"
    args = pki.serve_args("--client-ca", str(pki.ca_file))
    server = start_server(home, *args, cafile=pki.ca_file)
    assert_refused(server, pki.client())  # still mutual TLS
    client = pki.endpoint(ENDPOINT)
    assert post(server, client, "/poll", poll_body(OTHER, "CAM-ANY"))[0] == 200
    assert post(server, client, "/report", report_body(OTHER))[0] == 200
    assert registered(home, OTHER) == (None, "downloading")


# -- --bind-serial ---------------------------------------------------------------------------


def test_an_endpoint_polls_for_its_own_serial_only(bound, pki):
    client = pki.endpoint(ENDPOINT)
    status, root = post(bound, client, "/poll", poll_body(ENDPOINT))
    assert (status, root.tag, root[0].get("serial")) == (200, "pollResponse", ENDPOINT)
    assert_forbidden(post(bound, client, "/poll", poll_body(OTHER)), OTHER)
    # Writes are grouped in order: once a later poll is written, a queued OTHER would be too.
    assert post(bound, client, "/poll", poll_body(ENDPOINT, "CAM-LATER"))[0] == 200
    wait_registered(bound.home, "CAM-LATER")
    assert registered(bound.home, OTHER) is None


def test_a_serial_in_a_san_binds_like_the_cn(bound, pki):
    client = pki.client(pki.ca.issue_cert(ALIAS, common_name="Room 12 codec"))
    assert post(bound, client, "/poll", poll_body(ALIAS, "CAM-SAN"))[0] == 200
    assert_forbidden(post(bound, client, "/poll", poll_body("sn-4712")), "sn-4712")
    assert post(bound, client, "/report", report_body(ALIAS))[0] == 200
    assert registered(bound.home, ALIAS) == (None, "downloading")


def row(home: Path, serial: str) -> tuple | None:
    with contextlib.closing(sqlite3.connect(home / "dynupdate.db")) as db:
        return db.execute("SELECT * FROM endpoints WHERE serial = ?", (serial,)).fetchone()


def test_another_endpoints_peripheral_is_forbidden_on_its_own(bound, pki):
    mine, theirs = pki.endpoint("EP-MINE"), pki.endpoint("EP-THEIRS")
    assert post(bound, mine, "/poll", poll_body("EP-MINE", "CAM-MINE", "MIC-MINE"))[0] == 200
    assert wait_registered(bound.home, "CAM-MINE") == ("EP-MINE", None)
    wait_registered(bound.home, "MIC-MINE")
    # Polling again with its own peripherals, and one more, stays fine.
    body = poll_body("EP-MINE", "CAM-MINE", "MIC-MINE", "MIC2-MINE")
    assert post(bound, mine, "/poll", body)[0] == 200
    wait_registered(bound.home, "MIC2-MINE")  # polls are written in order: both are
    before = row(bound.home, "CAM-MINE"), row(bound.home, "EP-MINE")
    # Another endpoint may not claim them, nor list an endpoint as its peripheral: those
    # are answered "forbidden", each on its own; the rest of the poll is answered as usual.
    body = poll_body("EP-THEIRS", "CAM-THEIRS", "CAM-MINE", "EP-MINE")
    answer = post(bound, theirs, "/poll", body)
    assert answers(answer) == {
        "EP-THEIRS": ("noUpdate", "no-policy"),
        "CAM-THEIRS": ("noUpdate", "no-policy"),
        "CAM-MINE": ("noUpdate", "forbidden"),
        "EP-MINE": ("noUpdate", "forbidden"),
    }
    # Written in the same group as CAM-THEIRS: nothing of the forbidden two was recorded.
    assert wait_registered(bound.home, "CAM-THEIRS") == ("EP-THEIRS", None)
    assert (row(bound.home, "CAM-MINE"), row(bound.home, "EP-MINE")) == before


def test_a_squatted_camera_blocks_neither_its_endpoint_nor_its_update(
    bound, pki, cli, make_file
):
    """Issue 9, item 6: whoever claims a camera first cannot get its endpoint refused."""
    cli("--home", bound.home, "package", "add", make_file(b"room"), "--type", "Room",
        "--version", "7.0")  # fmt: skip
    cli("--home", bound.home, "policy", "set", "Room", "--version", "7.0")
    squatter, rightful = pki.endpoint("SQUATTER"), pki.endpoint("ROOM-1")
    # The squatter names ROOM-1's camera as its own before ROOM-1 ever polled.
    assert post(bound, squatter, "/poll", poll_body("SQUATTER", "ROOM-1-CAM"))[0] == 200
    assert wait_registered(bound.home, "ROOM-1-CAM") == ("SQUATTER", None)

    answer = post(bound, rightful, "/poll", poll_body("ROOM-1", "ROOM-1-CAM", type_="Room"))
    assert answers(answer) == {
        "ROOM-1": ("update", None),  # its own update is offered as without the camera
        "ROOM-1-CAM": ("noUpdate", "forbidden"),
    }
    wait_registered(bound.home, "ROOM-1")
    assert post(bound, rightful, "/report", report_body("ROOM-1"))[0] == 200
    assert_forbidden(post(bound, rightful, "/report", report_body("ROOM-1-CAM")), "ROOM-1-CAM")
    assert registered(bound.home, "ROOM-1-CAM") == ("SQUATTER", None)

    # The admin frees the camera: the next poll of its endpoint claims it.
    cli("--home", bound.home, "endpoint", "forget", "ROOM-1-CAM")
    assert registered(bound.home, "ROOM-1-CAM") is None
    answer = post(bound, rightful, "/poll", poll_body("ROOM-1", "ROOM-1-CAM", type_="Room"))
    assert answers(answer)["ROOM-1-CAM"] == ("noUpdate", "no-policy")
    assert wait_registered(bound.home, "ROOM-1-CAM") == ("ROOM-1", None)
    assert post(bound, rightful, "/report", report_body("ROOM-1-CAM"))[0] == 200


def test_an_endpoint_claimed_as_a_peripheral_still_polls_as_itself(bound, pki):
    # Refusing it would let anyone lock an endpoint out by naming it first.
    squatter, rightful = pki.endpoint("SQUATTER-2"), pki.endpoint("ROOM-2")
    assert post(bound, squatter, "/poll", poll_body("SQUATTER-2", "ROOM-2"))[0] == 200
    assert wait_registered(bound.home, "ROOM-2") == ("SQUATTER-2", None)
    assert answers(post(bound, rightful, "/poll", poll_body("ROOM-2"))) == {
        "ROOM-2": ("noUpdate", "no-policy")
    }
    deadline = time.monotonic() + 5
    while registered(bound.home, "ROOM-2") != (None, None):  # its grouped write
        assert time.monotonic() < deadline, registered(bound.home, "ROOM-2")
        threading.Event().wait(0.05)
    answer = post(bound, squatter, "/poll", poll_body("SQUATTER-2", "ROOM-2"))
    assert answers(answer)["ROOM-2"] == ("noUpdate", "forbidden")
    assert_forbidden(post(bound, squatter, "/report", report_body("ROOM-2")), "ROOM-2")


def test_reports_for_its_own_serial_and_peripherals_only(bound, pki):
    mine, theirs = pki.endpoint("REP-MINE"), pki.endpoint("REP-THEIRS")
    assert post(bound, mine, "/poll", poll_body("REP-MINE", "REP-CAM"))[0] == 200
    assert post(bound, theirs, "/poll", poll_body("REP-THEIRS"))[0] == 200
    wait_registered(bound.home, "REP-CAM")
    wait_registered(bound.home, "REP-THEIRS")

    assert post(bound, mine, "/report", report_body("REP-MINE", "REP-CAM"))[0] == 200
    assert registered(bound.home, "REP-MINE") == (None, "downloading")
    assert registered(bound.home, "REP-CAM") == ("REP-MINE", "downloading")
    assert_forbidden(post(bound, mine, "/report", report_body("REP-THEIRS")), "REP-THEIRS")
    # One foreign device refuses the whole report: nothing of it is stored.
    answer = post(bound, mine, "/report", report_body("REP-MINE", "REP-THEIRS", state="failed"))
    assert_forbidden(answer, "REP-THEIRS")
    assert_forbidden(post(bound, theirs, "/report", report_body("REP-CAM")), "REP-CAM")
    assert_forbidden(post(bound, mine, "/report", report_body("NEVER-SEEN")), "NEVER-SEEN")
    assert registered(bound.home, "REP-MINE") == (None, "downloading")
    assert registered(bound.home, "REP-CAM") == ("REP-MINE", "downloading")
    assert registered(bound.home, "REP-THEIRS") == (None, None)
    assert registered(bound.home, "NEVER-SEEN") is None


def test_a_report_right_after_a_peripherals_first_poll_is_accepted(bound, pki):
    # A device reports "downloading" as soon as its poll is answered, before the
    # grouped write of that poll has registered the new peripheral.
    client = pki.endpoint("FAST-EP")
    assert post(bound, client, "/poll", poll_body("FAST-EP", "FAST-CAM"))[0] == 200
    assert post(bound, client, "/report", report_body("FAST-CAM"))[0] == 200
    assert registered(bound.home, "FAST-CAM") == ("FAST-EP", "downloading")


# -- option errors ---------------------------------------------------------------------------


def serve_fails(home: Path, *args: str) -> subprocess.CompletedProcess:
    """``dynupdate serve`` that must refuse to start: a server that starts is killed and fails."""
    open_home(home).close()  # an existing home: a new one is announced on a line of its own
    command = [sys.executable, "-m", "dynupdate", "--home", str(home), "serve",
               "--host", "127.0.0.1", "--port", "0", "--workers", "1", *args]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"serve {args} started instead of refusing: {e.stderr}") from None
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return result


def test_bind_serial_without_client_ca_is_refused(tmp_path):
    result = serve_fails(tmp_path / "home", "--bind-serial")
    assert "--client-ca" in result.stderr


@pytest.mark.parametrize("kind", ["missing", "not-pem", "a-key", "folder"])
def test_a_bad_client_ca_file_is_a_one_line_error(tmp_path, pki, kind):
    path = tmp_path / f"ca-{kind}.pem"
    if kind == "not-pem":
        path.write_text("this is not a certificate\n")
    elif kind == "a-key":
        path.write_bytes(pki.key_file.read_bytes())
    elif kind == "folder":
        path.mkdir()
    result = serve_fails(tmp_path / "home", *pki.serve_args("--client-ca", str(path)))
    assert str(path) in result.stderr
