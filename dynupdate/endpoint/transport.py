"""The reference endpoint's transport: HTTP/1.1 over TLS, trust, kept connections.

Responses are parsed with ``httptools`` (never by hand), bodies go to a
bounded :class:`Receiver`. The server is trusted by a CA file, by the
system's trust store, or by a pinned certificate: the SHA-256 of its DER
bytes, which ``dynupdate serve`` prints. A pinned connection skips chain and
hostname checks and compares the fingerprint right after the handshake,
before a byte of the request is sent.

A :class:`Transport` sends one request at a time on a new connection, or on
the kept connections of a :class:`Connections` (one session's: a poll cycle).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import cast
from urllib.parse import SplitResult, urlsplit

import httptools

from dynupdate.core.errors import InvalidInput
from dynupdate.endpoint.errors import EndpointError

__all__ = [
    "MAX_ANSWER",
    "MAX_HEAD",
    "ClientStats",
    "Connections",
    "Exchange",
    "Receiver",
    "Target",
    "Transport",
    "tls_context",
]

MAX_ANSWER = 1 << 20  # bytes of an XML answer
MAX_HEAD = 64 * 1024  # bytes of a response's status line and headers
_READ = 256 * 1024

Link = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request as it went, for ``trace``: what was asked and what came back."""

    method: str
    url: str
    request_headers: dict[str, str]
    status: int | None
    response_headers: dict[str, str]
    received: int  # body bytes
    error: str | None = None  # an EndpointError kind


@dataclass
class ClientStats:
    """Counters shared by every endpoint that uses one client."""

    requests: int = 0  # sent (or tried) on a connection
    connections: int = 0  # TLS connections opened
    polls: int = 0  # answered by the server
    reports: int = 0
    downloads: int = 0
    heads: int = 0
    bytes_downloaded: int = 0
    errors: Counter = field(default_factory=Counter)


class Receiver:
    """Where a response body goes: a bounded buffer by default."""

    def __init__(self, limit: int = MAX_ANSWER) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0

    def begin(self, status: int, headers: dict[str, str]) -> None:
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self.limit:
            raise EndpointError("too-large", f"An answer of {length} bytes; at most {self.limit}.")

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise EndpointError("too-large", f"An answer longer than {self.limit} bytes.")
        self.chunks.append(data)

    def body(self) -> bytes:
        return b"".join(self.chunks)


class _Response:
    """httptools callbacks: the status, the headers, and the body handed to a receiver."""

    __slots__ = (
        "complete",
        "head_only",
        "headers",
        "keep_alive",
        "parser",
        "received",
        "receiver",
        "status",
    )

    def __init__(self, receiver: Receiver, head_only: bool) -> None:
        self.receiver = receiver
        self.head_only = head_only
        self.headers: dict[str, str] = {}
        self.status: int | None = None
        self.complete = False
        self.keep_alive = False  # read in the callbacks: the parser forgets it afterwards
        self.received = 0
        self.parser: httptools.HttpResponseParser | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        # The parser calls this, so it is set (the parser is made with this object).
        parser = cast(httptools.HttpResponseParser, self.parser)
        self.status = parser.get_status_code()
        self.keep_alive = parser.should_keep_alive()
        self.receiver.begin(self.status, self.headers)
        if self.head_only:
            self.complete = True  # a HEAD answer has no body, whatever Content-Length says

    def on_body(self, body: bytes) -> None:
        self.received += len(body)
        self.receiver.write(body)

    def on_message_complete(self) -> None:
        self.complete = True


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    netloc: str
    path: str  # with the query, as sent on the request line

    @classmethod
    def parse(cls, url: str, what: str) -> Target:
        parts: SplitResult | None
        try:
            parts = urlsplit(url)
            port = parts.port or 443
            host = parts.hostname
        except ValueError:
            host = None
            parts = None
        if parts is None or parts.scheme != "https" or not host or parts.username is not None:
            shown = url if len(url) <= 120 else url[:117] + "..."
            raise InvalidInput(f"Invalid {what} {shown!r}: use https://HOST[:PORT].")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return cls(host, port, parts.netloc, path)


class _Stale(Exception):
    """A kept connection was closed by the server before it answered: open another."""


class Connections:
    """One session's connections, kept between its requests, one per host.

    The first request takes one of the transport's ``max_connections`` slots
    and holds it until :meth:`close`, however many requests follow.
    """

    def __init__(self, slots: asyncio.Semaphore | None) -> None:
        self._slots = slots
        self.open: dict[tuple[str, int], Link] = {}
        self.holds_slot = False

    async def take_slot(self) -> None:
        if self._slots is not None and not self.holds_slot:
            await self._slots.acquire()
            self.holds_slot = True

    def close(self) -> None:
        """Close the connections and give back the slot; the next request opens anew."""
        for _, writer in self.open.values():
            writer.transport.abort()
        self.open.clear()
        if self.holds_slot and self._slots is not None:
            self.holds_slot = False
            self._slots.release()


@dataclass(eq=False, kw_only=True)
class Transport:
    """Requests to the server: trust, the timeout, the bound on open connections, the trace.

    Every request, error and connection is counted in ``stats``.
    """

    context: ssl.SSLContext
    pin: str | None
    timeout: float
    max_connections: InitVar[int | None]
    trace: Callable[[Exchange], None] | None
    user_agent: str
    stats: ClientStats
    _slots: asyncio.Semaphore | None = field(init=False)

    def __post_init__(self, max_connections: int | None) -> None:
        self._slots = asyncio.Semaphore(max_connections) if max_connections else None

    def connections(self) -> Connections:
        """Kept connections for one session, sharing this transport's bound."""
        return Connections(self._slots)

    def count(self, error: EndpointError) -> EndpointError:
        self.stats.errors[error.kind] += 1
        return error

    async def call(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: dict[str, str] | None = None,
        receiver: Receiver | None = None,
        connections: Connections | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request: the status, the headers and the body, or :class:`EndpointError`.

        Without ``connections`` the request has a connection of its own, closed after it.
        """
        receiver = receiver if receiver is not None else Receiver()
        try:
            target = Target.parse(url, "URL")
        except InvalidInput as e:
            raise self.count(EndpointError("bad-response", str(e))) from None
        sent = {"Host": target.netloc, "User-Agent": self.user_agent, **(headers or {})}
        if body is not None:
            sent["Content-Type"] = "application/xml"
        response = _Response(receiver, head_only=method == "HEAD")
        error: EndpointError | None = None
        try:
            if connections is not None:  # a session: one slot for the whole cycle
                await connections.take_slot()
                await self._exchange(method, target, sent, body, response, connections.open)
            elif self._slots is None:
                await self._exchange(method, target, sent, body, response, None)
            else:
                async with self._slots:
                    await self._exchange(method, target, sent, body, response, None)
        except EndpointError as e:
            error = self.count(e)
            raise
        finally:
            if self.trace is not None:
                self.trace(
                    Exchange(
                        method,
                        url,
                        sent,
                        response.status,
                        dict(response.headers),
                        response.received,
                        error.kind if error else None,
                    )
                )
        result = receiver.body()
        return response.status or 0, response.headers, result

    async def _exchange(
        self,
        method: str,
        target: Target,
        headers: dict[str, str],
        body: bytes | None,
        response: _Response,
        kept: dict[tuple[str, int], Link] | None,
    ) -> None:
        self.stats.requests += 1  # counted once it has a connection slot, not while queued
        keep = kept is not None
        lines = [f"{method} {target.path} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines.append(f"Content-Length: {len(body or b'')}")
        if not keep:
            lines.append("Connection: close")
        request = "\r\n".join([*lines, "", ""]).encode("latin-1") + (body or b"")
        key = (target.host, target.port)
        link = kept.pop(key, None) if kept is not None else None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout) as deadline:
                if link is not None and not link[0].at_eof():
                    try:
                        await self._roundtrip(link, request, response, deadline, loop)
                    except _Stale:
                        link[1].transport.abort()  # the server closed it while idle
                        link = None
                if link is None:
                    link = await self._connect(target)
                    await self._roundtrip(link, request, response, deadline, loop)
        except TimeoutError:
            raise EndpointError(
                "timeout", f"{target.netloc} did not answer within {self.timeout:g} s."
            ) from None
        except (ConnectionError, ssl.SSLError, _Stale) as e:
            raise EndpointError("reset", f"The connection to {target.netloc} broke: {e}.") from None
        finally:
            if link is not None:
                if kept is not None and response.complete and response.keep_alive:
                    kept[key] = link
                else:
                    link[1].transport.abort()  # all was read; no TLS goodbye is needed

    async def _connect(self, target: Target) -> Link:
        self.stats.connections += 1
        try:
            reader, writer = await asyncio.open_connection(
                target.host,
                target.port,
                ssl=self.context,
                server_hostname=target.host,
                ssl_handshake_timeout=self.timeout,
            )
        except ssl.SSLCertVerificationError as e:
            raise EndpointError(
                "tls", f"The server certificate is not trusted: {e.verify_message}."
            ) from None
        except ssl.SSLError as e:
            raise EndpointError("tls", f"TLS failed: {e.reason or e}.") from None
        except OSError as e:
            raise EndpointError(
                "connect", f"Cannot connect to {target.netloc}: {e.strerror or e}."
            ) from None
        if self.pin is not None:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            got = hashlib.sha256(der or b"").hexdigest()
            if got != self.pin:
                writer.transport.abort()
                raise EndpointError(
                    "pin-mismatch",
                    f"The server certificate's SHA-256 fingerprint is {got}, not the pinned "
                    f"{self.pin}; refused.",
                )
        return reader, writer

    async def _roundtrip(self, link, request: bytes, response: _Response, deadline, loop) -> None:
        """Send one request on ``link`` and read its whole answer into ``response``.

        Raises :class:`_Stale` when the connection ends before the first byte
        of the answer (a reused connection the server had closed).
        """
        reader, writer = link
        writer.write(request)
        parser = httptools.HttpResponseParser(response)
        response.parser = parser
        head = 0
        while not response.complete:
            try:
                data = await reader.read(_READ)
            except ConnectionError:
                if head == 0:
                    raise _Stale("closed before answering") from None
                raise
            if not data:
                if head == 0:
                    raise _Stale("closed before answering")
                raise EndpointError("reset", "The server closed the connection mid-answer.")
            if response.status is None and head + len(data) > MAX_HEAD + MAX_ANSWER:
                raise EndpointError("bad-response", "The answer's head is too long.")
            head += len(data)
            try:
                parser.feed_data(data)
            except httptools.HttpParserCallbackError as e:
                if isinstance(e.__context__, EndpointError):
                    raise e.__context__ from None
                raise
            except httptools.HttpParserError as e:
                raise EndpointError("bad-response", f"Not an HTTP answer: {e}.") from None
            deadline.reschedule(loop.time() + self.timeout)  # a deadline per read


def tls_context(cafile: str | Path | None, pinned: bool) -> ssl.SSLContext:
    """The client's TLS context: the CA file or the system's store, or none with a pin."""
    if pinned:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the pin is checked after the handshake
    else:
        try:
            context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        except (OSError, ssl.SSLError) as e:
            reason = getattr(e, "strerror", None) or getattr(e, "reason", None) or e
            raise InvalidInput(f"Cannot use the CA file '{cafile}': {reason}.") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context
