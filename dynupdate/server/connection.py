"""One HTTP/1.1 connection: answering what its reading half parsed, flow control, closing.

:class:`Connection` is the asyncio protocol of one client. Its reading half,
:class:`~dynupdate.server.reading.RequestReader`, queues one
:class:`~dynupdate.server.reading.Cycle` per request; this half calls the app
for each in turn, writes the answer (a file streamed under flow control) and
its access-log line, keeps the deadlines and closes. Everything shared with
the other connections lives in the
:class:`~dynupdate.server.state.ServerState` it is given.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
import types
from collections.abc import Awaitable
from email.utils import formatdate
from functools import partial
from http import HTTPStatus
from typing import Any

from dynupdate.server.messages import Response
from dynupdate.server.reading import CLOSING, WAIT, Cycle, Reject, RequestReader
from dynupdate.server.state import ServerState, printable

__all__ = ["CLOSE_GRACE", "FILE_CHUNK", "LINGER_MAX", "LINGER_QUIET", "Connection"]

logger = logging.getLogger("dynupdate.server")

FILE_CHUNK = 256 * 1024  # file bodies are read and written this much at a time
# After an error answer the client may still be sending (a refused body): closing
# with unread data would send a reset that can destroy the answer before the
# client reads it. So keep reading and dropping until the client has been quiet
# for LINGER_QUIET seconds (LINGER_MAX at most), then close.
LINGER_QUIET = 0.25
LINGER_MAX = 2.0
CLOSE_GRACE = 1.0  # seconds a connection closed for a timeout or an error gets to go
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in HTTPStatus}
_NO_BODY_STATUS = frozenset((204, 304))
_INF = float("inf")
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


class Connection(RequestReader):
    """One client's connection: its requests answered in order, then closed."""

    __slots__ = (
        "app",
        "busy",
        "client",
        "client_key",
        "drain",
        "linger_start",
        "lingering",
        "loop",
        "made",
        "peer_cert",
        "shared",
        "task",
        "transport",
        "wdeadline",
        "write_paused",
    )

    def __init__(self, shared: ServerState, client: tuple[str, int]) -> None:
        super().__init__()
        self.shared = shared
        self.loop = shared.loop
        self.app = shared.app
        self.client = client
        self.client_key: str | bytes | None = None  # counted under it in shared.per_client
        self.transport: Any = None
        self.peer_cert: dict | None = None
        self.made = False
        self.deadline = _INF
        self.wdeadline = _INF
        self.busy = False
        self.dead = False
        self.keep_closing = False
        self.lingering = False
        self.linger_start = self.linger_last = 0.0
        self.write_paused = False
        self.drain: asyncio.Future | None = None
        self.task: asyncio.Task | None = None

    # asyncio callbacks -----------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        shared = self.shared
        self.transport = transport
        self.made = True
        shared.connections.add(self)
        transport.set_write_buffer_limits(high=FILE_CHUNK)
        if shared.peer_certs:
            self.peer_cert = transport.get_extra_info("peercert") or None
        self.deadline = self.loop.time() + shared.request_timeout
        if shared.closing:
            self._close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.dead = True
        self.deadline = self.wdeadline = _INF
        shared = self.shared
        shared.connections.discard(self)
        shared.count -= 1
        if self.client_key is not None:
            shared.leave(self.client_key)
        drain = self.drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        drained = shared.drained
        if drained is not None and not shared.connections and not drained.done():
            drained.set_result(None)

    def eof_received(self) -> bool | None:
        # A plain-HTTP client may half-close after its request: still answer it.
        # (Under TLS the peer's close_notify ends the connection whatever we say.)
        plain = self.shared.plain
        return True if plain and self.busy and self.state != CLOSING else None

    def pause_writing(self) -> None:
        # The client is not reading its answers: read (and answer) nothing more
        # from it until it does, or the write deadline drops it.
        self.write_paused = True
        self.wdeadline = self.loop.time() + self.shared.write_timeout
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

    # Serving ---------------------------------------------------------------

    def _run_queue(self) -> None:
        queue = self.queue
        while queue and not self.busy and self.transport is not None:
            if self.write_paused:
                return  # resume_writing() comes back here; reading is paused meanwhile
            item = queue.popleft()
            if type(item) is Reject:
                self._send_reject(item)
                return
            self._call_app(item)
        if not self.busy and self.transport is not None:
            self._idle()

    def _idle(self) -> None:
        """Back to reading: the keep-alive timer, or a fresh window for a half-read request."""
        if self.held:
            self.loop.call_soon(self._feed_held)
            return
        now = self.loop.time()
        if self.state == WAIT:
            shared = self.shared
            if shared.count < shared.crowded:
                self.deadline = now + shared.keepalive_timeout
            else:
                self.deadline = now + shared.crowded_keepalive_timeout
        else:
            self.deadline = now + self.shared.request_timeout
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

    def _call_app(self, cycle: Cycle) -> None:
        self.busy = True
        self.deadline = _INF
        request = cycle.request
        try:
            coro = self.app(request)
            if type(coro) is not _CoroutineType:
                coro = _await(coro)
            yielded = coro.send(None)
        except StopIteration as stop:
            self._respond(cycle, stop.value)
            return
        except Exception:
            logger.exception("The app failed on %s %s", request.method, printable(request.path))
            self._respond(cycle, self.shared.internal_error())
            return
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        task = self.loop.create_task(_resume(coro, yielded))
        self.task = task
        task.add_done_callback(partial(self._app_done, cycle))

    def _app_done(self, cycle: Cycle, task: asyncio.Task) -> None:
        self.task = None
        if task.cancelled():
            self.abort()
            return
        exc = task.exception()
        if exc is not None:
            request = cycle.request
            logger.error(
                "The app failed on %s %s",
                request.method,
                printable(request.path),
                exc_info=exc,
            )
            response = self.shared.internal_error()
        else:
            response = task.result()
        if self.transport is None:
            return
        self._respond(cycle, response)
        if not self.busy:
            self._run_queue()

    def _respond(self, cycle: Cycle, response: Any) -> None:
        transport = self.transport
        if transport is None:
            return
        shared = self.shared
        request = cycle.request
        if shared.closing or self.keep_closing:
            cycle.keep = 0
        keep = cycle.keep
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
            logger.exception("The app's answer to %s %s", request.method, printable(request.path))
            response = shared.internal_error()
            status, file, length = 500, None, len(response.body)
            head = self._head(500, response.headers, length, keep)
        if file is None or request.method == "HEAD" or not length:
            # Counted before the write: a client that has its answer sees it counted.
            shared.requests += 1
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
            self._start_file(cycle, response, head)
            return
        self._finish(cycle, status, sent, response.log)

    def _finish(self, cycle: Cycle, status: int, sent: int, log: str) -> None:
        shared = self.shared
        if shared.access_log is not None:
            request = cycle.request
            shared.log_access(
                self.client[0], request.method, request.path, status, sent, cycle.t0, log
            )
        if cycle.keep:
            self.busy = False
        else:
            # What was written may still be on its way: write_timeout bounds it.
            self._close(grace=shared.write_timeout + CLOSE_GRACE)

    def _head(self, status: int, headers: list[tuple[str, str]], length: int | None, keep: int):
        shared = self.shared
        now = int(time.time())
        if now != shared.date_second:
            shared.date_second = now
            shared.date_line = f"Date: {formatdate(now, usegmt=True)}\r\n"
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
        return (line + shared.date_line + block + end).encode("latin-1")

    def _send_reject(self, reject: Reject) -> None:
        self.busy = True
        status = reject.status
        shared = self.shared
        body = shared.error(status, reject.message)
        head = self._head(status, [("Content-Type", "application/xml")], len(body), 0)
        self.transport.write(head + body)
        shared.rejected += 1
        if shared.access_log is not None:
            path = self.url.decode("latin-1")
            shared.log_access(
                self.client[0], self.method, path or "-", status, len(body), self.t0, reject.message
            )
        self._close(linger=True)

    # Files -------------------------------------------------------------------

    def _start_file(self, cycle: Cycle, response: Response, head: bytes) -> None:
        file = response.file
        assert file is not None
        try:
            fd = os.open(file.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                answer = self.shared.error_response(404, "The file is gone.")
            else:
                logger.error("Cannot open %s: %s", file.path, exc)
                answer = self.shared.internal_error()
            self._respond(cycle, answer)
            return
        self.shared.requests += 1
        self.transport.write(head)
        cycle.sent = 0
        task = self.loop.create_task(self._send_file(cycle, fd, file.offset, file.length))
        self.task = task
        task.add_done_callback(partial(self._file_done, cycle, response.status, response.log))

    async def _send_file(self, cycle: Cycle, fd: int, offset: int, length: int) -> None:
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
                cycle.sent += len(data)
        finally:
            os.close(fd)

    def _file_done(self, cycle: Cycle, status: int, log: str, task: asyncio.Task) -> None:
        self.task = None
        complete = not task.cancelled() and task.exception() is None and self.transport is not None
        request = cycle.request
        if not task.cancelled() and task.exception() is not None:
            logger.error("Sending %s failed", printable(request.path), exc_info=task.exception())
        if not complete:
            shared = self.shared
            if shared.access_log is not None:
                shared.log_access(
                    self.client[0],
                    request.method,
                    request.path,
                    status,
                    cycle.sent,
                    cycle.t0,
                    f"{log} aborted".strip(),
                )
            self.abort()
            return
        self._finish(cycle, status, cycle.sent, log)
        if not self.busy:
            self._run_queue()

    # Closing -----------------------------------------------------------------

    def _close(self, *, linger: bool = False, grace: float = CLOSE_GRACE) -> None:
        """Close after what was written; with linger, first drain what the client still sends."""
        self.state = CLOSING
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

    def abort(self) -> None:
        self.state = CLOSING
        self.busy = self.dead = True
        self.deadline = self.wdeadline = _INF
        if self.transport is not None:
            self.transport.abort()

    def expire(self, now: float) -> None:
        if self.wdeadline <= now:
            self.shared.timeouts += 1
            self.abort()  # the client stopped reading: nothing more will reach it
        elif self.state == CLOSING:
            self.abort()
        else:
            if self.state != WAIT:
                self.shared.timeouts += 1  # a request not received in time
            self._close()

    def shutdown(self) -> None:
        if self.state == CLOSING:
            return
        if self.busy:
            self.keep_closing = True  # answer the request in flight, then close
        else:
            self._close()
