"""The reference endpoint against the real server over HTTPS (SPEC section 3, device side)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import ServerProcess
from typer.testing import CliRunner

from dynupdate.cli import app
from dynupdate.core.errors import InvalidInput
from dynupdate.endpoint import (
    Device,
    Endpoint,
    EndpointClient,
    EndpointError,
    Exchange,
    NoOffer,
    PollAnswer,
    parse_poll_response,
)
from dynupdate.fingerprints import fingerprint

NOW = datetime(2026, 11, 27, 16, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("endpoint-ref") / "home"
    running = ServerProcess(home, "--poll-interval", "60")
    yield running
    running.stop()


def admin(server: ServerProcess, *args) -> str:
    result = CliRunner().invoke(app, ["--home", str(server.home), *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout


def publish(server, tmp_path, type_, version, content: bytes) -> str:
    """Upload a package and make it the policy of its type; its SHA-256."""
    path = tmp_path / f"{type_}-{version}.pup"
    path.write_bytes(content)
    admin(server, "package", "add", path, "--type", type_, "--version", version)
    admin(server, "policy", "set", type_, "--version", version)
    return hashlib.sha256(content).hexdigest()


def shown(server, serial) -> dict:
    return json.loads(admin(server, "endpoint", "show", serial, "--json"))


def registered(server, serial, timeout: float = 5.0) -> dict:
    """A poll is recorded within a second: poll the CLI for it, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        result = CliRunner().invoke(
            app, ["--home", str(server.home), "endpoint", "show", serial, "--json"]
        )
        if result.exit_code == 0:
            return json.loads(result.stdout)
        assert time.monotonic() < deadline, result.output
        time.sleep(0.05)


def client_for(server, trace=None, **options) -> EndpointClient:
    return EndpointClient(
        f"https://127.0.0.1:{server.port}", cafile=server.cafile, trace=trace, **options
    )


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def wait_for_log(server: ServerProcess, text: str, timeout: float = 5.0) -> None:
    """The server's access log reaches us through a pipe: poll it, bounded."""
    deadline = time.monotonic() + timeout
    while not any(text in line for line in server.log):
        assert time.monotonic() < deadline, f"{text!r} not in the server log"
        time.sleep(0.02)


def test_update_with_a_peripheral_reports_each_step(server, tmp_path):
    content = os.urandom(50_000)
    sha = publish(server, tmp_path, "RefGS", "2.0", content)
    publish(server, tmp_path, "RefCam", "1.5", b"camera" * 1000)
    exchanges: list[Exchange] = []
    installed = []

    async def installer(device, offer, path):
        installed.append((device.serial, offer.version, path.read_bytes() == content or path.name))

    endpoint = Endpoint(
        "REF-1",
        "RefGS",
        "1.0",
        peripherals=[Device("REF-1-CAM", "RefCam", "1.0")],
        model="Room 500",
        tz="Europe/Berlin",
        workdir=tmp_path / "work",
        installer=installer,
    )
    answer = run(endpoint.poll_once(client_for(server, exchanges.append)))

    assert answer.poll_interval == 60
    assert [(d.serial, d.status, d.version) for d in endpoint.devices] == [
        ("REF-1", "up-to-date", "2.0"),
        ("REF-1-CAM", "up-to-date", "1.5"),
    ]
    assert installed[0] == ("REF-1", "2.0", True)
    steps = [(e.method, e.url.rsplit("/", 1)[-1][:8], e.status) for e in exchanges]
    assert (
        steps[:5]
        == [
            ("POST", "poll", 200),
            ("POST", "report", 200),  # downloading
            ("GET", sha[:8], 200),
            ("POST", "report", 200),  # installing
            ("POST", "report", 200),  # installed
        ]
    )
    assert list((tmp_path / "work").iterdir()) == [], "nothing is left behind after installing"
    data = shown(server, "REF-1")
    assert (data["version"], data["status"], data["tz"]) == ("2.0", "up-to-date", "Europe/Berlin")
    events = [h["event"] for h in reversed(data["history"])]
    assert events[-3:] == ["downloading", "installing", "installed"]
    assert shown(server, "REF-1-CAM")["parent_serial"] == "REF-1"

    again = run(endpoint.poll_once(client_for(server)))
    assert [a.reason for a in again.answers] == ["up-to-date", "up-to-date"]


class CuttingProxy:
    """A TCP relay to the server that cuts the first connection sending more than ``cut`` bytes.

    TLS passes through untouched, so the client still checks the server's certificate.
    """

    def __init__(self, port: int, cut: int | None, every: bool = False) -> None:
        self.port, self.cut, self.every, self.cuts = port, cut, every, 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _relay(self, client_reader, client_writer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)

        async def pipe(src, dst, limit):
            sent = 0
            try:
                while data := await src.read(16384):
                    if limit is not None and sent + len(data) > limit:
                        dst.write(data[: limit - sent])
                        await dst.drain()
                        self.cuts += 1
                        break
                    sent += len(data)
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                for w in (client_writer, writer):
                    w.close()

        limit = self.cut if self.cuts == 0 or self.every else None
        await asyncio.gather(pipe(client_reader, writer, None), pipe(reader, client_writer, limit))

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


def test_interrupted_download_resumes_with_range_and_if_range(server, tmp_path):
    content = os.urandom(1_000_000)
    sha = publish(server, tmp_path, "Resume", "2.0", content)
    exchanges: list[Exchange] = []

    async def scenario():
        proxy = CuttingProxy(server.port, cut=300_000)
        port = await proxy.start()
        try:
            client = EndpointClient(
                f"https://127.0.0.1:{port}", cafile=server.cafile, trace=exchanges.append
            )
            endpoint = Endpoint("RES-1", "Resume", "1.0", workdir=tmp_path / "work")
            await endpoint.poll_once(client)
            return endpoint, proxy.cuts
        finally:
            await proxy.close()

    endpoint, cuts = run(scenario())
    assert cuts == 1
    gets = [e for e in exchanges if e.method == "GET"]
    assert len(gets) == 2
    first, second = gets
    assert first.error == "reset" and 0 < first.received < len(content)
    assert "Range" not in first.request_headers
    assert second.request_headers["Range"] == f"bytes={first.received}-"
    assert second.request_headers["If-Range"] == f'"{sha}"'
    assert second.status == 206
    assert second.response_headers["content-range"] == (
        f"bytes {first.received}-{len(content) - 1}/{len(content)}"
    )
    assert second.received == len(content) - first.received
    assert endpoint.device.status == "up-to-date" and endpoint.device.version == "2.0"
    wait_for_log(server, f"GET /packages/{sha} 206 {len(content) - first.received} ")


def test_a_download_cut_every_time_stays_pending_and_resumes_at_the_next_poll(server, tmp_path):
    content = os.urandom(1_000_000)
    sha = publish(server, tmp_path, "Flaky", "2.0", content)
    work = tmp_path / "work"

    async def scenario():
        proxy = CuttingProxy(server.port, cut=200_000, every=True)
        port = await proxy.start()
        try:
            client = EndpointClient(f"https://127.0.0.1:{port}", cafile=server.cafile)
            endpoint = Endpoint("FLAKY-1", "Flaky", "1.0", workdir=work, max_attempts=1)
            await endpoint.poll_once(client)
            first = (endpoint.device.status, (work / f"{sha}.part").stat().st_size)
            proxy.cut = None  # the network is fine again
            await endpoint.poll_once(client)
            return first, endpoint.device, client.stats
        finally:
            await proxy.close()

    (status, kept), device, stats = run(scenario())
    assert status == "pending", "a network failure is not a failed update"
    assert 0 < kept < len(content), "what came is kept for the next attempt"
    assert stats.downloads == 4 and stats.errors["reset"] == 3
    assert (device.status, device.version) == ("up-to-date", "2.0")
    assert stats.bytes_downloaded == len(content), "no byte was fetched twice"
    assert registered(server, "FLAKY-1")["status"] == "up-to-date"


def test_partial_file_on_disk_resumes_or_restarts_when_the_etag_changed(server, tmp_path):
    content = os.urandom(200_000)
    sha = publish(server, tmp_path, "OnDisk", "2.0", content)
    [offer] = run(client_for(server).poll(_poll_endpoint("DISK-1", "OnDisk"))).answers
    work = tmp_path / "work"
    work.mkdir()
    (work / f"{sha}.part").write_bytes(content[:123_456])
    (work / f"{sha}.etag").write_text(f'"{sha}"')
    exchanges: list[Exchange] = []
    path = run(client_for(server, exchanges.append).download(offer, work))
    assert path.read_bytes() == content
    assert (exchanges[0].status, exchanges[0].received) == (206, 200_000 - 123_456)
    assert sorted(p.name for p in work.iterdir()) == [sha]

    path.unlink()
    (work / f"{sha}.part").write_bytes(b"x" * 1000)
    (work / f"{sha}.etag").write_text('"another-entity"')
    exchanges.clear()
    path = run(client_for(server, exchanges.append).download(offer, work))
    assert path.read_bytes() == content
    assert exchanges[0].request_headers["If-Range"] == '"another-entity"'
    assert (exchanges[0].status, exchanges[0].received) == (200, 200_000), "starts over"


def _poll_endpoint(serial, type_, version="1.0"):
    from dynupdate.protocol import PollEndpoint

    return PollEndpoint(serial, type_, version)


@pytest.mark.parametrize(
    ("tamper", "kind", "words"),
    [
        (lambda data: bytes(b ^ 0xFF for b in data[:64]) + data[64:], "sha256-mismatch", "SHA-256"),
        (lambda data: data + b"trailing bytes", "too-large", "announced"),
        (lambda data: data[:-100], "size-mismatch", "announced"),
    ],
    ids=["other-bytes", "longer", "shorter"],
)
def test_tampered_package_is_refused_reported_and_deleted(server, tmp_path, tamper, kind, words):
    type_ = f"Tamper{kind.split('-')[0].title()}"
    content = os.urandom(100_000)
    sha = publish(server, tmp_path, type_, "2.0", content)
    stored = server.home / "packages" / sha[:2] / sha
    stored.chmod(0o600)
    stored.write_bytes(tamper(content))  # the store's bytes change under the server
    endpoint = Endpoint(f"{type_}-1", type_, "1.0", workdir=tmp_path / "work", max_attempts=1)
    client = client_for(server)
    run(endpoint.poll_once(client))

    device = endpoint.device
    assert (device.status, device.version) == ("failed", "1.0")
    assert words in device.detail
    assert client.stats.errors[kind] == 1
    assert list((tmp_path / "work").iterdir()) == [], "what was received is deleted"
    data = shown(server, f"{type_}-1")
    assert data["status"] == "failed" and words in data["report_detail"]
    assert data["version"] == "1.0"

    run(endpoint.poll_once(client))  # max_attempts=1: it does not try that package again
    assert client.stats.downloads == 1 and device.status == "failed"


def test_a_session_keeps_one_connection_and_shares_the_clients_stats_and_bound(server):
    """What ClientSession documents: its own connection and slot; shared counters and bound."""
    from dynupdate.protocol import DeviceReport, PollEndpoint

    client = client_for(server, max_connections=1)
    me = PollEndpoint("SESSION-1", "SessionType", "1.0")
    report = [DeviceReport("SESSION-1", "SessionType", "1.0", "installed")]

    async def scenario():
        async with client.session() as first:
            assert first.stats is client.stats
            await first.poll(me)
            await first.report(report)
            kept = (client.stats.requests, client.stats.connections)
            # The only slot is the first session's until it ends: the second one waits
            # for it before its request is sent (and counted).
            second = client.session()
            waiting = asyncio.create_task(second.poll(me))
            for _ in range(20):
                await asyncio.sleep(0)
            queued = (waiting.done(), client.stats.requests)
        await waiting  # the first session is over: its slot is free
        second.release()
        return kept, queued, (client.stats.requests, client.stats.connections)

    kept, queued, after = run(scenario())
    assert kept == (2, 1), "poll and report on one connection, each request counted once"
    assert queued == (False, 2), "the second session waits for the shared bound"
    assert after == (3, 2)
    assert client.stats.polls == 2 and client.stats.reports == 1 and not client.stats.errors


def test_a_body_growing_past_the_announced_size_is_cut_and_deleted(tmp_path):
    from dynupdate.endpoint.files import FileReceiver
    from dynupdate.endpoint.transport import ClientStats

    part, tag = tmp_path / "p.part", tmp_path / "p.etag"
    receiver = FileReceiver(part, tag, 0, 10, ClientStats())
    receiver.begin(200, {"etag": '"abc"'})  # no Content-Length to refuse it by
    receiver.write(b"123456")
    with pytest.raises(EndpointError) as refused:
        receiver.write(b"78901")
    assert refused.value.kind == "too-large"
    assert not part.exists() and not tag.exists()


def test_head_mode_checks_headers_without_the_bytes(server, tmp_path):
    publish(server, tmp_path, "HeadOnly", "2.0", os.urandom(300_000))
    exchanges: list[Exchange] = []
    client = client_for(server, exchanges.append)
    endpoint = Endpoint("HEAD-1", "HeadOnly", "1.0", download="head", workdir=tmp_path / "w")
    run(endpoint.poll_once(client))
    assert [e.method for e in exchanges] == ["POST", "POST", "HEAD", "POST", "POST"]
    assert client.stats.bytes_downloaded == 0 and endpoint.device.version == "2.0"
    assert shown(server, "HEAD-1")["status"] == "up-to-date"


def test_head_mode_refuses_a_package_of_another_size(server, tmp_path):
    content = os.urandom(30_000)
    sha = publish(server, tmp_path, "HeadBad", "2.0", content)
    stored = server.home / "packages" / sha[:2] / sha
    stored.chmod(0o600)
    stored.write_bytes(content[:-1])
    client = client_for(server)
    endpoint = Endpoint("HEADBAD-1", "HeadBad", "1.0", download="head", max_attempts=1)
    run(endpoint.poll_once(client))
    assert (endpoint.device.status, endpoint.device.version) == ("failed", "1.0")
    assert client.stats.errors == {"size-mismatch": 1} and client.stats.heads == 1
    assert "29999 bytes; 30000 were announced" in shown(server, "HEADBAD-1")["report_detail"]


def test_pinned_certificate(server):
    right = fingerprint(server.cafile)
    pinned = EndpointClient(f"https://127.0.0.1:{server.port}", pin=right.upper())
    answer = run(pinned.poll(_poll_endpoint("PIN-OK", "Unmanaged")))
    assert answer.answers[0].reason == "no-policy"
    colons = ":".join(right[i : i + 2] for i in range(0, 64, 2))
    with_colons = EndpointClient(f"https://127.0.0.1:{server.port}", pin=colons)
    assert run(with_colons.poll(_poll_endpoint("PIN-OK", "Unmanaged"))).answers

    wrong = EndpointClient(f"https://127.0.0.1:{server.port}", pin="00" * 32)
    with pytest.raises(EndpointError) as refused:
        run(wrong.poll(_poll_endpoint("PIN-BAD", "Unmanaged")))
    assert refused.value.kind == "pin-mismatch" and right in str(refused.value)
    result = CliRunner().invoke(app, ["--home", str(server.home), "endpoint", "show", "PIN-BAD"])
    assert result.exit_code == 1, "nothing was sent before the pin was checked"


def test_untrusted_certificate_without_pin_or_ca(server):
    client = EndpointClient(f"https://127.0.0.1:{server.port}")  # the system store
    with pytest.raises(EndpointError) as refused:
        run(client.poll(_poll_endpoint("NOCA", "Unmanaged")))
    assert refused.value.kind == "tls"


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"url": "http://127.0.0.1:8443"}, "http://127.0.0.1:8443"),
        ({"url": "https://"}, "https://"),
        ({"url": "https://h", "pin": "xyz"}, "xyz"),
        ({"url": "https://h", "pin": "ab:" * 32}, "ab:"),
        ({"url": "https://h", "cafile": "/nonexistent/ca.pem"}, "/nonexistent/ca.pem"),
    ],
)
def test_bad_client_settings_name_the_value(arguments, named):
    url = arguments.pop("url")
    with pytest.raises(InvalidInput) as refused:
        EndpointClient(url, **arguments)
    assert named in str(refused.value)


def test_in_call_endpoint_never_polls_until_the_call_ends(server, tmp_path):
    exchanges: list[Exchange] = []
    client = client_for(server, exchanges.append)
    endpoint = Endpoint("CALL-1", "Unmanaged", "1.0", poll_interval=0.05, workdir=tmp_path)

    async def scenario():
        endpoint.start_call()
        task = asyncio.create_task(endpoint.run(client))
        await asyncio.sleep(0.5)  # a bounded observation: ten poll intervals
        assert exchanges == [], "no poll while in a call"
        endpoint.end_call()
        loop = asyncio.get_running_loop()
        ended = loop.time()
        while not exchanges:
            await asyncio.sleep(0.01)
        polled_after = loop.time() - ended
        endpoint.stop()
        await asyncio.wait_for(task, 10)
        return polled_after

    polled_after = run(scenario())
    assert polled_after < 1.0, "it polls as soon as the call ends"
    assert exchanges[0].method == "POST" and exchanges[0].url.endswith("/poll")
    assert registered(server, "CALL-1")["in_call"] is False


def test_install_waits_for_a_call_that_started_during_the_download(server, tmp_path):
    publish(server, tmp_path, "CallDl", "2.0", os.urandom(10_000))
    exchanges: list[Exchange] = []
    endpoint = Endpoint("CALLDL-1", "CallDl", "1.0", workdir=tmp_path / "w")

    def trace(exchange):
        exchanges.append(exchange)
        if exchange.method == "GET":
            endpoint.start_call()  # the call starts as the download ends

    async def scenario():
        task = asyncio.create_task(endpoint.poll_once(client_for(server, trace)))
        while not endpoint.in_call:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        reports_during_call = sum(e.url.endswith("/report") for e in exchanges)
        endpoint.end_call()
        await task
        return reports_during_call

    assert run(scenario()) == 1, "only 'downloading' before the call ended"
    assert endpoint.device.version == "2.0"


def _answer(interval: int, retry_in: float | None) -> PollAnswer:
    retry = NOW + timedelta(seconds=retry_in) if retry_in is not None else None
    return PollAnswer(interval, NOW, (NoOffer("S", "T", "outside-window", retry),))


@pytest.mark.parametrize(
    ("interval", "retry_in", "low", "high"),
    [
        (600, None, 540, 660),  # pollInterval ± 10 %
        (3600, 120, 120, 120 + 60 * 0.1),  # retryAt comes first: then, plus a little jitter
        (60, 7200, 54, 66),  # retryAt is far: keep polling at the interval
        (600, -30, 0, 60 * 0.1),  # retryAt already passed on the server's clock
    ],
)
def test_waits_obey_poll_interval_and_retry_at_with_jitter(interval, retry_in, low, high):
    endpoint = Endpoint("J", "T", "1", rng=random.Random(7))
    delays = [endpoint._next_delay(_answer(interval, retry_in)) for _ in range(200)]
    assert low <= min(delays) and max(delays) <= high
    assert len({round(d, 3) for d in delays}) > 100, "jittered"


def test_poll_interval_override_wins():
    endpoint = Endpoint("J", "T", "1", poll_interval=5, jitter=0)
    assert endpoint._next_delay(_answer(3600, None)) == 5


@pytest.mark.parametrize(
    "body",
    [
        b'<!DOCTYPE x [<!ENTITY e "x">]><pollResponse protocol="1"/>',
        b'<pollResponse protocol="2"/>',
        b"<pollResponse",
        b'<pollResponse protocol="1"><update serial="A" type="T" version="2" size="-1"'
        b' sha256="00" url="https://h/p"/></pollResponse>',
        b'<pollResponse protocol="1"><update serial="A" type="T" version="2" size="1"'
        b' sha256="' + b"a" * 64 + b'" url="http://h/p"/></pollResponse>',
    ],
    ids=["doctype", "protocol", "not-xml", "bad-update", "plain-http-url"],
)
def test_bad_poll_responses_are_refused(body):
    with pytest.raises(EndpointError) as refused:
        parse_poll_response(body)
    assert refused.value.kind == "bad-response"


def test_poll_response_ignores_unknown_parts():
    answer = parse_poll_response(
        b'<pollResponse protocol="1" pollInterval="30" serverTime="2026-11-27T16:00:00Z"'
        b' future="x"><hint/><noUpdate serial="A" type="T" reason="paused-by-admin"/>'
        b"</pollResponse>"
    )
    assert answer.poll_interval == 30 and answer.answers[0].reason == "paused-by-admin"
    endpoint = Endpoint("A", "T", "1")
    assert endpoint.device.status == "not-polled"


def test_the_installer_gets_the_activation_key_of_the_offer(server, tmp_path):
    publish(server, tmp_path, "Keyed", "2.0", os.urandom(3_000))
    keys = tmp_path / "keys.csv"
    keys.write_text("serial,version,key\nKEYED-1,2.0,7H2Q-KD9L-PP3X\n")
    admin(server, "key", "import", keys)
    given = {}

    async def installer(device, offer, path):
        given[device.serial] = offer.activation_key

    for serial in ("KEYED-1", "KEYED-2"):  # the second has no key
        endpoint = Endpoint(serial, "Keyed", "1.0", workdir=tmp_path / serial, installer=installer)
        run(endpoint.poll_once(client_for(server)))
    assert given == {"KEYED-1": "7H2Q-KD9L-PP3X", "KEYED-2": None}


def test_an_install_that_raises_is_reported_failed_with_its_reason(server, tmp_path):
    publish(server, tmp_path, "BadInstall", "2.0", os.urandom(5_000))
    exchanges: list[Exchange] = []

    async def installer(device, offer, path):
        raise OSError("flash partition is read-only")

    endpoint = Endpoint("BADINST-1", "BadInstall", "1.0", workdir=tmp_path / "w",
                        installer=installer)  # fmt: skip
    run(endpoint.poll_once(client_for(server, exchanges.append)))

    device = endpoint.device
    assert (device.status, device.version) == ("failed", "1.0")
    assert device.detail == "Install failed: flash partition is read-only"
    assert [e.url.rsplit("/", 1)[-1] for e in exchanges if e.method == "POST"] == [
        "poll", "report", "report", "report"
    ]  # fmt: skip
    data = shown(server, "BADINST-1")
    assert (data["status"], data["version"]) == ("failed", "1.0")
    assert data["report_detail"] == device.detail
    events = [h["event"] for h in reversed(data["history"])]
    assert events[-3:] == ["downloading", "installing", "failed"]
    assert list((tmp_path / "w").iterdir()) == [], "the package is removed after a failed install"


def test_a_device_forgotten_during_its_update_polls_and_reports_again(server, tmp_path):
    publish(server, tmp_path, "Forgot", "2.0", os.urandom(5_000))
    exchanges: list[Exchange] = []

    async def installer(device, offer, path):
        # The admin forgets the device while it installs: its "installed" report is
        # refused (409 unknown-device) until a poll has registered it again.
        admin(server, "endpoint", "forget", "FORGOT-1")

    endpoint = Endpoint("FORGOT-1", "Forgot", "1.0", workdir=tmp_path / "w", installer=installer)
    run(endpoint.poll_once(client_for(server, exchanges.append)))

    assert (endpoint.device.status, endpoint.device.version) == ("up-to-date", "2.0")
    assert [(e.url.rsplit("/", 1)[-1], e.status) for e in exchanges if e.method == "POST"] == [
        ("poll", 200), ("report", 200), ("report", 200),
        ("report", 409), ("poll", 200), ("report", 200),
    ]  # fmt: skip
    data = shown(server, "FORGOT-1")
    assert (data["status"], data["version"], data["report_state"]) == (
        "up-to-date", "2.0", "installed"
    )  # fmt: skip
    assert endpoint.polls == 2


def test_a_poll_forced_during_a_call_says_so(server, tmp_path):
    publish(server, tmp_path, "ForcedCall", "2.0", b"x" * 100)
    endpoint = Endpoint("FORCED-1", "ForcedCall", "1.0", workdir=tmp_path)
    endpoint.start_call()
    answer = run(endpoint.poll_once(client_for(server)))
    assert [a.reason for a in answer.answers] == ["in-call"]
    assert (endpoint.device.status, endpoint.device.version) == ("pending", "1.0")
    assert registered(server, "FORCED-1")["in_call"] is True


def record_waits(endpoint: Endpoint, count: int) -> list[float]:
    """Stand in for the endpoint's sleep: note each wait ``run`` asks for, stop after ``count``."""
    waits: list[float] = []

    async def sleep(delay: float) -> None:
        waits.append(delay)
        if len(waits) >= count:
            endpoint.stop()

    endpoint._sleep = sleep
    return waits


def test_run_waits_the_servers_poll_interval_with_jitter(server, tmp_path):
    exchanges: list[Exchange] = []
    endpoint = Endpoint("RUN-1", "Unmanaged", "1.0", workdir=tmp_path)
    waits = record_waits(endpoint, 1)
    run(endpoint.run(client_for(server, exchanges.append)))
    assert [e.url.rsplit("/", 1)[-1] for e in exchanges] == ["poll"], "polls at once on start"
    [wait] = waits
    assert 54 <= wait <= 66 and wait != 60, "the server's pollInterval 60 s, ± 10 % jitter"


def test_run_comes_back_at_retry_at_when_the_window_is_closed(start_server, tmp_path):
    server = start_server(tmp_path / "home", "--poll-interval", "86400", "--no-access-log")
    publish(server, tmp_path, "Windowed", "2.0", b"w" * 100)
    opens = datetime.now(UTC) + timedelta(minutes=2)
    admin(server, "window", "set", "--start", opens.strftime("%H:%M"), "--duration", "1m")
    endpoint = Endpoint("WIN-1", "Windowed", "1.0", workdir=tmp_path)
    waits = record_waits(endpoint, 1)
    run(endpoint.run(client_for(server)))

    [item] = endpoint.last_answer.answers
    assert (item.reason, endpoint.device.status) == ("outside-window", "pending")
    until_retry = (item.retry_at - endpoint.last_answer.server_time).total_seconds()
    assert 0 < until_retry < 3 * 60, "the next opening, spread over its first half"
    [wait] = waits
    assert until_retry <= wait <= until_retry + 6, "retryAt (not 86400 s), plus a little jitter"


def test_run_backs_off_after_failed_polls():
    import socket

    with socket.socket() as probe:  # a port on 127.0.0.1 where nobody listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = Endpoint("BACKOFF-1", "T", "1.0", rng=random.Random(3))
    waits = record_waits(endpoint, 4)
    client = EndpointClient(f"https://127.0.0.1:{port}", pin="00" * 32)
    run(endpoint.run(client))
    assert client.stats.errors["connect"] == 4
    for wait, base in zip(waits, (5, 10, 20, 40), strict=True):
        assert base * 0.9 <= wait <= base * 1.1


def _poll_response_with(serial: str, prolog: str) -> str:
    return (
        f'{prolog}<pollResponse protocol="1" pollInterval="60" serverTime="2026-11-27T16:00:00Z">'
        f'<noUpdate serial="{serial}" type="T" reason="no-policy"/></pollResponse>'
    )


_UTF16 = '<?xml version="1.0" encoding="UTF-16"?>'
_ENTITY = '<!DOCTYPE r [<!ENTITY x "EXPANDED">]>'
_EXTERNAL = '<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/hostname">]>'
_LAUGHS = (
    '<!DOCTYPE r [<!ENTITY x "&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY b "&c;&c;&c;&c;&c;&c;&c;&c;">'
    '<!ENTITY c "lol">]>'
)


@pytest.mark.parametrize(
    "body",
    [
        _poll_response_with("&x;", _ENTITY).encode(),
        # UTF-16 hides the DOCTYPE from a byte search: only the parser can refuse it.
        _poll_response_with("&x;", _UTF16 + _ENTITY).encode("utf-16"),
        _poll_response_with("&x;", _UTF16 + _EXTERNAL).encode("utf-16"),
        _poll_response_with("&x;", _UTF16 + _LAUGHS).encode("utf-16"),
    ],
    ids=["doctype", "utf16-entity", "utf16-external-entity", "utf16-laughs"],
)
def test_the_client_refuses_an_answer_with_entities_however_encoded(body):
    """The client reads answers as the server reads requests: no DTD, no entity, UTF-8."""
    with pytest.raises(EndpointError) as refused:
        parse_poll_response(body)
    assert refused.value.kind == "bad-response"


# -- the documented example ----------------------------------------------------------------

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize(
    ("document", "printed"),
    [
        ("README.md", ["installing 8211ABC 6.2.2.0-100", "up-to-date 6.2.2.0-100"]),
        ("docs/simulate.md", ["up-to-date 6.2.2.0-100"]),
    ],
)
def test_the_documented_example_runs_against_a_real_server(
    start_server, tmp_path, document, printed
):
    """The example is run as written; only the server's address, its pin and paths change."""
    import re
    import subprocess
    import sys
    import threading

    [code] = [
        block
        for block in re.findall(r"```python\n(.*?)```", (ROOT / document).read_text(), re.S)
        if "EndpointClient(" in block
    ]
    server = start_server(tmp_path / "home", "--poll-interval", "1")
    publish(server, tmp_path, "GroupSeries", "6.2.2.0-100", os.urandom(20_000))
    work = tmp_path / "device"
    for old, new in [
        ('"https://updates.example.com:8443"', f'"https://127.0.0.1:{server.port}"'),
        (re.search(r'pin="3f5c…[^"]*"', code)[0], f'pin="{fingerprint(server.cafile)}"'),
        ('Path("/var/lib/endpoint")', f"Path({str(work)!r})"),
    ]:
        assert old in code or old.startswith("Path"), f"{document}: {old} not in the example"
        code = code.replace(old, new)
    assert re.search(r"print\(endpoint\.device\.status.*# " + re.escape(printed[-1]), code)

    (tmp_path / "tmp").mkdir()
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path / "tmp")}
    device = subprocess.Popen(
        [sys.executable, "-c", code], cwd=tmp_path, env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(device.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 20
        while len(lines) < len(printed) and device.poll() is None:
            assert time.monotonic() < deadline, lines
            time.sleep(0.02)
        assert [line.rstrip("\n") for line in lines] == printed
        # Then endpoint.run(): it keeps polling, every pollInterval (1 s here).
        while sum("POST /poll 200" in line for line in server.log) < 2:
            assert device.poll() is None, lines
            assert time.monotonic() < deadline, "run() did not poll again"
            time.sleep(0.02)
    finally:
        device.terminate()
        device.wait(timeout=10)
        reader.join(timeout=5)
        device.stdout.close()
    data = shown(server, "8211ABC")
    assert (data["version"], data["status"]) == ("6.2.2.0-100", "up-to-date")
    assert [h["event"] for h in reversed(data["history"])][-3:] == [
        "downloading", "installing", "installed"
    ]  # fmt: skip
    assert shown(server, "EE4-17")["parent_serial"] == "8211ABC"
    leftovers = [p for p in (tmp_path / "tmp").rglob("*") if p.is_file()]
    leftovers += [p for p in work.rglob("*") if p.is_file()] if work.exists() else []
    assert leftovers == [], "the package file is removed after the install"
