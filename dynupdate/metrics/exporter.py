"""A worker's instruments and its listener on the metrics port.

Imported once ``PROMETHEUS_MULTIPROC_DIR`` is set (see :func:`dynupdate.metrics.exporting`):
each process then keeps its values in files of its own in that folder, and a
scrape, answered by whichever worker the kernel hands it to, sums every
worker's files. A count costs a lock and a write into a memory-mapped file, so
the server counts once per request or connection, never per byte.

Every label value known in advance (reasons, states, routes) is made at start,
so its series is there at 0 before the first event and ``rate()`` sees the first
one; and this process's files get their disk blocks then (see :func:`_allocate`).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from dynupdate.core.db import DB_NAME
from dynupdate.core.vocabulary import Reason, ReportState
from dynupdate.metrics.fleet import FleetCollector
from dynupdate.protocol import DeviceReport, NoOffer, Offer
from dynupdate.server.listener import Server
from dynupdate.server.metered import HANDSHAKE_FAILURES, MetricsPage

__all__ = ["DURATION_BUCKETS", "POLL_OUTCOMES", "ROUTES", "Exporter"]

UPDATE = "update"  # a poll answer that offers a package (the others carry a Reason)
POLL_OUTCOMES = (UPDATE, *(reason.value for reason in Reason))
ROUTES = ("poll", "report", "package", "other")
_ROUTE_OF = {"/poll": "poll", "/report": "report"}
# Seconds, from a request's first byte to its answer written: polls take about a
# millisecond, reports wait for a commit, downloads take as long as the client.
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
)  # fmt: skip


def route(path: str) -> str:
    """The label of a request's path: poll, report, package or other.

    >>> route("/poll"), route("/packages/ab12"), route("/favicon.ico")
    ('poll', 'package', 'other')
    """
    found = _ROUTE_OF.get(path)
    if found is not None:
        return found
    return "package" if path.startswith("/packages/") else "other"


class Exporter:
    """One ``serve``'s metrics: made by the serve command, :meth:`start`-ed in each worker.

    It is the transport's :class:`~dynupdate.server.metered.Meter` and the poll
    app's meter (:meth:`polled`, :meth:`reported`, :meth:`sampled`); in the
    supervisor, :meth:`worker_exited` drops a dead worker's gauges.
    """

    def __init__(self, home_path: Path, folder: Path, host: str, port: int) -> None:
        self.home_path = home_path
        self.folder = folder
        self.host = host
        self.port = port
        self._page: MetricsPage | None = None
        self._listener: Server | None = None
        self._last_sample = (-1, -1)

    # In the supervisor ---------------------------------------------------------------------

    def worker_exited(self, pid: int) -> None:
        """A dead worker's open connections and queue are no longer open or queued."""
        mark_process_dead(pid, str(self.folder))

    # In each worker ------------------------------------------------------------------------

    def start(self) -> None:
        """This worker's instruments (after the fork: its own files)."""
        polls = Counter(
            "dynupdate_poll_answers",
            "Devices answered in polls (an endpoint and each of its peripherals), by the "
            "answer: update (a package offered) or the reason of noUpdate.",
            ["reason"],
            registry=None,
        )
        self._polls = {reason: polls.labels(reason) for reason in POLL_OUTCOMES}
        reports = Counter(
            "dynupdate_reports",
            "Devices in status reports stored (acknowledged), by the state they report.",
            ["state"],
            registry=None,
        )
        self._reports = {state.value: reports.labels(state.value) for state in ReportState}
        self._responses_family = Counter(
            "dynupdate_http_responses",
            "HTTP answers on the poll port, by route (poll, report, package, other) and "
            "status code.",
            ["route", "code"],
            registry=None,
        )
        self._responses: dict[tuple[str, int], Counter] = {}
        durations = Histogram(
            "dynupdate_http_request_duration_seconds",
            "Seconds from a request's first byte to its answer written (a download: to its "
            "last byte), by route.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self._durations = {name: durations.labels(name) for name in ROUTES}
        handshakes = Counter(
            "dynupdate_tls_handshake_failures",
            "TLS handshakes that failed on the poll port, by reason: "
            + ", ".join(HANDSHAKE_FAILURES),
            ["reason"],
            registry=None,
        )
        self._handshakes = {reason: handshakes.labels(reason) for reason in HANDSHAKE_FAILURES}
        self._connections = Gauge(
            "dynupdate_open_connections",
            "Connections open on the poll port, TLS handshakes included (what --max-connections "
            "caps, per worker).",
            registry=None,
            multiprocess_mode="livesum",
        )
        self._queued = Gauge(
            "dynupdate_write_queue_depth",
            "Requests (polls, reports, rollout reservations) waiting for the writer threads, "
            "seen each time a writer has written.",
            registry=None,
            multiprocess_mode="livesum",
        )
        self._unrecorded = Gauge(
            "dynupdate_unrecorded_polls",
            "Devices whose latest poll is kept in memory, not yet written, while the database "
            "cannot be written (a full disk).",
            registry=None,
            multiprocess_mode="livesum",
        )
        self._last_sample = (-1, -1)
        self._responses_for(ROUTES[0], 200)  # the usual answer, there from the start
        _allocate(self.folder, os.getpid())

    async def listen(self) -> None:
        """Serve ``/metrics`` on the metrics port, beside the other workers (SO_REUSEPORT)."""
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry, path=str(self.folder))
        registry.register(FleetCollector(self.home_path / DB_NAME))
        self._page = MetricsPage(lambda: generate_latest(registry), CONTENT_TYPE_LATEST)
        listener = Server(
            self._page,
            ssl_context=None,  # loopback by default; see the README to expose it
            max_connections=64,
            request_timeout=10.0,
            connection_log=_stderr_line,
        )
        await listener.start(self.host, self.port, reuse_port=True)
        self._listener = listener

    async def aclose(self) -> None:
        if self._listener is not None:
            await self._listener.close()
        if self._page is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._page.close)

    # The transport's meter -------------------------------------------------------------------

    def answered(self, path: str, status: int, seconds: float) -> None:
        name = route(path)
        child = self._responses.get((name, status))
        if child is None:
            child = self._responses_for(name, status)
        child.inc()
        self._durations[name].observe(seconds)

    def opened(self) -> None:
        self._connections.inc()

    def closed(self) -> None:
        self._connections.dec()

    def handshake_failed(self, reason: str) -> None:
        self._handshakes[reason].inc()

    # The poll app's meter ------------------------------------------------------------------

    def polled(self, answers: Sequence[Offer | NoOffer]) -> None:
        """One answered poll: each device's answer."""
        polls = self._polls
        for answer in answers:
            polls[UPDATE if isinstance(answer, Offer) else answer.reason].inc()

    def reported(self, devices: Sequence[DeviceReport]) -> None:
        """One stored report."""
        reports = self._reports
        for device in devices:
            reports[device.state].inc()

    def sampled(self, queued: int, unrecorded: int) -> None:
        """What a writer thread has waiting (called by it, a few times a second)."""
        if (queued, unrecorded) != self._last_sample:
            self._last_sample = (queued, unrecorded)
            self._queued.set(queued)
            self._unrecorded.set(unrecorded)

    def _responses_for(self, name: str, status: int) -> Counter:
        child = self._responses[(name, status)] = self._responses_family.labels(name, str(status))
        return child


def _allocate(folder: Path, pid: int) -> None:
    """Give this process's files their disk blocks now, while starting.

    prometheus_client makes them sparse and writes through a memory map: a write
    into a hole when the disk is full kills the process (SIGBUS) instead of
    failing, and the server must go on answering polls on a full disk. A new label
    value written later lands in these blocks (the label values are few).
    """
    for path in folder.glob(f"*_{pid}.db"):
        with open(path, "r+b") as file:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)


def _stderr_line(line: str) -> None:
    sys.stderr.write(line + "\n")
