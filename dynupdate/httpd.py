"""HTTP/1.1 over TLS for an async app: asyncio Protocols, the httptools parser, hard limits.

The transport knows nothing of dynupdate's protocol. It turns bytes into a
``Request``, awaits the app, writes the app's ``Response`` and keeps one client
from hurting the others: handshakes run under a time limit without blocking
the accept loop, every request has a whole-request deadline, idle keep-alive
connections and clients that stop reading are dropped, bodies and headers have
size limits answered (with an XML error) before anything big is read, and the
number of open connections is capped.

    async def app(request: Request) -> Response:
        return Response(200, [("Content-Type", "text/plain")], b"hello")

    run(lambda: app, "127.0.0.1", 8443, server_context(cert, key), workers=2)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import inspect
import logging
import os
import resource
import select
import signal
import socket
import ssl
import time
import traceback
import types
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httptools

from dynupdate.core.errors import InvalidInput
from dynupdate.server.tlsio import TLSTransport, spoke_plain_http, wrap_server_socket

__all__ = [
    "ERROR_CODES",
    "FILE_CHUNK",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "MAX_REQUEST_LINE",
    "App",
    "FileBody",
    "Request",
    "Response",
    "Server",
    "default_error_body",
    "error_code",
    "error_response",
    "file_response",
    "listen_sockets",
    "loop_factory",
    "open_file_limit",
    "run",
]

logger = logging.getLogger("dynupdate.httpd")

MAX_REQUEST_LINE = 8 * 1024  # longer target → 414
MAX_HEADER_BYTES = 64 * 1024  # header section → 431
MAX_HEADERS = 100  # header fields → 431
FILE_CHUNK = 256 * 1024  # file bodies are read and written this much at a time
# After an error answer the client may still be sending (a refused body): closing
# with unread data would send a reset that can destroy the answer before the
# client reads it. So keep reading and dropping until the client has been quiet
# for LINGER_QUIET seconds (LINGER_MAX at most), then close.
LINGER_QUIET = 0.25
LINGER_MAX = 2.0
CLOSE_GRACE = 1.0  # seconds a connection closed for a timeout or an error gets to go
_SLICE = 4096  # big reads are parsed in slices this long (see _feed)
# Requests parsed ahead of the one being answered (pipelining). Past this the
# connection stops reading, and stops parsing what it has read: a client that
# pipelines without reading its answers holds at most this many requests and
# one write buffer of answers, never what it manages to send.
MAX_QUEUED = 32
MAX_HOST = 255  # a longer Host is no host name: 400 (package URLs are built from it)
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
_READ_BUFFER = 64 * 1024

ERROR_CODES = {
    400: "invalid-request",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    411: "invalid-request",
    413: "too-large",
    414: "invalid-request",
    416: "invalid-request",
    431: "invalid-request",
    500: "internal",
    503: "unavailable",
}


@dataclass(slots=True)
class Request:
    """One HTTP request, as received."""

    method: str  # "GET", "POST", ...
    path: str  # the raw target before "?", exactly as sent (not percent-decoded)
    query: str  # the raw text after "?", "" when none
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "
    body: bytes
    client: tuple[str, int]
    peer_cert: dict | None  # the client certificate (ssl getpeercert()) under mutual TLS


@dataclass(slots=True)
class FileBody:
    """A byte range of a file, streamed as the response body."""

    path: Path
    offset: int
    length: int


@dataclass(slots=True)
class Response:
    """What the app answers. The transport adds Content-Length, Date and Connection."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    file: FileBody | None = None  # stream this instead of body
    log: str = ""  # a few words for the access log line


App = Callable[[Request], Awaitable[Response]]
ErrorBody = Callable[[int, str, str], bytes]


def error_code(status: int) -> str:
    """The ``code`` of the XML error document for an HTTP status."""
    return ERROR_CODES.get(status) or ("internal" if status >= 500 else "invalid-request")


_error_document: Callable[[str, str], bytes] | None = None


def default_error_body(status: int, code: str, message: str) -> bytes:
    """``<error code="…" message="…"/>`` from dynupdate.protocol, built with lxml."""
    global _error_document
    if _error_document is None:
        try:
            from dynupdate.protocol import error_document
        except ImportError:  # the transport used on its own: the same document
            from lxml import etree

            def error_document(code: str, message: str) -> bytes:
                element = etree.Element("error", code=code, message=message)
                return etree.tostring(element, xml_declaration=True, encoding="UTF-8")

        _error_document = error_document
    return _error_document(code, message)


def error_response(status: int, message: str, code: str | None = None) -> Response:
    """An XML error answer, as the transport itself makes them."""
    body = default_error_body(status, code or error_code(status), message)
    return Response(status, [("Content-Type", "application/xml")], body)


# ---------------------------------------------------------------------------
# Whole files with validators and single ranges (RFC 9110 sections 13 and 14)


def file_response(
    request: Request, path: Path, etag: str, content_type: str = "application/octet-stream"
) -> Response:
    """Answer a GET or HEAD with the file at ``path``: 200, 206, 304 or 416.

    ``etag`` is the file's strong validator (quotes added when missing). Honours
    If-None-Match (weak comparison, lists, ``*``), a single ``Range`` of bytes
    (``a-b``, ``a-``, ``-n``) and If-Range. A multi-range or malformed Range is
    ignored, as RFC 9110 allows: the whole file is sent. Raises OSError
    (FileNotFoundError...) when the file cannot be stat'ed.
    """
    st = os.stat(path)
    size = st.st_size
    tag = etag if etag.startswith(('"', 'W/"')) else f'"{etag}"'
    modified = formatdate(st.st_mtime, usegmt=True)
    headers = request.headers
    none_match = headers.get("if-none-match")
    if none_match is not None and _etag_in(none_match, tag):
        return Response(304, [("ETag", tag), ("Last-Modified", modified)])
    base = [
        ("Content-Type", content_type),
        ("ETag", tag),
        ("Accept-Ranges", "bytes"),
        ("Last-Modified", modified),
    ]
    spec = headers.get("range") if request.method == "GET" else None
    if spec is not None:
        if_range = headers.get("if-range")
        if if_range is not None and not _if_range_holds(if_range.strip(), tag, modified):
            spec = None
    span = _parse_range(spec, size) if spec is not None else None
    if span is None:
        return Response(200, base, file=FileBody(Path(path), 0, size))
    if span is _UNSATISFIABLE:
        message = f"The range {spec[:100]!r} is outside the {size}-byte file."
        answer = error_response(416, message)
        answer.headers.append(("Content-Range", f"bytes */{size}"))
        return answer
    start, end = span
    base.append(("Content-Range", f"bytes {start}-{end}/{size}"))
    return Response(206, base, file=FileBody(Path(path), start, end - start + 1))


_UNSATISFIABLE: Any = object()


def _etag_in(field: str, tag: str) -> bool:
    """Weak comparison of ``tag`` with an If-None-Match list."""
    if field.strip() == "*":
        return True
    ours = tag[2:] if tag.startswith("W/") else tag
    for item in field.split(","):
        item = item.strip()
        if item[:2] == "W/":
            item = item[2:]
        if item == ours:
            return True
    return False


def _if_range_holds(value: str, tag: str, modified: str) -> bool:
    if value.startswith('"'):
        return value == tag  # strong comparison; a weak tag of ours starts with W/
    if value.startswith("W/"):
        return False
    return value == modified


def _parse_range(spec: str, size: int) -> tuple[int, int] | Any | None:
    """(first, last) for a single satisfiable byte range, _UNSATISFIABLE, or None to ignore."""
    unit, eq, ranges = spec.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    ranges = ranges.strip()
    first, dash, last = ranges.partition("-")
    if not dash or "," in ranges or not _is_digits(last, empty_ok=bool(first)):
        return None
    if first:
        if not _is_digits(first, empty_ok=False):
            return None
        start = int(first)
        end = int(last) if last else size - 1
        if end < start and last:
            return None  # an invalid range-spec makes the whole field invalid
        if start >= size:
            return _UNSATISFIABLE
        return start, min(end, size - 1)
    suffix = int(last)
    if suffix == 0 or size == 0:
        return _UNSATISFIABLE
    return max(0, size - suffix), size - 1


def _is_digits(text: str, *, empty_ok: bool) -> bool:
    if not text:
        return empty_ok
    return len(text) <= 30 and text.isascii() and text.isdigit()


# ---------------------------------------------------------------------------
# The connection protocol


class _Reject(Exception):
    """A request refused by the transport: answer, then close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in HTTPStatus}
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
_NO_BODY_STATUS = frozenset((204, 304))
_INF = float("inf")
_WAIT, _HEAD, _BODY, _CLOSING = range(4)
_KEEP_10 = 2  # keep-alive value for an HTTP/1.0 client: needs "Connection: keep-alive"

_CoroutineType = types.CoroutineType


@types.coroutine
def _resume(coro: Any, yielded: Any) -> Any:
    """Finish a coroutine that was started eagerly and has just yielded ``yielded``.

    Most requests complete without waiting for anything: running the app's
    coroutine directly saves a Task and a trip through the event loop for them.
    Only the ones that really wait get a Task, which drives this generator.
    """
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _await(awaitable: Awaitable[Response]) -> Response:
    return await awaitable


class _Connection(asyncio.BufferedProtocol):
    __slots__ = (
        "app",
        "body",
        "busy",
        "client",
        "client_key",
        "dead",
        "deadline",
        "drain",
        "first",
        "fresh",
        "hbytes",
        "head_size",
        "headers",
        "held",
        "keep_closing",
        "linger_last",
        "linger_start",
        "lingering",
        "loop",
        "made",
        "method",
        "nheaders",
        "parser",
        "peer_cert",
        "queue",
        "reading_paused",
        "reject",
        "sent",
        "server",
        "state",
        "t0",
        "task",
        "transport",
        "url",
        "wdeadline",
        "write_paused",
    )

    def __init__(self, server: Server, client: tuple[str, int]) -> None:
        self.server = server
        self.loop = server.loop
        self.app = server.app
        self.client = client
        self.client_key: str | bytes | None = None  # counted under it in server._per_client
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.peer_cert: dict | None = None
        self.made = False
        self.state = _WAIT
        self.first = True
        self.deadline = _INF
        self.wdeadline = _INF
        self.busy = False
        self.dead = False
        self.keep_closing = False
        self.lingering = False
        self.linger_start = self.linger_last = 0.0
        self.reading_paused = False
        self.write_paused = False
        self.drain: asyncio.Future | None = None
        self.task: asyncio.Task | None = None
        self.queue: deque = deque()
        self.reject: _Reject | None = None
        self.fresh = False
        self.head_size = 0
        self.held = b""  # read but not yet parsed: the queue was full
        self.sent = 0
        self.url = b""
        self.headers: dict[str, str] = {}
        self.nheaders = 0
        self.hbytes = 0
        self.body: list[bytes] | None = None
        self.method = "-"
        self.t0 = 0.0

    # asyncio callbacks -----------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        server = self.server
        self.transport = transport
        self.made = True
        server._conns.add(self)
        transport.set_write_buffer_limits(high=FILE_CHUNK)
        if server._peer_certs:
            self.peer_cert = transport.get_extra_info("peercert") or None
        self.deadline = self.loop.time() + server.request_timeout
        if server.closing:
            self._close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.dead = True
        self.deadline = self.wdeadline = _INF
        server = self.server
        server._conns.discard(self)
        server._count -= 1
        if self.client_key is not None:
            server._leave(self.client_key)
        drain = self.drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        if server._drained is not None and not server._conns and not server._drained.done():
            server._drained.set_result(None)

    def eof_received(self) -> bool | None:
        # A plain-HTTP client may half-close after its request: still answer it.
        # (Under TLS the peer's close_notify ends the connection whatever we say.)
        plain = self.server.ssl_context is None
        return True if plain and self.busy and self.state != _CLOSING else None

    def pause_writing(self) -> None:
        # The client is not reading its answers: read (and answer) nothing more
        # from it until it does, or the write deadline drops it.
        self.write_paused = True
        self.wdeadline = self.loop.time() + self.server.write_timeout
        self._pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.wdeadline = _INF
        drain = self.drain
        if drain is not None:
            self.drain = None
            if not drain.done():
                drain.set_result(None)
        elif not self.busy:
            # Called from inside the transport's flush: go on once it is done.
            self.loop.call_soon(self._run_queue)

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    # Reads land in one buffer shared by all connections of the server: the
    # transport calls get_buffer() and buffer_updated() back to back, and the
    # parser copies what it keeps. This spares a fresh 256 KiB bytes object
    # (mmap, page faults, munmap) per read, the largest single cost otherwise.

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server._read_view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.server._read_view[:nbytes])

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
            self.queue.append(self.reject or _Reject(400, f"Malformed HTTP request: {exc}."))
        else:
            if self.state == _HEAD:
                # The parser reports a header line only once it is complete, so
                # estimate the head from the bytes fed (at most one slice too
                # many): a header section growing past the limit is refused
                # before it ends, and memory stays bounded.
                size = len(data) if self.fresh else self.head_size + len(data)
                self.head_size = size
                if size - len(self.url) > MAX_HEADER_BYTES + _SLICE:
                    self.dead = True
                    self.queue.append(_Reject(431, "The header section is larger than 64 KiB."))

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
            self.deadline = now + self.server.request_timeout
        self.state = _HEAD

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
        self.state = _BODY
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
        elif int(length) > self.server.max_body:
            self._refuse(
                413,
                f"The body of {int(length)} bytes is over the limit of "
                f"{self.server.max_body} bytes.",
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
        keep = parser.should_keep_alive()
        if keep and "connection" in self.headers and parser.get_http_version() == "1.0":
            keep = _KEEP_10  # an HTTP/1.0 client asked for keep-alive: say yes explicitly
        self.queue.append((request, keep, self.t0))
        self.state = _WAIT

    def _refuse(self, status: int, message: str) -> None:
        self.reject = reject = _Reject(status, message)
        raise reject

    # Serving ---------------------------------------------------------------

    def _run_queue(self) -> None:
        queue = self.queue
        while queue and not self.busy and self.transport is not None:
            if self.write_paused:
                return  # resume_writing() comes back here; reading is paused meanwhile
            item = queue.popleft()
            if type(item) is _Reject:
                self._send_reject(item)
                return
            self._call_app(*item)
        if not self.busy and self.transport is not None:
            self._idle()

    def _idle(self) -> None:
        """Back to reading: the keep-alive timer, or a fresh window for a half-read request."""
        if self.held:
            self.loop.call_soon(self._feed_held)
            return
        now = self.loop.time()
        if self.state == _WAIT:
            server = self.server
            if server._count < server._crowded:
                self.deadline = now + server.keepalive_timeout
            else:
                self.deadline = now + server.crowded_keepalive_timeout
        else:
            self.deadline = now + self.server.request_timeout
        if self.reading_paused and not self.write_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def _feed_held(self) -> None:
        if self.transport is None or self.busy or self.write_paused:
            return  # closed, or whoever is busy calls _idle() again
        if not self.held:
            return  # scheduled twice
        data, self.held = self.held, b""
        self.data_received(data)
        if not self.busy and not self.queue and self.transport is not None:
            self._idle()

    def _call_app(self, request: Request, keep: int, t0: float) -> None:
        self.busy = True
        self.deadline = _INF
        try:
            coro = self.app(request)
            if type(coro) is not _CoroutineType:
                coro = _await(coro)
            yielded = coro.send(None)
        except StopIteration as stop:
            self._respond(request, stop.value, keep, t0)
            return
        except Exception:
            logger.exception("The app failed on %s %s", request.method, _printable(request.path))
            self._respond(request, self.server._internal_error(), keep, t0)
            return
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        task = self.loop.create_task(_resume(coro, yielded))
        self.task = task
        task.add_done_callback(partial(self._app_done, request, keep, t0))

    def _app_done(self, request: Request, keep: int, t0: float, task: asyncio.Task) -> None:
        self.task = None
        if task.cancelled():
            self._abort()
            return
        exc = task.exception()
        if exc is not None:
            logger.error(
                "The app failed on %s %s",
                request.method,
                _printable(request.path),
                exc_info=exc,
            )
            response = self.server._internal_error()
        else:
            response = task.result()
        if self.transport is None:
            return
        self._respond(request, response, keep, t0)
        if not self.busy:
            self._run_queue()

    def _respond(self, request: Request, response: Any, keep: int, t0: float) -> None:
        transport = self.transport
        if transport is None:
            return
        server = self.server
        if server.closing or self.keep_closing:
            keep = 0
        try:
            if not isinstance(response, Response) or not 200 <= response.status <= 599:
                raise TypeError(f"the app answered {response!r}, not a Response")
            status = response.status
            file = response.file
            if status in _NO_BODY_STATUS:
                length = None
            else:
                length = file.length if file is not None else len(response.body)
            head = self._head(status, response.headers, length, keep)
        except Exception:
            logger.exception("The app's answer to %s %s", request.method, _printable(request.path))
            response = server._internal_error()
            status, file, length = 500, None, len(response.body)
            head = self._head(500, response.headers, length, keep)
        if file is None or request.method == "HEAD" or not length:
            # Counted before the write: a client that has its answer sees it counted.
            server.requests += 1
        if request.method == "HEAD" or not length:
            transport.write(head)
            sent = 0
        elif file is None:
            body = response.body
            if length < 65536:
                transport.write(head + body)
            else:
                transport.write(head)
                transport.write(body)
            sent = length
        else:
            self._start_file(request, response, head, keep, t0)
            return
        self._finish(request.method, request.path, status, sent, t0, response.log, keep)

    def _finish(
        self, method: str, path: str, status: int, sent: int, t0: float, log: str, keep: int
    ) -> None:
        server = self.server
        if server.access_log is not None:
            server._log_access(self.client[0], method, path, status, sent, t0, log)
        if keep:
            self.busy = False
        else:
            # What was written may still be on its way: write_timeout bounds it.
            self._close(grace=server.write_timeout + CLOSE_GRACE)

    def _head(self, status: int, headers: list[tuple[str, str]], length: int | None, keep: int):
        server = self.server
        now = int(time.time())
        if now != server._date_second:
            server._date_second = now
            server._date_line = f"Date: {formatdate(now, usegmt=True)}\r\n"
        line = _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Status\r\n"
        if headers:
            block = "".join([f"{name}: {value}\r\n" for name, value in headers])
            count = len(headers)
            if block.count("\n") != count or block.count("\r") != count:
                raise ValueError("a response header holds CR or LF")
        else:
            block = ""
        if keep == 1:
            end = "\r\n"
        elif keep:
            end = "Connection: keep-alive\r\n\r\n"
        else:
            end = "Connection: close\r\n\r\n"
        if length is not None:
            end = f"Content-Length: {length}\r\n{end}"
        return (line + server._date_line + block + end).encode("latin-1")

    def _send_reject(self, reject: _Reject) -> None:
        self.busy = True
        status = reject.status
        server = self.server
        body = server._error(status, reject.message)
        head = self._head(status, [("Content-Type", "application/xml")], len(body), 0)
        self.transport.write(head + body)
        server.rejected += 1
        if server.access_log is not None:
            path = self.url.decode("latin-1")
            server._log_access(
                self.client[0], self.method, path or "-", status, len(body), self.t0, reject.message
            )
        self._close(linger=True)

    # Files -------------------------------------------------------------------

    def _start_file(
        self, request: Request, response: Response, head: bytes, keep: int, t0: float
    ) -> None:
        file = response.file
        assert file is not None
        try:
            fd = os.open(file.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                answer = self.server._error_response(404, "The file is gone.")
            else:
                logger.error("Cannot open %s: %s", file.path, exc)
                answer = self.server._internal_error()
            self._respond(request, answer, keep, t0)
            return
        self.server.requests += 1
        self.transport.write(head)
        self.sent = 0
        task = self.loop.create_task(self._send_file(fd, file.offset, file.length))
        self.task = task
        done = partial(self._file_done, request, response.status, keep, t0, response.log)
        task.add_done_callback(done)

    async def _send_file(self, fd: int, offset: int, length: int) -> None:
        loop = self.loop
        try:
            end = offset + length
            while offset < end:
                if self.transport is None:
                    return
                if self.write_paused:
                    self.drain = loop.create_future()
                    await self.drain
                    continue
                # Read in a thread: a cold read never stalls the loop, and this
                # measured cheaper and faster than os.pread (even RWF_NOWAIT) inline.
                size = min(FILE_CHUNK, end - offset)
                data = await loop.run_in_executor(None, os.pread, fd, size, offset)
                if not data:
                    raise OSError(errno.EIO, "the file is shorter than announced")
                if self.transport is None:
                    return
                self.transport.write(data)
                offset += len(data)
                self.sent += len(data)
        finally:
            os.close(fd)

    def _file_done(
        self, request: Request, status: int, keep: int, t0: float, log: str, task: asyncio.Task
    ) -> None:
        self.task = None
        complete = not task.cancelled() and task.exception() is None and self.transport is not None
        if not task.cancelled() and task.exception() is not None:
            logger.error("Sending %s failed", _printable(request.path), exc_info=task.exception())
        if not complete:
            server = self.server
            if server.access_log is not None:
                server._log_access(
                    self.client[0],
                    request.method,
                    request.path,
                    status,
                    self.sent,
                    t0,
                    f"{log} aborted".strip(),
                )
            self._abort()
            return
        self._finish(request.method, request.path, status, self.sent, t0, log, keep)
        if not self.busy:
            self._run_queue()

    # Closing -----------------------------------------------------------------

    def _close(self, *, linger: bool = False, grace: float = CLOSE_GRACE) -> None:
        """Close after what was written; with linger, first drain what the client still sends."""
        self.state = _CLOSING
        self.busy = self.dead = True
        self.queue.clear()
        transport = self.transport
        if transport is None:
            return
        now = self.loop.time()
        if linger:
            self.lingering = True
            self.linger_start = self.linger_last = now
            self.deadline = now + LINGER_MAX + CLOSE_GRACE  # backstop
            self.loop.call_later(LINGER_QUIET, self._linger)
            if self.reading_paused:
                self.reading_paused = False
                transport.resume_reading()
        else:
            self.lingering = False
            self.deadline = now + grace
            transport.close()

    def _linger(self) -> None:
        if not self.lingering or self.transport is None:
            return
        now = self.loop.time()
        quiet = now - self.linger_last
        if quiet >= LINGER_QUIET * 0.99 or now - self.linger_start >= LINGER_MAX:
            self._close()
        else:
            self.loop.call_later(LINGER_QUIET - quiet, self._linger)

    def _abort(self) -> None:
        self.state = _CLOSING
        self.busy = self.dead = True
        self.deadline = self.wdeadline = _INF
        if self.transport is not None:
            self.transport.abort()

    def _expire(self, now: float) -> None:
        if self.wdeadline <= now:
            self.server.timeouts += 1
            self._abort()  # the client stopped reading: nothing more will reach it
        elif self.state == _CLOSING:
            self._abort()
        else:
            if self.state != _WAIT:
                self.server.timeouts += 1  # a request not received in time
            self._close()

    def _shutdown(self) -> None:
        if self.state == _CLOSING:
            return
        if self.busy:
            self.keep_closing = True  # answer the request in flight, then close
        else:
            self._close()


def _printable(text: str) -> str:
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 200 else text[:200] + "..."


# ---------------------------------------------------------------------------
# The server


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
    limited; default: the ``dynupdate.httpd`` logger), each led by a UTC time.
    ``ssl_context=None`` serves plain HTTP (for tests and TLS-terminating proxies).
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
    ) -> None:
        self.app = app
        self.ssl_context = ssl_context
        self.max_body = max_body
        self.handshake_timeout = handshake_timeout
        self.request_timeout = request_timeout
        self.keepalive_timeout = keepalive_timeout
        self.write_timeout = write_timeout
        self.shutdown_timeout = shutdown_timeout
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.crowded_keepalive_timeout = min(crowded_keepalive_timeout, keepalive_timeout)
        self.access_log = access_log
        self.connection_log = connection_log or logger.warning
        self.error_body = error_body or default_error_body
        self.backlog = backlog
        self.closing = False
        # Counters, for tests and for operators.
        self.requests = 0
        self.refused = 0  # connections closed at once: max_connections or max_per_client reached
        self.rejected = 0  # requests refused by a limit (4xx from the transport)
        self.timeouts = 0  # requests not received, or answers not read, in time
        self.handshake_failures = 0
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._peer_certs = ssl_context is not None and ssl_context.verify_mode != ssl.CERT_NONE
        self._socks: list[socket.socket] = []
        self._conns: set[_Connection] = set()
        self._opening: set[asyncio.Task] = set()  # plain HTTP connections being set up
        self._handshaking: set[TLSTransport] = set()
        self._count = 0  # accepted and not yet closed, handshakes included
        self._crowded = max(1, max_connections * 3 // 4)  # from here keep-alive is short
        # Open connections per client address, when max_per_client is set.
        self._per_client: dict[str | bytes, int] | None = {} if max_per_client else None
        self._date_second = -1
        self._date_line = ""
        self._stamp_second = -1
        self._stamp_text = ""
        self._events_until = 0.0  # the end of the current EVENT_PERIOD
        self._events = 0  # lines logged in it
        self._events_dropped = 0  # and not logged
        self._read_view = memoryview(bytearray(_READ_BUFFER))
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._sweep_interval = max(
            0.05, min(1.0, min(request_timeout, keepalive_timeout, write_timeout) / 5)
        )
        self._drained: asyncio.Future | None = None
        self._done: asyncio.Future | None = None

    @property
    def connections(self) -> int:
        """Open connections, those still in their TLS handshake included."""
        return self._count

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
            raise RuntimeError("this server is already started")
        self.loop = loop = asyncio.get_running_loop()
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
        if self.closing:
            if self._done is not None:
                await asyncio.shield(self._done)
            return
        self.closing = True
        loop = self.loop
        for s in self._socks:
            loop.remove_reader(s.fileno())
            s.close()
        for task in list(self._opening):
            task.cancel()
        for transport in list(self._handshaking):
            transport.abort()
        for conn in list(self._conns):
            conn._shutdown()
        self._drained = loop.create_future()
        if not self._conns:
            self._drained.set_result(None)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._drained), self.shutdown_timeout)
        if self._conns:
            for conn in list(self._conns):
                if conn.task is not None:
                    conn.task.cancel()
                conn._abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drained), 1.0)
        if self._opening:
            await asyncio.gather(*self._opening, return_exceptions=True)
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
        self._flush_events()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    # internals -------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
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
            if self._count >= self.max_connections or self.closing:
                self.refused += 1
                conn.close()
                if not self.closing:
                    self._event(
                        addr[0], f"refused: {self._count} connections open, the server's maximum"
                    )
                continue
            per_client = self._per_client
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
            self._count += 1
            conn.setblocking(False)
            protocol = _Connection(self, addr[:2])
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
        if self.closing:
            return  # aborted by close()
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
        body = self._error(400, "This port speaks HTTPS only: use https://.")
        head = (
            f"HTTP/1.1 400 Bad Request\r\nDate: {formatdate(usegmt=True)}\r\n"
            f"Content-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode("latin-1") + body

    def _stamp(self) -> str:
        """The time now, ISO 8601 UTC to the second (made once a second)."""
        now = int(time.time())
        if now != self._stamp_second:
            self._stamp_second = now
            self._stamp_text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return self._stamp_text

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
        self._write_event(f"{self._stamp()} {client} {_printable(what)}")

    def _flush_events(self) -> None:
        if self._events_dropped:
            self._write_event(
                f"{self._stamp()} {self._events_dropped} more connection failures not logged "
                f"(at most {EVENT_BURST} lines in {EVENT_PERIOD:g} s)"
            )
        self._events = self._events_dropped = 0

    def _write_event(self, line: str) -> None:
        try:
            self.connection_log(line)
        except Exception:
            logger.exception("The connection log failed")

    def _gone(self, protocol: _Connection) -> None:
        """A connection that never reached connection_made() is closed."""
        self._count -= 1
        if protocol.client_key is not None:
            self._leave(protocol.client_key)

    def _leave(self, key: str | bytes) -> None:
        per_client = self._per_client
        assert per_client is not None
        left = per_client[key] - 1
        if left:
            per_client[key] = left
        else:
            del per_client[key]

    def _resume_accept(self, listener: socket.socket) -> None:
        if not self.closing:
            self.loop.add_reader(listener.fileno(), self._accept, listener)

    async def _open(self, conn: socket.socket, protocol: _Connection) -> None:
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
            if self._count >= self._crowded:
                # Idle connections that started waiting before the server filled up.
                short = now + self.crowded_keepalive_timeout
                for conn in self._conns:
                    if conn.state == _WAIT and not conn.busy and conn.deadline > short:
                        conn.deadline = short
            expired = [c for c in self._conns if c.deadline <= now or c.wdeadline <= now]
            for conn in expired:
                conn._expire(now)
        finally:
            self._sweep_handle = self.loop.call_later(self._sweep_interval, self._sweep)

    def _error(self, status: int, message: str) -> bytes:
        return self.error_body(status, error_code(status), message)

    def _error_response(self, status: int, message: str) -> Response:
        return Response(status, [("Content-Type", "application/xml")], self._error(status, message))

    def _internal_error(self) -> Response:
        return self._error_response(
            500, "The server failed on this request; the details are in its log."
        )

    def _log_access(
        self, client: str, method: str, path: str, status: int, sent: int, t0: float, log: str
    ) -> None:
        ms = (self.loop.time() - t0) * 1000.0
        line = f"{self._stamp()} {client} {method} {_printable(path)} {status} {sent} {ms:.1f}ms"
        try:
            self.access_log(f"{line} {log}" if log else line)  # type: ignore[misc]
        except Exception:
            logger.exception("The access log failed")


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
) -> list[socket.socket]:
    """Bound (and listening) sockets for every address of host; port 0 picks one free port."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise InvalidInput(f"Cannot listen on {host!r}: {exc.strerror}.") from None
    socks: list[socket.socket] = []
    seen = set()
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
                        "stop it or choose another --host or --port."
                    ) from None
                raise InvalidInput(
                    f"Cannot listen on {addr[0]} port {addr[1]}: {exc.strerror}. "
                    "Choose another --host or --port."
                ) from None
            if listen:
                s.listen(backlog)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


# ---------------------------------------------------------------------------
# Running: one process, or a supervisor and N workers sharing the port


def run(
    app_factory: Callable[[], App | Awaitable[App]],
    host: str | None,
    port: int,
    ssl_context: ssl.SSLContext | None,
    *,
    workers: int = 1,
    ready: Callable[[list[tuple[str, int]]], None] | None = None,
    loop: str = "auto",
    **server_opts: Any,
) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly. Blocks.

    ``app_factory()`` is called in each worker, inside its event loop (it may
    be async); an app with an async ``aclose()`` has it awaited once the
    server has drained. With ``workers > 1`` the process forks that many
    workers, each listening on the same port (SO_REUSEPORT, the kernel
    spreads connections); the parent restarts a worker that dies and passes
    SIGINT/SIGTERM on. ``ready(addresses)`` is called once every worker listens.
    ``loop``: "uvloop", "asyncio", or "auto" (uvloop when installed: it takes
    about a quarter off the CPU per request and per handshake).
    """
    factory = loop_factory(loop)
    # A write past a file-size limit (RLIMIT_FSIZE) must fail with EFBIG, as a full
    # disk does, not kill the server: Python ignores SIGXFSZ only when it owns the
    # signal handlers (not when embedded). Inherited by the forked workers.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if workers <= 1:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_serve(app_factory, host, port, ssl_context, server_opts, False, ready))
        return
    _supervise(app_factory, host, port, ssl_context, server_opts, workers, ready, factory)


def loop_factory(name: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop factory for ``name`` ("auto", "uvloop" or "asyncio"); None: asyncio's."""
    if name == "asyncio":
        return None
    if name not in ("auto", "uvloop"):
        raise InvalidInput(f"Unknown event loop {name!r}: use auto, uvloop or asyncio.")
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise InvalidInput("uvloop is not installed: pip install uvloop.") from None
        return None
    return uvloop.new_event_loop


async def _serve(
    app_factory: Callable[[], Any],
    host: str | None,
    port: int,
    ssl_context: ssl.SSLContext | None,
    server_opts: dict[str, Any],
    reuse_port: bool,
    ready: Callable[[list[tuple[str, int]]], None] | None,
    parent: int | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM or, for a worker, until ``parent`` (a pipe) reads EOF."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    if parent is not None:
        loop.add_reader(parent, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)  # a forked worker starts blocked
    try:
        app = app_factory()
        if inspect.isawaitable(app):
            app = await app
        server = Server(app, ssl_context=ssl_context, **server_opts)
        addresses = await server.start(host, port, reuse_port=reuse_port)
        # What start-up made lives as long as the server: out of the collector's
        # sight, a full collection walks only what requests leave behind.
        gc.freeze()
        if ready is not None:
            ready(addresses)
        await stop.wait()
        await server.close()
        aclose = getattr(app, "aclose", None)
        if aclose is not None:
            await aclose()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        if parent is not None:
            loop.remove_reader(parent)


def _supervise(
    app_factory: Callable[[], Any],
    host: str | None,
    port: int,
    ssl_context: ssl.SSLContext | None,
    server_opts: dict[str, Any],
    workers: int,
    ready: Callable[[list[tuple[str, int]]], None] | None,
    factory: Callable[[], asyncio.AbstractEventLoop] | None,
) -> None:
    if port:
        # SO_REUSEPORT would let the kernel spread connections over this server and
        # any other one listening there (another home, another certificate). A probe
        # bound without it fails while anyone listens on the address (a wildcard one
        # included); with SO_REUSEADDR, connections in TIME_WAIT do not count.
        for probe in listen_sockets(host, port, listen=False):
            probe.close()
    # Bound but not listening: reserves the port (and resolves port 0) for the
    # workers' own SO_REUSEPORT sockets without taking any connection itself.
    reserved = listen_sockets(host, port, reuse_port=True, listen=False)
    addresses = [s.getsockname()[:2] for s in reserved]
    port = addresses[0][1]
    signals = {signal.SIGINT, signal.SIGTERM}
    ready_r, ready_w = os.pipe()
    # Only the supervisor keeps the write end: when it dies, even by SIGKILL, the
    # workers read EOF and stop, so none serves (and holds the home's lock) orphaned.
    alive_r, alive_w = os.pipe()
    children: dict[int, float] = {}
    stopping = False

    def started(_addresses: list[tuple[str, int]]) -> None:
        os.write(ready_w, b".")

    def spawn() -> None:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(ready_r)
                os.close(alive_w)
                for s in reserved:
                    s.close()
                for signum in signals:
                    signal.signal(signum, signal.SIG_DFL)
                args = (app_factory, host, port, ssl_context, server_opts, True, started, alive_r)
                with asyncio.Runner(loop_factory=factory) as runner:
                    runner.run(_serve(*args))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        children[pid] = time.monotonic()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def stop_all(signum: int = signal.SIGTERM, _frame: Any = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    previous = {signum: signal.signal(signum, stop_all) for signum in signals}
    failure = None
    try:
        for _ in range(workers):
            spawn()
        waiting = workers
        while waiting and not stopping:
            readable, _, _ = select.select([ready_r], [], [], 0.5)
            if readable:
                waiting -= len(os.read(ready_r, waiting))
                continue
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid:
                children.pop(pid, None)
                failure = f"a worker exited while starting (status {status})"
                stop_all()
        if not stopping and ready is not None:
            ready([(address[0], port) for address in addresses])
        restarts: deque[float] = deque()
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            children.pop(pid, None)
            if stopping:
                continue
            now = time.monotonic()
            restarts.append(now)
            while restarts and restarts[0] < now - 60:
                restarts.popleft()
            logger.error("Worker %d exited (status %d); starting another.", pid, status)
            if len(restarts) > 3 * workers:
                failure = "workers keep exiting"
                stop_all()
            else:
                spawn()
    finally:
        stopping = True
        stop_all()
        for pid in list(children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for s in reserved:
            s.close()
        for fd in (ready_r, ready_w, alive_r, alive_w):
            os.close(fd)
    if failure:
        raise RuntimeError(f"The server stopped: {failure}; see the errors above.")
