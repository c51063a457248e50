"""A TLS transport on a non-blocking :class:`ssl.SSLSocket`, driven by fd readiness callbacks.

asyncio's (and uvloop's) TLS runs OpenSSL over memory BIOs: every record is
copied between the socket, the BIOs and Python objects by a state machine
written in Python (Cython in uvloop). For an update server, whose endpoints
open a new connection for each poll, that plumbing cost more than parsing,
deciding and answering the poll: measured on one core against nginx with the
same ECDSA certificate (``bench/poll_server.py``), a trivial protocol on
uvloop's TLS spent 1.4 times nginx's CPU per new connection, the same on an
``SSLSocket`` that OpenSSL reads and writes itself 1.1 to 1.2 times.

:class:`TLSTransport` implements the part of :class:`asyncio.Transport` that
:mod:`dynupdate.server.connection` uses (write with flow control, close, abort,
pause/resume reading, extra info) for a protocol with ``get_buffer`` /
``buffer_updated``. The handshake runs off the accept loop: an accepted
socket is wrapped, then driven by readiness callbacks, under a deadline.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["TLSTransport", "spoke_plain_http", "wrap_server_socket"]

_HANDSHAKE, _OPEN, _CLOSED = 0, 1, 2
_READS_PER_WAKEUP = 16  # then let other connections run
_CHUNK = 256 * 1024  # writes are cut to this, so a retried SSL_write stays bounded

_WantRead = ssl.SSLWantReadError
_WantWrite = ssl.SSLWantWriteError
_EOF = ssl.SSLEOFError
# OpenSSL's reasons for a first record that is an HTTP request line, not TLS.
_PLAIN_HTTP = frozenset(("HTTP_REQUEST", "HTTPS_PROXY_REQUEST"))


def spoke_plain_http(exc: BaseException) -> bool:
    """Whether a handshake failed on an HTTP request line sent in the clear (OpenSSL checks)."""
    return getattr(exc, "reason", None) in _PLAIN_HTTP


def wrap_server_socket(context: ssl.SSLContext, sock: socket.socket) -> tuple[Any, Any]:
    """(socket, TLS object): the server side of TLS on the connected, non-blocking ``sock``.

    ``SSLContext._wrap_socket`` gives the ``_ssl`` object that ``ssl.SSLSocket``
    itself wraps: the same OpenSSL calls without a second socket object per
    connection and the Python layers around every call (about 25 µs per
    connection, measured). It is private, so an interpreter without it gets
    the public ``SSLSocket``, whose methods used here have the same names.
    """
    wrap = getattr(context, "_wrap_socket", None)
    if wrap is None:
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return tls, tls  # the SSLSocket took over the file descriptor
    return sock, wrap(sock, True, None, owner=None, session=None)


class TLSTransport:
    """One server-side TLS connection; see the module docstring.

    ``sock`` and ``tls`` are what :func:`wrap_server_socket` returns.
    Nothing happens before :meth:`start`. ``opened(transport)`` is called when
    the handshake succeeds, just before ``protocol.connection_made``;
    ``failed(transport, exc)`` when it fails or times out (the protocol never
    hears of such a connection). ``plain_http_answer()``, when given, makes what is
    sent back, in the clear, to a client that spoke plain HTTP instead of TLS.
    """

    __slots__ = (
        "_buffer",
        "_buffered",
        "_closing",
        "_eof",
        "_failed",
        "_fd",
        "_high",
        "_loop",
        "_low",
        "_opened",
        "_plain_http_answer",
        "_protocol",
        "_protocol_paused",
        "_reader",
        "_reading_paused",
        "_sock",
        "_state",
        "_timer",
        "_tls",
        "_want_read",
        "_writer",
    )

    def __init__(
        self,
        loop: Any,
        sock: Any,
        tls: Any,
        protocol: Any,
        *,
        handshake_timeout: float,
        opened: Callable[[TLSTransport], None],
        failed: Callable[[TLSTransport, BaseException], None],
        plain_http_answer: Callable[[], bytes] | None = None,
    ) -> None:
        self._loop = loop
        self._sock = sock  # also keeps it alive: the _ssl object holds a weak reference
        self._tls = tls
        self._fd = sock.fileno()
        self._protocol = protocol
        self._opened = opened
        self._failed = failed
        self._plain_http_answer = plain_http_answer
        self._state = _HANDSHAKE
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self.set_write_buffer_limits()
        self._protocol_paused = False
        self._reading_paused = False
        self._closing = False
        self._eof = False
        self._reader = self._writer = False  # registered with the loop
        self._want_read = True  # the handshake (or a write) waits for the peer
        self._timer = loop.call_later(handshake_timeout, self._expired)

    def start(self) -> None:
        """Begin the handshake; ``opened`` or ``failed`` may be called before this returns."""
        # The ClientHello has usually arrived with the connection: try at once.
        self._handshake()

    # -- asyncio.Transport, the part a Connection uses -----------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if self._state == _CLOSED:
            return default
        if name == "peercert":
            return self._tls.getpeercert()
        if name == "ssl_object":
            return self._tls
        if name == "socket":
            return self._sock
        if name == "peername":
            return self._sock.getpeername()
        if name == "sockname":
            return self._sock.getsockname()
        if name == "cipher":
            return self._tls.cipher()
        return default

    def get_protocol(self) -> Any:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing or self._state == _CLOSED

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        self._high, self._low = high, low

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def pause_reading(self) -> None:
        if self._reading_paused or self._state != _OPEN:
            return
        self._reading_paused = True
        self._update()

    def resume_reading(self) -> None:
        if not self._reading_paused or self._state != _OPEN:
            return
        self._reading_paused = False
        self._update()
        # OpenSSL may hold decrypted bytes the socket no longer signals.
        self._loop.call_soon(self._read)

    def write(self, data: bytes) -> None:
        if self._closing or self._state != _OPEN or not data:
            return
        if self._buffer:
            self._queue(data)
        elif len(data) > _CHUNK:
            self._queue(data)
            self._want_read = False
            self._update()
        else:
            try:
                self._tls.write(data)  # all of it, or an SSLWantWriteError
                return
            except (_WantRead, _WantWrite) as want:
                # OpenSSL keeps what it wrote of it: these very bytes go again.
                self._buffer.append(data)
                self._buffered = len(data)
                self._wait(want)
            except (OSError, ValueError) as exc:
                self._close_now(exc)
                return
        if not self._protocol_paused and self._buffered > self._high:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def close(self) -> None:
        """Send what is buffered, then close_notify, then close."""
        if self._closing or self._state == _CLOSED:
            return
        self._closing = True
        if self._state == _HANDSHAKE:
            self._fail(ConnectionAbortedError("closed during the handshake"))
        elif not self._buffer:
            self._shutdown()
        else:
            self._update()

    def abort(self) -> None:
        """Close at once, dropping what is buffered."""
        if self._state == _HANDSHAKE:
            self._fail(ConnectionAbortedError("aborted during the handshake"))
        else:
            self._close_now(None)

    # -- the loop's callbacks ----------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self._tls.do_handshake()
        except (_WantRead, _WantWrite) as want:
            self._wait(want)
            return
        except (OSError, ValueError) as exc:
            self._fail(exc)
            return
        self._timer.cancel()
        self._timer = None
        self._state = _OPEN
        self._want_read = False
        self._opened(self)
        self._protocol.connection_made(self)
        if self._state == _OPEN and not self._closing:
            self._update()
            self._read()  # the request often arrives with the handshake's last flight

    def _on_readable(self) -> None:
        if self._state == _HANDSHAKE:
            self._handshake()
        elif self._buffer and self._want_read:
            self._flush()
        else:
            self._read()

    def _on_writable(self) -> None:
        if self._state == _HANDSHAKE:
            self._handshake()
        else:
            self._flush()

    def _read(self) -> None:
        protocol = self._protocol
        tls = self._tls
        for _ in range(_READS_PER_WAKEUP):
            if self._state != _OPEN or self._reading_paused or self._eof:
                return
            buffer = protocol.get_buffer(-1)
            try:
                n = tls.read(len(buffer), buffer)  # 0 after the peer's close_notify
            except _WantRead:
                return
            except _WantWrite:
                return  # renegotiation is disabled: nothing to wait for
            except _EOF:
                n = 0  # a TCP close without close_notify: the end all the same
            except (OSError, ValueError) as exc:
                self._close_now(exc)
                return
            if not n:
                self._eof = True
                self._update()
                if not protocol.eof_received():
                    self.close()
                return
            protocol.buffer_updated(n)
        if self._state == _OPEN and tls.pending():
            self._loop.call_soon(self._read)

    def _queue(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(data), _CHUNK):
            self._buffer.append(bytes(view[start : start + _CHUNK]))
        self._buffered += len(data)

    def _flush(self) -> None:
        buffer = self._buffer
        tls = self._tls
        while buffer:
            data = buffer[0]
            try:
                tls.write(data)  # the same bytes again after a want: OpenSSL requires it
            except (_WantRead, _WantWrite) as want:
                self._wait(want)
                return
            except (OSError, ValueError) as exc:
                self._close_now(exc)
                return
            buffer.popleft()
            self._buffered -= len(data)
            if self._protocol_paused and self._buffered <= self._low:
                self._protocol_paused = False
                self._protocol.resume_writing()
                if self._state != _OPEN:
                    return
        self._want_read = False
        if self._closing:
            self._shutdown()
        else:
            self._update()

    def _wait(self, want: ssl.SSLError) -> None:
        """OpenSSL needs the socket readable (or writable) before it can go on."""
        self._want_read = isinstance(want, _WantRead)
        self._update()

    def _update(self) -> None:
        """Register for exactly the readiness this connection waits for."""
        state = self._state
        if state == _HANDSHAKE:
            reader, writer = self._want_read, not self._want_read
        elif state == _OPEN:
            if self._buffer:
                reader, writer = self._want_read, not self._want_read
            else:
                reader, writer = False, False
            if not (self._reading_paused or self._eof or self._closing):
                reader = True
        else:
            reader = writer = False
        loop, fd = self._loop, self._fd
        if reader != self._reader:
            self._reader = reader
            if reader:
                loop.add_reader(fd, self._on_readable)
            else:
                loop.remove_reader(fd)
        if writer != self._writer:
            self._writer = writer
            if writer:
                loop.add_writer(fd, self._on_writable)
            else:
                loop.remove_writer(fd)

    def _expired(self) -> None:
        self._timer = None
        if self._state == _HANDSHAKE:
            self._fail(TimeoutError("TLS handshake timed out"))

    # -- ending --------------------------------------------------------------------------------

    def _release(self) -> None:
        self._state = _CLOSED
        self._update()
        self._buffer.clear()
        self._buffered = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._sock.close()

    def _fail(self, exc: BaseException) -> None:
        if self._state != _HANDSHAKE:
            return
        if self._plain_http_answer is not None and spoke_plain_http(exc):
            self._answer_plain_http()
        self._release()
        self._failed(self, exc)

    def _answer_plain_http(self) -> None:
        sock = self._sock
        if isinstance(sock, ssl.SSLSocket):
            return  # the public fallback: it cannot send bytes in the clear
        with contextlib.suppress(OSError):
            # Read what the client sent first (a little): a close with unread
            # bytes resets the connection, which can destroy the answer.
            for _ in range(4):
                if not sock.recv(65536):
                    break
        with contextlib.suppress(OSError):
            sock.send(self._plain_http_answer())  # type: ignore[misc]

    def _shutdown(self) -> None:
        # close_notify, without waiting for the peer's: the answer is complete either way.
        tls = self._tls
        with contextlib.suppress(OSError, ValueError):
            tls.unwrap() if isinstance(tls, ssl.SSLSocket) else tls.shutdown()
        self._close_now(None)

    def _close_now(self, exc: BaseException | None) -> None:
        if self._state != _OPEN:
            return
        self._closing = True
        self._release()
        self._loop.call_soon(self._protocol.connection_lost, exc)
