"""serve --metrics: Prometheus' text format, every worker counted, scraped as Prometheus would.

The servers are real ``dynupdate serve`` processes on 127.0.0.1; each scrape is
parsed with prometheus_client's own parser. Counts are read until they match
(or a deadline passes): an answer reaches the client a moment before the
server has counted it, and the fleet's metrics are cached for two seconds.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import ServerProcess
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from dynupdate.cli import app
from dynupdate.metrics import FOLDER

POLL = (
    '<poll protocol="1"><endpoint serial="{serial}" type="{type}" version="{version}"'
    ' in-call="{in_call}"/>{peripherals}</poll>'
)
_METRICS_AT = re.compile(r"Metrics at http://127\.0\.0\.1:(\d+)/metrics")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def admin(home: Path, *args: str) -> str:
    result = CliRunner().invoke(app, ["--home", str(home), *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout


def metrics_port(server: ServerProcess) -> int:
    for line in server.log:
        if match := _METRICS_AT.search(line):
            return int(match.group(1))
    raise AssertionError("no 'Metrics at' line:\n" + "".join(server.log))


def scrape(port: int, path: str = "/metrics") -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def eventually(port: int, check: Callable[[Samples], bool], timeout: float = 20) -> Samples:
    """Scrape until ``check`` holds or ``timeout`` passes; the last scrape either way."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            samples = scrape(port)
        except (urllib.error.URLError, ConnectionError):
            samples = {}  # workers being restarted: nobody listens for a moment
        if (samples and check(samples)) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def poll(
    server: ServerProcess,
    serial: str,
    type_: str,
    version: str,
    *,
    in_call: bool = False,
    peripherals: str = "",
) -> None:
    body = POLL.format(
        serial=serial,
        type=type_,
        version=version,
        in_call=str(in_call).lower(),
        peripherals=peripherals,
    )
    status, _, data = server.request("POST", "/poll", body)
    assert status == 200, data


def report(server: ServerProcess, serial: str, type_: str, version: str, state: str) -> None:
    body = (
        f'<report protocol="1"><device serial="{serial}" type="{type_}" version="{version}"'
        f' state="{state}"/></report>'
    )
    status, _, data = server.request("POST", "/report", body)
    assert status == 200, data


def package(home: Path, tmp_path: Path, type_: str, version: str) -> None:
    path = tmp_path / f"{type_}-{version}.pup"
    path.write_bytes(f"{type_}-{version}".encode() * 50)
    admin(home, "package", "add", path, "--type", type_, "--version", version)


def worker_pids(server: ServerProcess) -> list[int]:
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(child) for child in children)


@pytest.fixture
def metered(start_server, home_dir):
    def start(*args: str) -> tuple[ServerProcess, int]:
        server = start_server(home_dir, "--workers", "2", "--metrics", ":0", *args)
        return server, metrics_port(server)

    return start


def test_a_scrape_counts_every_worker(metered, home_dir, tmp_path):
    package(home_dir, tmp_path, "MetricsT", "2.0")
    admin(home_dir, "policy", "set", "MetricsT", "--version", "2.0")
    server, port = metered()
    before = scrape(port)
    assert value(before, "dynupdate_poll_answers_total", reason="update") == 0
    # Polls: an offer and a peripheral without a policy, up-to-date, in a call, and
    # enough others, each on a new connection, that both workers answer some.
    poll(
        server,
        "M1",
        "MetricsT",
        "1.0",
        peripherals='<peripheral serial="P1" type="Cam" version="1.0"/>',
    )
    poll(server, "M2", "MetricsT", "2.0")
    poll(server, "M3", "MetricsT", "1.0", in_call=True)
    for i in range(40):
        poll(server, f"N{i}", "Other", "1.0")
    # A type name is the device's to choose: a label value, escaped, never a new line.
    poll(server, "H1", 'Ev&quot;il\\} 1', "1.0")
    report(server, "M1", "MetricsT", "2.0", "installed")
    report(server, "M3", "MetricsT", "2.0", "failed")
    assert server.request("GET", "/nothing")[0] == 404
    # Two failed handshakes: plain HTTP on the HTTPS port, a client that does not
    # trust the server's certificate.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert plain.recv(100).startswith(b"HTTP/1.1 400")
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")

    expected = {
        ("dynupdate_poll_answers_total", "reason", "update"): 1,
        ("dynupdate_poll_answers_total", "reason", "no-policy"): 42,
        ("dynupdate_poll_answers_total", "reason", "up-to-date"): 1,
        ("dynupdate_poll_answers_total", "reason", "in-call"): 1,
        ("dynupdate_poll_answers_total", "reason", "outside-window"): 0,
        ("dynupdate_reports_total", "state", "installed"): 1,
        ("dynupdate_reports_total", "state", "failed"): 1,
        ("dynupdate_reports_total", "state", "downloading"): 0,
        ("dynupdate_tls_handshake_failures_total", "reason", "plain-http"): 1,
        ("dynupdate_tls_handshake_failures_total", "reason", "certificate-refused"): 1,
        ("dynupdate_http_request_duration_seconds_count", "route", "poll"): 44,
        ("dynupdate_http_request_duration_seconds_count", "route", "report"): 2,
        ("dynupdate_http_request_duration_seconds_count", "route", "other"): 1,
    }

    def counted(samples: Samples) -> dict:
        return {key: value(samples, key[0], **{key[1]: key[2]}) for key in expected}

    def responses(samples: Samples) -> dict:
        return {
            (route, code): value(samples, "dynupdate_http_responses_total", route=route, code=code)
            for route, code in (("poll", "200"), ("report", "200"), ("other", "404"))
        }

    wanted = {("poll", "200"): 44, ("report", "200"): 2, ("other", "404"): 1}
    after = eventually(port, lambda s: counted(s) == expected and responses(s) == wanted)
    assert counted(after) == expected
    assert responses(after) == wanted
    assert (
        value(after, "dynupdate_http_request_duration_seconds_bucket", route="poll", le="+Inf")
        == 44
    )
    assert value(after, "dynupdate_open_connections") is not None
    assert value(after, "dynupdate_write_queue_depth") is not None

    # Every worker counted some: the sums above are over both.
    folder = home_dir / FOLDER
    polled_by = {}
    for pid in worker_pids(server):
        files = [str(p) for p in folder.glob(f"counter_{pid}.db")]
        polled_by[pid] = sum(
            s.value
            for metric in MultiProcessCollector.merge(files)
            for s in metric.samples
            if s.name == "dynupdate_poll_answers_total"
        )
    assert len(polled_by) == 2 and all(polled_by.values()), polled_by
    assert sum(polled_by.values()) == 45
    # Each process's files have their disk blocks: no hole a write could fault on
    # when the disk is full.
    for path in folder.glob("*.db"):
        stat = path.stat()
        assert stat.st_blocks * 512 >= stat.st_size, path.name

    # Endpoints by type and status: what overview counts, type by type, once the
    # writers have written every poll (grouped, within 0.2 s).
    deadline = time.monotonic() + 20
    while True:
        rows = json.loads(admin(home_dir, "overview", "--json"))
        if sum(row["endpoints"] for row in rows) == 45 or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    def by_status(samples: Samples) -> dict:
        return {
            (row["type"], status): value(
                samples, "dynupdate_endpoints", type=row["type"], status=status
            )
            for row in rows
            for status in row["counts"]
        }

    shown = {(row["type"], s): n for row in rows for s, n in row["counts"].items()}
    assert shown[("Other", "no-policy")] == 40 and shown[("MetricsT", "up-to-date")] >= 1
    assert shown[('Ev"il\\} 1', "no-policy")] == 1
    fleet = eventually(port, lambda s: by_status(s) == shown)
    assert by_status(fleet) == shown
    assert value(fleet, "dynupdate_device_types") == len(rows)
    assert value(fleet, "dynupdate_fleet_metrics_up") == 1
    server.assert_no_traceback()


def test_a_rollout_state_and_counts(metered, home_dir, tmp_path):
    package(home_dir, tmp_path, "Roll", "1.0")
    admin(home_dir, "policy", "set", "Roll", "--version", "1.0")
    package(home_dir, tmp_path, "Roll", "2.0")
    admin(home_dir, "rollout", "start", "Roll", "--version", "2.0", "--waves", "100%")
    server, port = metered()
    poll(server, "R1", "Roll", "1.0")  # offered 2.0: an attempt opens
    admin(home_dir, "rollout", "pause", "Roll")
    [status] = json.loads(admin(home_dir, "rollout", "status", "--json"))
    assert status["offered"] == 1 and status["state"] == "paused"

    def rollout(samples: Samples) -> dict:
        states = {
            state: value(
                samples, "dynupdate_rollout_state", type="Roll", version="2.0", state=state
            )
            for state in ("running", "paused", "halted", "completed", "aborted")
        }
        counts = {
            outcome: value(
                samples, "dynupdate_rollout_devices", type="Roll", version="2.0", outcome=outcome
            )
            for outcome in ("offered", "in_flight", "succeeded", "failed", "held")
        }
        return {
            "states": states,
            "counts": counts,
            "wave": value(samples, "dynupdate_rollout_wave", type="Roll", version="2.0"),
        }

    wanted = {
        "states": {"running": 0, "paused": 1, "halted": 0, "completed": 0, "aborted": 0},
        "counts": {
            key: status[key] for key in ("offered", "in_flight", "succeeded", "failed", "held")
        },
        "wave": 1,
    }
    assert rollout(eventually(port, lambda s: rollout(s) == wanted)) == wanted


def test_only_metrics_is_served_there(metered):
    server, port = metered()
    for path in ("/", "/metrics/", "/metricsx", "/poll", "/packages/x"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(port, path)
        refused.value.close()
        assert refused.value.code == 404, path
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request(method, "/metrics", body=b"x" if method in ("POST", "PUT") else None)
        answer = connection.getresponse()
        assert (answer.status, answer.getheader("Allow")) == (405, "GET, HEAD"), method
        connection.close()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("HEAD", "/metrics")
    answer = connection.getresponse()
    assert answer.status == 200 and answer.read() == b""
    assert int(answer.getheader("Content-Length")) > 0
    connection.close()
    # ... and the poll port does not serve them.
    assert server.request("GET", "/metrics")[0] == 404
    server.assert_no_traceback()


def test_a_dead_workers_connections_stop_counting(metered, home_dir):
    server, port = metered()
    context = ssl.create_default_context(cafile=str(home_dir / "tls" / "server.crt"))
    held = [
        context.wrap_socket(
            socket.create_connection(("127.0.0.1", server.port), timeout=10),
            server_hostname="127.0.0.1",
        )
        for _ in range(6)
    ]
    opened = eventually(port, lambda s: value(s, "dynupdate_open_connections") == 6)
    assert value(opened, "dynupdate_open_connections") == 6
    poll(server, "D1", "Dead", "1.0")
    eventually(port, lambda s: value(s, "dynupdate_poll_answers_total", reason="no-policy") == 1)
    dead = worker_pids(server)
    for pid in dead:
        os.kill(pid, signal.SIGKILL)
    # The supervisor starts two others; the dead ones' connections are no longer
    # open (mark_process_dead), but what they counted still counts.
    after = eventually(
        port,
        lambda s: (
            value(s, "dynupdate_open_connections") == 0 and not set(dead) & set(worker_pids(server))
        ),
    )
    assert value(after, "dynupdate_open_connections") == 0
    assert value(after, "dynupdate_poll_answers_total", reason="no-policy") == 1
    assert not list((home_dir / FOLDER).glob(f"gauge_livesum_{dead[0]}.db"))
    for sock in held:
        sock.close()
    server.assert_alive()


def test_the_folder_is_removed_at_stop_and_emptied_at_start(start_server, home_dir):
    folder = home_dir / FOLDER
    folder.mkdir(parents=True)
    (folder / "counter_1.db").write_bytes(b"left by a killed server")
    server = start_server(home_dir, "--metrics", ":0")
    assert not (folder / "counter_1.db").exists()
    assert folder.stat().st_mode & 0o777 == 0o700
    server.stop()
    assert not folder.exists()


def test_without_metrics_nothing_is_metered(start_server, home_dir):
    from dynupdate.server.connection import Connection
    from dynupdate.server.listener import Server

    async def app(request):  # never called
        raise AssertionError

    assert Server(app, ssl_context=None)._connection is Connection
    server = start_server(home_dir)
    poll(server, "X1", "Plain", "1.0")
    assert not (home_dir / FOLDER).exists()
    assert not any("Metrics at" in line for line in server.log)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "Invalid --metrics 'abc': the port must be 0 to 65535"),
        ("70000", "Invalid --metrics '70000': the port must be 0 to 65535"),
        ("host:", "Invalid --metrics 'host:': the port must be 0 to 65535"),
        ("::1:9464", "Invalid --metrics '::1:9464': put an IPv6 address in brackets."),
        ("[::1:9464", "Invalid --metrics '[::1:9464': use PORT or :PORT"),
        ("[nope]:9464", "Invalid --metrics '[nope]:9464': 'nope' is no IPv6 address."),
        ("bad host:9464", "Invalid --metrics 'bad host:9464': use PORT or :PORT"),
    ],
)
def test_a_bad_address_is_one_line_naming_it(cli, value, message):
    result = cli("serve", "--metrics", value, code=1)
    assert result.stderr.startswith(f"Error: {message}")
    assert result.stderr.count("\n") == 1


def test_the_metrics_port_may_not_be_the_poll_port(cli, home_dir):
    result = cli("serve", "--port", "8443", "--metrics", "127.0.0.1:8443", code=1)
    assert result.stderr == "Error: --metrics port 8443 is the poll port: choose another one.\n"


def test_a_metrics_port_in_use_is_refused_naming_it(cli, home_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", "--port", "0", "--metrics", str(port), code=1)
    assert result.stderr.splitlines()[-1] == (
        f"Error: Cannot serve --metrics 127.0.0.1:{port}: Another process already listens on "
        f"127.0.0.1 port {port}; stop it or choose another --metrics."
    )
    assert not (home_dir / FOLDER).exists()


def test_a_non_loopback_address_is_said_even_when_quiet():
    from dynupdate.metrics import announce

    said: list[str] = []
    announce("192.0.2.7", 9464, said.append, quiet=True)
    assert said == [
        "Metrics at http://192.0.2.7:9464/metrics: plain HTTP without authentication on a "
        "non-loopback address; put a reverse proxy with TLS and authentication in front "
        "(see README)."
    ]
    said.clear()
    announce("127.0.0.1", 9464, said.append, quiet=True)
    assert said == []


def test_the_fleet_is_read_at_most_once_per_ttl(home, caplog):
    from dynupdate.core.db import DB_NAME
    from dynupdate.metrics.fleet import FleetCollector

    now = [100.0]
    collector = FleetCollector(home.path / DB_NAME, ttl=2.0, clock=lambda: now[0])
    first = list(collector.collect())
    for _ in range(50):  # a scrape storm
        assert list(collector.collect()) == first
    assert collector.reads == 1
    now[0] += 2.0
    collector.collect()
    assert collector.reads == 2
    # A database that cannot be read: up 0, one log line however many scrapes.
    broken = FleetCollector(home.path, ttl=0.0)  # a folder, not a database
    for _ in range(3):
        [up] = broken.collect()
        assert (up.name, up.samples[0].value) == ("dynupdate_fleet_metrics_up", 0)
    assert len([r for r in caplog.records if "fleet metrics" in r.getMessage()]) == 1


def test_device_types_are_capped_configured_ones_first():
    from dynupdate.metrics.fleet import MAX_TYPES, fleet_metrics

    def row(name: str, endpoints: int, configured: bool = False) -> dict:
        return {
            "type": name,
            "version_to_use": "1.0" if configured else None,
            "packages": int(configured),
            "endpoints": endpoints,
            "counts": {"pending": endpoints},
        }

    rows = [row("Mine", 1, configured=True)] + [row(f"T{i}", i) for i in range(1, 1001)]
    endpoints, types, *_ = fleet_metrics(rows, [])
    shown = {s.labels["type"] for s in endpoints.samples}
    assert len(shown) == MAX_TYPES
    assert "Mine" in shown and "T1000" in shown and "T1" not in shown
    assert types.samples[0].value == 1001


def test_the_folder_is_never_a_link(tmp_path):
    from dynupdate.core.errors import StorageError
    from dynupdate.server.metered import multiprocess_dir

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("not ours")
    (tmp_path / FOLDER).symlink_to(elsewhere)
    with (
        pytest.raises(StorageError, match="it is not a folder"),
        multiprocess_dir(tmp_path / FOLDER),
    ):
        pass
    assert (elsewhere / "keep").exists()


def test_a_scrape_that_fails_is_a_500_and_one_log_line(caplog):
    import asyncio

    from dynupdate.server.messages import Request
    from dynupdate.server.metered import MetricsPage

    def render() -> bytes:
        raise RuntimeError("Read beyond file size detected, file is corrupted.")

    page = MetricsPage(render, "text/plain")
    request = Request("GET", "/metrics", "", {}, b"", ("127.0.0.1", 1), None)
    answer = asyncio.run(page(request))
    page.close()
    assert answer.status == 500
    [record] = caplog.records
    assert record.getMessage() == (
        "Could not render the metrics: Read beyond file size detected, file is corrupted."
    )
    assert record.exc_info is None
