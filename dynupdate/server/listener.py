"""The listener: accepting connections, TLS handshakes off the accept loop, limits.

:class:`Server` listens, caps open connections (in all and per client
address), starts each accepted socket's TLS handshake under a time limit,
hands the connection a :class:`~dynupdate.server.state.ServerState` it shares
with the others, sweeps expired deadlines and logs failed connections (rate
limited). :func:`listen_sockets` binds, :func:`open_file_limit` raises the
descriptor limit the connection cap depends on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import ssl
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

from dynupdate.core.errors import DynupdateError, InvalidInput
from dynupdate.server.connection import Connection
from dynupdate.server.logs import LogFormat, connection_line
from dynupdate.server.messages import App, ErrorBody, default_error_body
from dynupdate.server.metered import Meter, failure_reason, metered_connection
from dynupdate.server.reading import WAIT
from dynupdate.server.state import ServerState
from dynupdate.server.tlsio import TLSTransport, spoke_plain_http, wrap_server_socket

__all__ = ["FD_RESERVE", "Server", "listen_sockets", "open_file_limit"]

logger = logging.getLogger("dynupdate.server")

# Descriptors a worker needs besides its connections: listening sockets, the
# database and its WAL, logs, the loop's own, a few package files being sent.
FD_RESERVE = 64
# Connection failures (handshakes, plain HTTP, refusals) are logged one line
# each, at most EVENT_BURST lines per EVENT_PERIOD seconds: a flood of them
# cannot fill the disk. The rest are counted, and the count logged.
EVENT_BURST = 20
EVENT_PERIOD = 60.0
# What an admin can do about the usual handshake failures, by OpenSSL reason.
_HANDSHAKE_HINTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust the server's certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client refused the server's certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the client refused the server's certificate",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no client certificate",
    "CERTIFICATE_VERIFY_FAILED": "the client certificate is not signed by the client CA",
    "NO_SHARED_CIPHER": "no TLS cipher in common with the client",
    "UNSUPPORTED_PROTOCOL": "no TLS version in common with the client (1.2 at least)",
    "WRONG_VERSION_NUMBER": "the client does not speak TLS",
    "UNEXPECTED_EOF_WHILE_READING": "the client closed the connection",
}


class Server:
    """An HTTP/1.1 server over TLS for an async app, on the running event loop.

    ``request_timeout`` runs from a request's first byte to its last (the
    first request's from the end of the handshake); ``keepalive_timeout`` closes
    idle connections; ``write_timeout`` drops a client that stops reading.
    ``max_connections`` caps open connections (handshakes included), and
    ``max_per_client`` those from one address (an IPv6 /64 counts as one; None:
    no cap); once three quarters of ``max_connections`` are open, idle
    connections get ``crowded_keepalive_timeout`` instead of ``keepalive_timeout``.
    ``access_log`` gets one line per request, ``connection_log`` one per failed
    handshake, plain-HTTP request on the TLS port or refused connection (rate
    limited; default: the ``dynupdate.server`` logger), each led by a UTC time;
    ``log_format`` "json" makes both one JSON object a line (:mod:`~dynupdate.server.logs`).
    ``ssl_context=None`` serves plain HTTP (for tests and TLS-terminating proxies);
    :meth:`use_tls` swaps the context for new handshakes (a renewed certificate).
    ``meter`` (``serve --metrics``) is told of every answer, connection and failed
    handshake; without one, connections do no metering work at all.
    """

    def __init__(
        self,
        app: App,
        *,
        ssl_context: ssl.SSLContext | None,
        max_body: int = 64 * 1024,
        handshake_timeout: float = 10.0,
        request_timeout: float = 30.0,
        keepalive_timeout: float = 75.0,
        write_timeout: float = 30.0,
        shutdown_timeout: float = 10.0,
        max_connections: int = 10_000,
        max_per_client: int | None = None,
        crowded_keepalive_timeout: float = 10.0,
        access_log: Callable[[str], None] | None = None,
        connection_log: Callable[[str], None] | None = None,
        error_body: ErrorBody | None = None,
        backlog: int = 1024,
        log_format: LogFormat | str = LogFormat.TEXT,
        meter: Meter | None = None,
    ) -> None:
        self.ssl_context = ssl_context
        self.log_format = LogFormat(log_format)
        self.meter = meter
        self._connection = Connection if meter is None else metered_connection(meter)
        self.handshake_timeout = handshake_timeout
        self.shutdown_timeout = shutdown_timeout
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.connection_log = connection_log or logger.warning
        self.backlog = backlog
        # What the connections share; they see this, never the Server.
        self.state = ServerState(
            app,
            plain=ssl_context is None,
            peer_certs=ssl_context is not None and ssl_context.verify_mode != ssl.CERT_NONE,
            max_body=max_body,
            request_timeout=request_timeout,
            keepalive_timeout=keepalive_timeout,
            crowded_keepalive_timeout=crowded_keepalive_timeout,
            write_timeout=write_timeout,
            max_connections=max_connections,
            max_per_client=max_per_client,
            access_log=access_log,
            error_body=error_body or default_error_body,
            json_log=self.log_format is LogFormat.JSON,
        )
        # Counters, for tests and for operators; those the connections count are in state.
        self.refused = 0  # connections closed at once: max_connections or max_per_client reached
        self.handshake_failures = 0
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._socks: list[socket.socket] = []
        self._opening: set[asyncio.Task] = set()  # plain HTTP connections being set up
        self._handshaking: set[TLSTransport] = set()
        self._events_until = 0.0  # the end of the current EVENT_PERIOD
        self._events = 0  # lines logged in it
        self._events_dropped = 0  # and not logged
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._sweep_interval = max(
            0.05, min(1.0, min(request_timeout, keepalive_timeout, write_timeout) / 5)
        )
        self._done: asyncio.Future | None = None

    @property
    def connections(self) -> int:
        """Open connections, those still in their TLS handshake included."""
        return self.state.count

    def use_tls(self, context: ssl.SSLContext) -> None:
        """New handshakes use ``context``; connections already open keep the one they began with."""
        if self.ssl_context is None:
            raise DynupdateError("This server speaks plain HTTP: it has no TLS context to replace.")
        self.ssl_context = context

    async def start(
        self,
        host: str | None,
        port: int,
        *,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
    ) -> list[tuple[str, int]]:
        """Listen on host:port (port 0: any free port) or on ``sock``; return the addresses."""
        if self._socks:
            raise DynupdateError("This server is already started.")
        self.loop = self.state.loop = loop = asyncio.get_running_loop()
        if sock is None:
            socks = listen_sockets(host, port, reuse_port=reuse_port, backlog=self.backlog)
        else:
            socks = [sock]
            sock.listen(self.backlog)
        for s in socks:
            s.setblocking(False)
            loop.add_reader(s.fileno(), self._accept, s)
        self._socks = socks
        self._done = loop.create_future()
        self._sweep_handle = loop.call_later(self._sweep_interval, self._sweep)
        return [s.getsockname()[:2] for s in socks]

    async def serve_forever(self) -> None:
        """Wait until close() has finished; cancelling this closes the server."""
        assert self._done is not None, "start() first"
        try:
            await asyncio.shield(self._done)
        except asyncio.CancelledError:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), close everything."""
        state = self.state
        if state.closing:
            if self._done is not None:
                await asyncio.shield(self._done)
            return
        state.closing = True
        loop = self.loop
        for s in self._socks:
            loop.remove_reader(s.fileno())
            s.close()
        for task in list(self._opening):
            task.cancel()
        for transport in list(self._handshaking):
            transport.abort()
        for conn in list(state.connections):
            conn.shutdown()
        drained = state.drained = loop.create_future()
        if not state.connections:
            drained.set_result(None)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(drained), self.shutdown_timeout)
        if state.connections:
            for conn in list(state.connections):
                if conn.task is not None:
                    conn.task.cancel()
                conn.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(drained), 1.0)
        if self._opening:
            await asyncio.gather(*self._opening, return_exceptions=True)
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
        self._flush_events()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    # internals -------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        state = self.state
        for _ in range(128):
            try:
                conn, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    logger.error("Cannot accept connections (%s): trying again in 1 s.", exc)
                    self.loop.remove_reader(listener.fileno())
                    self.loop.call_later(1.0, self._resume_accept, listener)
                    return
                raise
            if state.count >= self.max_connections or state.closing:
                self.refused += 1
                conn.close()
                if not state.closing:
                    self._event(
                        addr[0], f"refused: {state.count} connections open, the server's maximum"
                    )
                continue
            per_client = state.per_client
            key = None
            if per_client is not None:
                host = addr[0]
                # One host usually holds a whole IPv6 /64: count the prefix.
                key = host if ":" not in host else socket.inet_pton(socket.AF_INET6, host)[:8]
                already = per_client.get(key, 0)
                if already >= self.max_per_client:  # type: ignore[operator]
                    self.refused += 1
                    conn.close()
                    self._event(
                        host, f"refused: {already} connections open from this address, the "
                        "maximum per client",
                    )
                    continue
                per_client[key] = already + 1
            state.count += 1
            conn.setblocking(False)
            protocol = self._connection(state, addr[:2])
            protocol.client_key = key
            if self.ssl_context is None:
                task = self.loop.create_task(self._open(conn, protocol))
                self._opening.add(task)
                task.add_done_callback(self._opening.discard)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                conn, tls = wrap_server_socket(self.ssl_context, conn)
            except OSError as exc:
                self._gone(protocol)
                self.handshake_failures += 1
                if self.meter is not None:
                    self.meter.handshake_failed("other")
                conn.close()
                self._event(addr[0], f"TLS failed to start: {exc}")
                continue
            transport = TLSTransport(
                self.loop,
                conn,
                tls,
                protocol,
                handshake_timeout=self.handshake_timeout,
                opened=self._handshaking.discard,
                failed=self._handshake_failed,
                plain_http_answer=self._plain_http_answer,
            )
            # Registered first: the handshake may end (either way) inside start().
            self._handshaking.add(transport)
            transport.start()

    def _handshake_failed(self, transport: TLSTransport, exc: BaseException) -> None:
        self._handshaking.discard(transport)
        protocol = transport.get_protocol()
        self._gone(protocol)
        self.handshake_failures += 1
        if self.state.closing:
            return  # aborted by close()
        if self.meter is not None:
            self.meter.handshake_failed(failure_reason(exc))
        reason = getattr(exc, "reason", None)
        if spoke_plain_http(exc):
            what = "plain HTTP on the HTTPS port: the client must use https://"
        elif isinstance(exc, TimeoutError):
            what = f"TLS handshake failed: not done within {self.handshake_timeout:g} s"
        elif reason:
            hint = _HANDSHAKE_HINTS.get(reason)
            what = f"TLS handshake failed: {reason}" + (f" ({hint})" if hint else "")
        elif isinstance(exc, ConnectionError | ssl.SSLEOFError):
            what = "TLS handshake failed: the client closed the connection"
        else:
            what = f"TLS handshake failed: {exc}"
        self._event(protocol.client[0], what)

    def _plain_http_answer(self) -> bytes:
        body = self.state.error(400, "This port speaks HTTPS only: use https://.")
        head = (
            f"HTTP/1.1 400 Bad Request\r\nDate: {formatdate(usegmt=True)}\r\n"
            f"Content-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode("latin-1") + body

    def _event(self, client: str, what: str) -> None:
        """One line about a connection that failed, unless EVENT_BURST were logged lately."""
        now = self.loop.time()
        if now >= self._events_until:
            self._flush_events()
            self._events_until = now + EVENT_PERIOD
        if self._events >= EVENT_BURST:
            self._events_dropped += 1
            return
        self._events += 1
        self._write_event(connection_line(self.log_format, self.state.stamp(), client, what))

    def _flush_events(self) -> None:
        if self._events_dropped:
            what = (
                f"{self._events_dropped} more connection failures not logged "
                f"(at most {EVENT_BURST} lines in {EVENT_PERIOD:g} s)"
            )
            self._write_event(
                connection_line(
                    self.log_format, self.state.stamp(), None, what,
                    not_logged=self._events_dropped,
                )
            )  # fmt: skip
        self._events = self._events_dropped = 0

    def _write_event(self, line: str) -> None:
        try:
            self.connection_log(line)
        except Exception:
            logger.exception("The connection log failed")

    def _gone(self, protocol: Connection) -> None:
        """A connection that never reached connection_made() is closed."""
        self.state.count -= 1
        if protocol.client_key is not None:
            self.state.leave(protocol.client_key)
        if self.meter is not None:
            self.meter.closed()

    def _resume_accept(self, listener: socket.socket) -> None:
        if not self.state.closing:
            self.loop.add_reader(listener.fileno(), self._accept, listener)

    async def _open(self, conn: socket.socket, protocol: Connection) -> None:
        """Plain HTTP (tests, behind a TLS-terminating proxy): the loop's own transport."""
        try:
            await self.loop.connect_accepted_socket(lambda: protocol, conn)
        except (Exception, asyncio.CancelledError):
            if not protocol.made:
                self._gone(protocol)
                conn.close()
            self.handshake_failures += 1

    def _sweep(self) -> None:
        try:
            now = self.loop.time()
            state = self.state
            if state.count >= state.crowded:
                # Idle connections that started waiting before the server filled up.
                short = now + state.crowded_keepalive_timeout
                for conn in state.connections:
                    if conn.state == WAIT and not conn.busy and conn.deadline > short:
                        conn.deadline = short
            expired = [c for c in state.connections if c.deadline <= now or c.wdeadline <= now]
            for conn in expired:
                conn.expire(now)
        finally:
            self._sweep_handle = self.loop.call_later(self._sweep_interval, self._sweep)


def open_file_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; return the limit.

    The soft limit is often 1,024, a few hundred idle connections short of
    locking every device out; the hard limit is what the admin allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # refused (a kernel cap such as fs.nr_open below hard): keep soft
    return soft


def listen_sockets(
    host: str | None,
    port: int,
    *,
    reuse_port: bool = False,
    backlog: int = 1024,
    listen: bool = True,
    option: str = "--host or --port",
) -> list[socket.socket]:
    """Bound (and listening) sockets for every address of host; port 0 picks one free port.

    ``option``: what the refusal tells the admin to change.
    """
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise InvalidInput(f"Cannot listen on {host!r}: {exc.strerror}.") from None
    socks: list[socket.socket] = []
    seen = set()
    addr: tuple[Any, ...]  # (host, port, ...): getaddrinfo gives IP families only here
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr[:2]) in seen:
                continue
            seen.add((family, addr[:2]))
            s = socket.socket(family, kind, proto)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            try:
                s.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise InvalidInput(
                        f"Another process already listens on {addr[0]} port {addr[1]}; "
                        f"stop it or choose another {option}."
                    ) from None
                raise InvalidInput(
                    f"Cannot listen on {addr[0]} port {addr[1]}: {exc.strerror}. "
                    f"Choose another {option}."
                ) from None
            if listen:
                s.listen(backlog)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks
