"""Reading HTTP/1.1 requests: the httptools parser under hard limits, pipelining.

:class:`RequestReader` is the reading half of a connection (the serving half
is :class:`~dynupdate.server.connection.Connection`, its subclass). It turns
bytes into a queue of :class:`Cycle` (one per request, what answering it
needs) or a :class:`Reject` (a request refused by a limit, answered and the
connection closed). The request being read is per connection, since HTTP/1.1
reads one at a time; a request parsed ahead waits in the queue as its Cycle.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, final

import httptools

from dynupdate.server.messages import Request
from dynupdate.server.state import ServerState

__all__ = [
    "BODY",
    "CLOSING",
    "HEAD",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "MAX_QUEUED",
    "MAX_REQUEST_LINE",
    "WAIT",
    "Cycle",
    "Reject",
    "RequestReader",
]

MAX_REQUEST_LINE = 8 * 1024  # longer target → 414
MAX_HEADER_BYTES = 64 * 1024  # header section → 431
MAX_HEADERS = 100  # header fields → 431
_SLICE = 4096  # big reads are parsed in slices this long (see _feed)
# Requests parsed ahead of the one being answered (pipelining). Past this the
# connection stops reading, and stops parsing what it has read: a client that
# pipelines without reading its answers holds at most this many requests and
# one write buffer of answers, never what it manages to send.
MAX_QUEUED = 32
MAX_HOST = 255  # a longer Host is no host name: 400 (package URLs are built from it)

_HEADER_NAMES = {
    spelling.encode(): name.lower()
    for name in (
        "Host",
        "User-Agent",
        "Accept",
        "Accept-Encoding",
        "Connection",
        "Content-Type",
        "Content-Length",
        "Range",
        "If-Range",
        "If-None-Match",
        "Expect",
        "Authorization",
    )
    for spelling in (name, name.lower())
}
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}
_NEEDS_LENGTH = frozenset(("POST", "PUT", "PATCH"))
# A connection's phase: between requests, reading a head, a body, closing.
WAIT, HEAD, BODY, CLOSING = range(4)
_KEEP_10 = 2  # keep-alive value for an HTTP/1.0 client: needs "Connection: keep-alive"


@final  # lets `type(item) is Reject` tell a Reject from a Cycle, for mypy too
class Reject(Exception):
    """A request refused by the transport: answer, then close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Cycle:
    """One request being answered (uvicorn's ``RequestResponseCycle``).

    ``keep``: 0 close after the answer, 1 keep-alive, _KEEP_10 keep-alive said
    explicitly; ``t0`` when its first byte came; ``sent`` body bytes written.
    """

    __slots__ = ("keep", "request", "sent", "t0")

    def __init__(self, request: Request, keep: int, t0: float) -> None:
        self.request = request
        self.keep = keep
        self.t0 = t0
        self.sent = 0


class RequestReader(asyncio.BufferedProtocol):
    """The reading half of a connection; the subclass answers what lands in ``queue``."""

    # dead, deadline, keep_closing and linger_last are the serving half's, but
    # written here too: slots of the class whose methods assign them.
    __slots__ = (
        "body",
        "dead",
        "deadline",
        "first",
        "fresh",
        "hbytes",
        "head_size",
        "headers",
        "held",
        "keep_closing",
        "linger_last",
        "method",
        "nheaders",
        "parser",
        "queue",
        "reading_paused",
        "reject",
        "state",
        "t0",
        "url",
    )
    # Kept by the serving half, read here.
    shared: ServerState
    loop: asyncio.AbstractEventLoop
    transport: Any
    client: tuple[str, int]
    peer_cert: dict | None
    busy: bool
    dead: bool
    keep_closing: bool
    lingering: bool
    linger_last: float
    deadline: float

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.state = WAIT
        self.first = True
        self.reading_paused = False
        self.queue: deque[Cycle | Reject] = deque()
        self.reject: Reject | None = None
        self.fresh = False
        self.head_size = 0
        self.held = b""  # read but not yet parsed: the queue was full
        # The request being read.
        self.url = b""
        self.headers: dict[str, str] = {}
        self.nheaders = 0
        self.hbytes = 0
        self.body: list[bytes] | None = None
        self.method = "-"
        self.t0 = 0.0

    def _run_queue(self) -> None:
        raise NotImplementedError  # answering is the subclass's

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    # Reads land in one buffer shared by all connections of the server: the
    # transport calls get_buffer() and buffer_updated() back to back, and the
    # parser copies what it keeps. This spares a fresh 256 KiB bytes object
    # (mmap, page faults, munmap) per read, the largest single cost otherwise.

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.shared.read_view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.shared.read_view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.dead:
            if self.lingering:
                self.linger_last = self.loop.time()
            return  # after an error answer or a Connection: close
        if self.held:  # only if a transport delivers data while paused
            data = self.held + bytes(data)
            self.held = b""
        queue = self.queue
        if len(data) <= _SLICE:
            self._feed(data)
        else:
            view = memoryview(data)
            size = len(data)
            for start in range(0, size, _SLICE):
                self._feed(view[start : start + _SLICE])
                if self.dead:
                    break
                if len(queue) >= MAX_QUEUED and start + _SLICE < size:
                    # Parsed later, when the queue has drained (a copy: the
                    # read buffer is shared).
                    self.held = bytes(view[start + _SLICE :])
                    break
        if queue:
            if not self.busy:
                self._run_queue()
            if len(queue) >= MAX_QUEUED or self.held:
                self._pause_reading()

    def _feed(self, data: bytes | memoryview) -> None:
        self.fresh = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No protocol upgrades here: answer what came before, then close.
            self.dead = self.keep_closing = True
        except httptools.HttpParserError as exc:
            self.dead = True
            self.queue.append(self.reject or Reject(400, f"Malformed HTTP request: {exc}."))
        else:
            if self.state == HEAD:
                # The parser reports a header line only once it is complete, so
                # estimate the head from the bytes fed (at most one slice too
                # many): a header section growing past the limit is refused
                # before it ends, and memory stays bounded.
                size = len(data) if self.fresh else self.head_size + len(data)
                self.head_size = size
                if size - len(self.url) > MAX_HEADER_BYTES + _SLICE:
                    self.dead = True
                    self.queue.append(Reject(431, "The header section is larger than 64 KiB."))

    # httptools callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        self.fresh = True
        self.url = b""
        self.headers = {}
        self.nheaders = self.hbytes = 0
        self.body = None
        self.method = "-"
        now = self.loop.time()
        self.t0 = now
        if self.first:
            self.first = False  # the first request's deadline runs from the handshake
        elif not self.busy:
            self.deadline = now + self.shared.request_timeout
        self.state = HEAD

    def on_url(self, fragment: bytes) -> None:
        url = self.url + fragment
        if len(url) > MAX_REQUEST_LINE:
            self._refuse(414, "The request target is longer than 8 KiB.")
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        count = self.nheaders = self.nheaders + 1
        size = self.hbytes = self.hbytes + len(name) + len(value) + 4
        if count > MAX_HEADERS:
            self._refuse(431, f"More than {MAX_HEADERS} header fields.")
        if size > MAX_HEADER_BYTES:
            self._refuse(431, "The header section is larger than 64 KiB.")
        key = _HEADER_NAMES.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self.headers
        old = headers.get(key)
        headers[key] = text if old is None else f"{old}, {text}"

    def on_headers_complete(self) -> None:
        self.state = BODY
        raw = self.parser.get_method()
        method = self.method = _METHODS.get(raw) or raw.decode("latin-1")
        headers = self.headers
        if "transfer-encoding" in headers:
            self._refuse(
                411,
                "Transfer-Encoding is not supported: send the body with a Content-Length header.",
            )
        host = headers.get("host")
        if host is not None and len(host) > MAX_HOST:
            self._refuse(400, f"The Host header is longer than {MAX_HOST} characters.")
        length = headers.get("content-length")
        if length is None:
            if method in _NEEDS_LENGTH:
                self._refuse(411, f"A {method} request needs a Content-Length header.")
        elif int(length) > self.shared.max_body:
            self._refuse(
                413,
                f"The body of {int(length)} bytes is over the limit of "
                f"{self.shared.max_body} bytes.",
            )
        elif (
            "expect" in headers
            and headers["expect"].lower() == "100-continue"
            and not self.busy
            and not self.queue
        ):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, data: bytes) -> None:
        if self.body is None:
            self.body = [data]
        else:
            self.body.append(data)

    def on_message_complete(self) -> None:
        body = self.body
        url = self.url
        cut = url.find(b"?")
        if cut < 0:
            path, query = url.decode("latin-1"), ""
        else:
            path, query = url[:cut].decode("latin-1"), url[cut + 1 :].decode("latin-1")
        request = Request(
            self.method,
            path,
            query,
            self.headers,
            (body[0] if len(body) == 1 else b"".join(body)) if body else b"",
            self.client,
            self.peer_cert,
        )
        parser = self.parser
        keep: int = parser.should_keep_alive()
        if keep and "connection" in self.headers and parser.get_http_version() == "1.0":
            keep = _KEEP_10  # an HTTP/1.0 client asked for keep-alive: say yes explicitly
        self.queue.append(Cycle(request, keep, self.t0))
        self.state = WAIT

    def _refuse(self, status: int, message: str) -> None:
        self.reject = reject = Reject(status, message)
        raise reject
