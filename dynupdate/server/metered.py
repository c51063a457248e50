"""Metering the transport (``serve --metrics``), and the metrics port's own small server.

A :class:`~dynupdate.server.listener.Server` given a :class:`Meter` makes its
connections from :func:`metered_connection`: the same connection, counting each
answer (its path, status and duration) and each connection while it is open. A
server given none makes the plain
:class:`~dynupdate.server.connection.Connection` and does no metering work at
all. Nothing here imports ``prometheus_client`` or knows dynupdate's protocol:
the instruments are the meter's business (:mod:`dynupdate.metrics`).

:class:`MetricsPage` is the app of the metrics port (``/metrics`` only);
:func:`parse_address` reads ``--metrics``; :func:`multiprocess_dir` makes the
private folder the workers' counters share.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import ssl
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from dynupdate.core.errors import InvalidInput, StorageError, one_line
from dynupdate.server.connection import Connection
from dynupdate.server.messages import Request, Response
from dynupdate.server.reading import Cycle, Reject
from dynupdate.server.tlsio import spoke_plain_http

__all__ = [
    "HANDSHAKE_FAILURES",
    "LOOPBACK",
    "MULTIPROC_ENV",
    "Meter",
    "MetricsPage",
    "failure_reason",
    "is_loopback",
    "metered_connection",
    "multiprocess_dir",
    "parse_address",
]

logger = logging.getLogger("dynupdate.server")

LOOPBACK = "127.0.0.1"
# prometheus_client's multiprocess mode: where each process keeps its values.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A failed TLS handshake, in a few words an admin can act on (OpenSSL's reasons grouped).
HANDSHAKE_FAILURES = (
    "plain-http",  # an HTTP request line in the clear: the client must use https://
    "not-tls",  # something else that is not TLS
    "timeout",  # not done within the handshake timeout
    "closed",  # the client closed the connection during the handshake
    "certificate-refused",  # the client does not trust the server's certificate (pinning?)
    "client-certificate",  # mutual TLS: none sent, or not signed by --client-ca
    "no-common-protocol",  # no TLS version or cipher in common
    "other",
)
_REASONS = {
    "WRONG_VERSION_NUMBER": "not-tls",
    "UNEXPECTED_EOF_WHILE_READING": "closed",
    "TLSV1_ALERT_UNKNOWN_CA": "certificate-refused",
    "SSLV3_ALERT_BAD_CERTIFICATE": "certificate-refused",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate-refused",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "client-certificate",
    "CERTIFICATE_VERIFY_FAILED": "client-certificate",
    "NO_SHARED_CIPHER": "no-common-protocol",
    "UNSUPPORTED_PROTOCOL": "no-common-protocol",
}


class Meter(Protocol):
    """What the transport tells the instruments; each call is one request or connection."""

    def answered(self, path: str, status: int, seconds: float) -> None:
        """An answer was written: the request's path, its status, seconds since its first byte."""

    def opened(self) -> None:
        """A connection was accepted (its handshake still to come)."""

    def closed(self) -> None:
        """An accepted connection is closed, whether or not its handshake succeeded."""

    def handshake_failed(self, reason: str) -> None:
        """A TLS handshake failed; ``reason`` is one of HANDSHAKE_FAILURES."""


def failure_reason(exc: BaseException) -> str:
    """The HANDSHAKE_FAILURES word for a failed handshake's exception.

    >>> failure_reason(TimeoutError())
    'timeout'
    >>> failure_reason(ConnectionResetError())
    'closed'
    """
    if spoke_plain_http(exc):
        return "plain-http"
    if isinstance(exc, TimeoutError):
        return "timeout"
    reason = getattr(exc, "reason", None)
    if reason in _REASONS:
        return _REASONS[reason]
    if isinstance(exc, ConnectionError | ssl.SSLEOFError):
        return "closed"
    return "other"


def metered_connection(meter: Meter) -> type[Connection]:
    """A :class:`Connection` class that tells ``meter`` of each answer and of its life.

    Made once per server: the meter is read from the closure, so a connection
    carries nothing more than a plain one.
    """
    answered = meter.answered

    class MeteredConnection(Connection):
        __slots__ = ()

        def __init__(self, shared: Any, client: tuple[str, int]) -> None:
            super().__init__(shared, client)
            meter.opened()

        def connection_lost(self, exc: BaseException | None) -> None:
            super().connection_lost(exc)
            meter.closed()

        def _finish(self, cycle: Cycle, status: int, sent: int, log: str) -> None:
            answered(cycle.request.path, status, self.loop.time() - cycle.t0)
            super()._finish(cycle, status, sent, log)

        def _send_reject(self, reject: Reject) -> None:
            path = self.url.decode("latin-1").partition("?")[0]
            # t0 is 0 when the parser refused the bytes before a request began.
            answered(path, reject.status, self.loop.time() - self.t0 if self.t0 else 0.0)
            super()._send_reject(reject)

        def _file_done(self, cycle: Cycle, status: int, log: str, task: asyncio.Task) -> None:
            # A download cut short never reaches _finish: its status was sent all the same.
            if task.cancelled() or task.exception() is not None or self.transport is None:
                answered(cycle.request.path, status, self.loop.time() - cycle.t0)
            super()._file_done(cycle, status, log, task)

    return MeteredConnection


class MetricsPage:
    """The metrics port's app: ``GET``/``HEAD /metrics`` answers ``render()``, nothing else.

    ``render`` runs in a thread of its own, off the event loop that answers
    polls: it reads every worker's counters and, through a cache, the database.
    """

    def __init__(self, render: Callable[[], bytes], content_type: str) -> None:
        self._render = render
        self._content_type = content_type
        self._thread: ThreadPoolExecutor | None = None  # made on the first scrape

    async def __call__(self, request: Request) -> Response:
        if request.path != "/metrics":
            return _text(404, "Not found: this port serves /metrics only.\n")
        if request.method not in ("GET", "HEAD"):
            return _text(405, "Use GET or HEAD on /metrics.\n", ("Allow", "GET, HEAD"))
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="metrics")
        try:
            body = await asyncio.get_running_loop().run_in_executor(self._thread, self._render)
        except Exception as exc:  # a damaged counter file, say: one line, not a traceback
            logger.error("Could not render the metrics: %s", one_line(exc))
            return _text(500, "The metrics could not be rendered; see the server's log.\n")
        return Response(200, [("Content-Type", self._content_type)], body)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)


def _text(status: int, text: str, *extra: tuple[str, str]) -> Response:
    return Response(status, [("Content-Type", "text/plain; charset=utf-8"), *extra], text.encode())


def parse_address(text: str) -> tuple[str, int]:
    """``--metrics``: ``HOST:PORT``, or ``PORT`` / ``:PORT`` on loopback; InvalidInput otherwise.

    >>> parse_address("9464"), parse_address(":9464")
    (('127.0.0.1', 9464), ('127.0.0.1', 9464))
    >>> parse_address("0.0.0.0:9464"), parse_address("[::1]:9464")
    (('0.0.0.0', 9464), ('::1', 9464))
    """
    shown = repr(text if len(text) <= 80 else text[:80] + "…")
    usage = "use PORT or :PORT (loopback), or HOST:PORT ([ADDRESS]:PORT for IPv6)"
    host, port = "", text
    if text.startswith("["):
        inside, bracket, port = text[1:].partition("]")
        if not bracket or not port.startswith(":"):
            raise InvalidInput(f"Invalid --metrics {shown}: {usage}.")
        host, port = inside, port[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidInput(f"Invalid --metrics {shown}: {host!r} is no IPv6 address.") from None
    elif ":" in text:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise InvalidInput(f"Invalid --metrics {shown}: put an IPv6 address in brackets.")
        if not host.isprintable() or " " in host:
            raise InvalidInput(f"Invalid --metrics {shown}: {usage}.")
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise InvalidInput(f"Invalid --metrics {shown}: the port must be 0 to 65535; {usage}.")
    return host or LOOPBACK, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine.

    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def multiprocess_dir(path: Path) -> Iterator[Path]:
    """A private (0700), empty folder for the processes' counters, as MULTIPROC_ENV; removed after.

    Emptied at start: files a killed server left would otherwise be summed in.
    """
    try:
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise StorageError(f"Cannot keep metrics in '{path}': it is not a folder; remove it.")
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(mode=0o700)
        path.chmod(0o700)  # whatever the umask
    except OSError as exc:
        raise StorageError(f"Cannot keep metrics in '{path}': {exc.strerror or exc}.") from exc
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)
