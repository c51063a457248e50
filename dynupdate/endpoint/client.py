"""The endpoint's side of SPEC section 3: HTTP/1.1 over TLS.

Like real devices, an endpoint opens a new connection for every poll; the
reports and the download that follow it reuse that connection
(:meth:`EndpointClient.session`). Responses are parsed with ``httptools``
(never by hand); the documents are built and read by
:mod:`dynupdate.protocol_client`, with the server's own guard and hardened
lxml parser (no DTD, no entities, no network), so there is one hardening to
maintain.

The server is trusted by a CA file, by the system's trust store, or by a
pinned certificate: the SHA-256 of its DER bytes, which ``dynupdate serve``
prints. A pinned connection skips chain and hostname checks and compares the
fingerprint right after the handshake, before a byte of the request is sent.

>>> client = EndpointClient("https://127.0.0.1:8443", pin="AB:" * 31 + "CD")
>>> client.poll_url
'https://127.0.0.1:8443/poll'
>>> EndpointClient("ftp://example.com")
Traceback (most recent call last):
...
dynupdate.core.errors.InvalidInput: Invalid server URL 'ftp://example.com': use https://HOST[:PORT].
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import os
import re
import ssl
import stat
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import SplitResult, urlsplit

import httptools

from dynupdate import protocol, protocol_client
from dynupdate.core.errors import DynupdateError, InvalidInput
from dynupdate.protocol import Offer
from dynupdate.protocol_client import (
    PollAnswer,
    poll_document,
    report_document,
)
from dynupdate.tls import normalize_fingerprint

__all__ = [
    "ClientStats",
    "EndpointClient",
    "EndpointError",
    "Exchange",
    "PollAnswer",
    "parse_poll_response",
    "poll_document",
    "report_document",
]

MAX_ANSWER = 1 << 20  # bytes of an XML answer
MAX_HEAD = 64 * 1024  # bytes of a response's status line and headers
_READ = 256 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_REPORT_TRIES = 3


class EndpointError(DynupdateError):
    """A request or an update step that failed; ``kind`` names the failure for counting.

    Kinds: ``connect``, ``timeout``, ``tls``, ``pin-mismatch``, ``reset`` (the
    connection ended early), ``bad-response``, ``http-<status>``, ``too-large``
    (more bytes than announced), ``size-mismatch``, ``sha256-mismatch``,
    ``storage`` (the device's disk), ``install``.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


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


def parse_poll_response(body: bytes) -> PollAnswer:
    """The :class:`PollAnswer` in a ``<pollResponse>``, or :class:`EndpointError` ``bad-response``.

    :func:`dynupdate.protocol_client.parse_poll_response`, its refusals in the
    endpoint's terms; unknown elements are ignored.
    """
    try:
        return protocol_client.parse_poll_response(body)
    except protocol.ProtocolError as e:
        raise EndpointError("bad-response", e.message) from None


# -- HTTP ---------------------------------------------------------------------------------


class _Receiver:
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

    def __init__(self, receiver: _Receiver, head_only: bool) -> None:
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
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.receiver.begin(self.status, self.headers)
        if self.head_only:
            self.complete = True  # a HEAD answer has no body, whatever Content-Length says

    def on_body(self, body: bytes) -> None:
        self.received += len(body)
        self.receiver.write(body)

    def on_message_complete(self) -> None:
        self.complete = True


@dataclass(frozen=True, slots=True)
class _Target:
    host: str
    port: int
    netloc: str
    path: str  # with the query, as sent on the request line

    @classmethod
    def parse(cls, url: str, what: str) -> _Target:
        try:
            parts: SplitResult = urlsplit(url)
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


class EndpointClient:
    """Talks to one dynupdate server as an endpoint would; share one among many endpoints.

    ``url`` is the server's base URL (``https://host:8443``; a path prefix is
    kept, for servers behind a proxy). Trust ``cafile``, or ``pin`` the
    server certificate's SHA-256 fingerprint (hex, either case, colons
    optional), or neither for the system trust store. ``max_connections``
    bounds the connections open at once (a fleet in one process);
    ``timeout`` bounds connecting and each wait for data, in seconds.
    ``trace`` is called with an :class:`Exchange` after every request.
    """

    def __init__(
        self,
        url: str,
        *,
        cafile: str | Path | None = None,
        pin: str | None = None,
        timeout: float = 30.0,
        max_connections: int | None = None,
        trace: Callable[[Exchange], None] | None = None,
        user_agent: str = "dynupdate-endpoint/1",
    ) -> None:
        base = _Target.parse(url, "server URL")
        if cafile is not None and pin is not None:
            raise InvalidInput("Give a CA file or a pinned fingerprint, not both.")
        self.url = url.rstrip("/")
        prefix = base.path.split("?")[0].rstrip("/")
        self.poll_url = f"https://{base.netloc}{prefix}/poll"
        self.report_url = f"https://{base.netloc}{prefix}/report"
        self.pin = normalize_fingerprint(pin) if pin is not None else None
        self.context = _context(cafile, self.pin is not None)
        self.timeout = timeout
        self.trace = trace
        self.user_agent = user_agent
        self.stats = ClientStats()
        self._slots = asyncio.Semaphore(max_connections) if max_connections else None
        self._links: dict | None = None  # a session's open connections by (host, port)
        self._held = False  # a session holds one of the connection slots

    # -- the protocol --------------------------------------------------------------------

    async def poll(
        self, endpoint: protocol.PollEndpoint, peripherals: Sequence[protocol.Device] = ()
    ) -> PollAnswer:
        """``POST /poll``; the parsed answer, or :class:`EndpointError`."""
        status, _, body = await self._call(
            "POST", self.poll_url, poll_document(endpoint, peripherals)
        )
        self.stats.polls += 1  # answered: not while queued for a connection, nor lost
        if status != 200:
            raise self._count(_http_error("poll", status, body))
        try:
            return parse_poll_response(body)
        except EndpointError as e:
            raise self._count(e) from None

    async def probe(self) -> None:
        """``HEAD /poll``, which registers nothing: raises unless a dynupdate server answers.

        A wrong address, an untrusted certificate or a pin mismatch fails here,
        once, before a fleet starts.
        """
        status, _, _ = await self._call("HEAD", self.poll_url, None)
        if status != 405:
            raise self._count(
                EndpointError(
                    f"http-{status}",
                    f"{self.url} answered HTTP {status} to HEAD /poll, not 405: "
                    "is it a dynupdate server?",
                )
            )

    async def report(self, reports: Sequence[protocol.DeviceReport]) -> None:
        """``POST /report``, retried (on 503 and lost connections) until the server has it."""
        document = report_document(reports)
        for attempt in range(_REPORT_TRIES):
            self.stats.reports += 1
            try:
                status, headers, body = await self._call("POST", self.report_url, document)
            except EndpointError as e:
                if attempt + 1 == _REPORT_TRIES or e.kind in ("tls", "pin-mismatch"):
                    raise
                await asyncio.sleep(0.5 * 2**attempt)
                continue
            if status == 200:
                return
            error = self._count(_http_error("report", status, body))
            if status != 503 or attempt + 1 == _REPORT_TRIES:
                raise error
            retry = headers.get("retry-after", "1")
            await asyncio.sleep(min(int(retry), 5) if retry.isdigit() else 1)

    async def check(self, offer: Offer) -> None:
        """``HEAD`` the package: its size and hash headers must match the offer.

        The hash header is the ``ETag``, which the server sets to the quoted SHA-256.
        """
        self.stats.heads += 1
        status, headers, body = await self._call("HEAD", offer.url, None)
        if status != 200:
            raise self._count(_http_error("package", status, body))
        length = headers.get("content-length", "")
        if length != str(offer.size):
            raise self._count(
                EndpointError(
                    "size-mismatch",
                    f"The package is {length or 'of unknown size'} bytes; "
                    f"{offer.size} were announced.",
                )
            )
        tag = headers.get("etag", "").strip('"').lower()
        if tag != offer.sha256:
            raise self._count(
                EndpointError(
                    "sha256-mismatch", f"The package's ETag {tag[:64]!r} is not its SHA-256."
                )
            )

    async def download(self, offer: Offer, directory: Path, *, tries: int = 3) -> Path:
        """Fetch the package into ``directory``, resuming, and return the verified file.

        Bytes go to ``<sha256>.part`` (its ETag beside it in ``<sha256>.etag``);
        a later call resumes it with ``Range`` and ``If-Range``. A body longer
        than the announced size, a short one and a wrong SHA-256 raise
        :class:`EndpointError`, and what was received is deleted. A lost
        connection is resumed at once, up to ``tries`` requests in all; the
        partial file is kept when they run out, for the next attempt.

        ``directory`` is made 0700 (created so, or its group and other write
        bits removed; one owned by another user is refused), files are
        created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and reopened with
        ``O_NOFOLLOW``, so a symlink or hard link planted at a file's name is
        replaced, never written through. The file returned is the one whose
        bytes were hashed, through one descriptor, after it was made
        read-only (0400): only the device user can change it.
        """
        _private_directory(directory)
        part = directory / f"{offer.sha256}.part"
        tag_file = directory / f"{offer.sha256}.etag"
        for attempt in range(tries):
            try:
                await self._fetch(offer, part, tag_file)
                break
            except EndpointError as e:
                # What was received stays for the next attempt unless it was refused
                # (the receiver deletes it then).
                if e.kind in ("reset", "timeout") and attempt + 1 < tries:
                    continue
                raise
        try:
            hashed = await asyncio.get_running_loop().run_in_executor(None, _seal, part, offer)
        except (EndpointError, OSError) as e:
            _discard(part, tag_file)
            error = e if isinstance(e, EndpointError) else _storage_error(part, e)
            raise self._count(error) from None
        final = directory / offer.sha256
        part.replace(final)  # a rename: a symlink at the final name is replaced, not followed
        if not os.path.samestat(hashed, os.lstat(final)):
            _discard(final, tag_file)
            raise self._count(
                EndpointError("storage", f"{offer.name} was replaced on disk while verified.")
            )
        tag_file.unlink(missing_ok=True)
        return final

    async def _fetch(self, offer: Offer, part: Path, tag_file: Path) -> None:
        have = _partial_size(part)
        tag = _read_tag(tag_file) if have else ""
        if have > offer.size or (have and not tag):
            have = 0  # nothing to resume safely
        if have and have == offer.size:
            return
        headers = {}
        if have:
            headers = {"Range": f"bytes={have}-", "If-Range": tag}
        receiver = _FileReceiver(part, tag_file, have, offer.size, self.stats)
        self.stats.downloads += 1
        try:
            status, _, body = await self._call("GET", offer.url, None, headers, receiver)
        finally:
            receiver.close()
        if status == 416 and have:
            _discard(part, tag_file)  # the server no longer knows our range: start over
            raise self._count(EndpointError("reset", "The resumed range was refused."))
        if status not in (200, 206):
            raise self._count(_http_error("package", status, body))

    # -- the transport -------------------------------------------------------------------

    def _count(self, error: EndpointError) -> EndpointError:
        self.stats.errors[error.kind] += 1
        return error

    # -- sessions ------------------------------------------------------------------------

    def session(self) -> EndpointClient:
        """This client for one poll cycle: its requests share one connection per host.

        Use it as ``async with client.session() as link:``. The first request
        opens a connection (and takes one of ``max_connections``); the
        reports and the download of the cycle reuse it; leaving the block, or
        :meth:`release`, closes it. Statistics, trust and the connection
        bound are shared with the client.
        """
        view = copy.copy(self)
        view._links = {}
        view._held = False
        return view

    async def __aenter__(self) -> EndpointClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.release()

    def release(self) -> None:
        """Close a session's connections and give back its connection slot; it may go on."""
        for reader_writer in (self._links or {}).values():
            reader_writer[1].transport.abort()
        if self._links:
            self._links.clear()
        if self._held:
            self._held = False
            self._slots.release()

    # -- the transport -------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: dict[str, str] | None = None,
        receiver: _Receiver | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        receiver = receiver if receiver is not None else _Receiver()
        try:
            target = _Target.parse(url, "URL")
        except InvalidInput as e:
            raise self._count(EndpointError("bad-response", str(e))) from None
        sent = {"Host": target.netloc, "User-Agent": self.user_agent, **(headers or {})}
        if body is not None:
            sent["Content-Type"] = "application/xml"
        response = _Response(receiver, head_only=method == "HEAD")
        error: EndpointError | None = None
        try:
            if self._links is not None:  # a session: one slot for the whole cycle
                if self._slots is not None and not self._held:
                    await self._slots.acquire()
                    self._held = True
                await self._exchange(method, target, sent, body, response)
            elif self._slots is None:
                await self._exchange(method, target, sent, body, response)
            else:
                async with self._slots:
                    await self._exchange(method, target, sent, body, response)
        except EndpointError as e:
            error = self._count(e)
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
        target: _Target,
        headers: dict[str, str],
        body: bytes | None,
        response: _Response,
    ) -> None:
        self.stats.requests += 1  # counted once it has a connection slot, not while queued
        keep = self._links is not None
        lines = [f"{method} {target.path} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines.append(f"Content-Length: {len(body or b'')}")
        if not keep:
            lines.append("Connection: close")
        request = "\r\n".join([*lines, "", ""]).encode("latin-1") + (body or b"")
        key = (target.host, target.port)
        link = self._links.pop(key, None) if keep else None
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
                if keep and response.complete and response.keep_alive:
                    self._links[key] = link
                else:
                    link[1].transport.abort()  # all was read; no TLS goodbye is needed

    async def _connect(self, target: _Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
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


class _Stale(Exception):
    """A kept connection was closed by the server before it answered: open another."""


class _FileReceiver(_Receiver):
    """A download body into ``part``: appended on 206, restarted on 200, never past ``size``."""

    def __init__(self, part: Path, tag_file: Path, have: int, size: int, stats: ClientStats):
        super().__init__()
        self.part, self.tag_file, self.stats = part, tag_file, stats
        self.have, self.size = have, size
        self.file: BinaryIO | None = None

    def begin(self, status: int, headers: dict[str, str]) -> None:
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(headers.get("content-range", ""))
            if match is None or int(match[1]) != self.have or int(match[3]) != self.size:
                _discard(self.part, self.tag_file)
                raise EndpointError(
                    "bad-response",
                    f"Asked for bytes {self.have}- of {self.size}; got "
                    f"{headers.get('content-range', 'no Content-Range')!r}.",
                )
            if not self.have:  # bytes 0- although not asked for: restart
                self.file = self._restart()
                return
            try:
                self.file = _storage(_reopen, self.part, self.have)
            except EndpointError:
                _discard(self.part, self.tag_file)
                raise
        elif status == 200:
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > self.size:
                _discard(self.part, self.tag_file)
                raise EndpointError(
                    "too-large",
                    f"The package is {length} bytes; {self.size} were announced. Refused.",
                )
            tag = headers.get("etag", "")
            if tag.startswith('"'):
                with _storage(_create, self.tag_file) as tag_out:
                    tag_out.write(tag.encode("latin-1"))
            else:
                self.tag_file.unlink(missing_ok=True)
            self.file = self._restart()
        # Any other status: an error document, kept in memory (bounded) by the base class.

    def _restart(self) -> BinaryIO:
        self.have = 0
        return _storage(_create, self.part)

    def write(self, data: bytes) -> None:
        if self.file is None:
            super().write(data)
            return
        if self.have + len(data) > self.size:
            self.close()
            _discard(self.part, self.tag_file)
            raise EndpointError(
                "too-large", f"The server sent more than the announced {self.size} bytes. Refused."
            )
        try:
            self.file.write(data)
        except OSError as e:  # a full disk: the callback's error would be a parser error
            raise _storage_error(self.part, e) from None
        self.have += len(data)
        self.stats.bytes_downloaded += len(data)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _discard(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


# -- the download's files ----------------------------------------------------------------
# The directory is private, and each file is still opened as if it were not: a name
# that is a symlink, a FIFO or a hard link to another file is never opened through.

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_EXISTING = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO does not hang us


def _private_directory(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.geteuid():
        raise EndpointError(
            "storage",
            f"The download directory '{directory}' belongs to another user (uid "
            f"{info.st_uid}); use one of the device user's own.",
        )
    if info.st_mode & 0o022:
        os.chmod(directory, 0o700)  # another user could rename the files in it


def _ours(info: os.stat_result) -> bool:
    """A regular file of this user with no other name."""
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and info.st_nlink == 1


def _create(path: Path) -> BinaryIO:
    """A new, empty file at ``path`` (0600); what had the name is removed, not followed."""
    path.unlink(missing_ok=True)
    return os.fdopen(os.open(path, _NEW, 0o600), "wb")


def _reopen(path: Path, size: int) -> BinaryIO:
    """The partial download at ``path`` to append to: ours, and ``size`` bytes long."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | _EXISTING)
    info = os.fstat(fd)
    if not _ours(info) or info.st_size != size:
        os.close(fd)
        raise EndpointError("storage", f"The partial download '{path}' changed on disk.")
    return os.fdopen(fd, "ab")


def _storage(opener: Callable[..., BinaryIO], *args) -> BinaryIO:
    try:
        return opener(*args)
    except OSError as e:
        raise _storage_error(args[0], e) from None


def _storage_error(path: Path, error: OSError) -> EndpointError:
    return EndpointError("storage", f"Cannot store the package at '{path}': {error.strerror}.")


def _partial_size(part: Path) -> int:
    """The bytes of a download to resume; 0 when there is none this device wrote."""
    try:
        info = os.lstat(part)
    except OSError:
        return 0
    return info.st_size if _ours(info) else 0


def _read_tag(tag_file: Path) -> str:
    try:
        fd = os.open(tag_file, os.O_RDONLY | _EXISTING)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as file:
        if not _ours(os.fstat(fd)):
            return ""
        return file.read(1024).decode("latin-1").strip()


def _seal(part: Path, offer: Offer) -> os.stat_result:
    """Make the finished download read-only, then check its size and hash through that descriptor.

    Returns its ``stat``: the caller checks that the name it hands on is still this file.
    """
    try:
        fd = os.open(part, os.O_RDONLY | _EXISTING)
    except OSError as e:
        raise _storage_error(part, e) from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not _ours(info):
            raise EndpointError("storage", f"The download '{part}' is not a file of its own.")
        os.fchmod(fd, 0o400)
        if info.st_size != offer.size:
            raise EndpointError(
                "size-mismatch",
                f"Received {info.st_size} bytes of {offer.name}; {offer.size} were announced.",
            )
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    if digest != offer.sha256:
        raise EndpointError(
            "sha256-mismatch",
            f"{offer.name} has SHA-256 {digest}, not the announced {offer.sha256}; deleted.",
        )
    return info


def _http_error(what: str, status: int, body: bytes) -> EndpointError:
    message = protocol_client.error_message(body)
    shown = f" ({message})." if message else "."
    return EndpointError(f"http-{status}", f"The {what} request got HTTP {status}{shown}")


def _context(cafile: str | Path | None, pinned: bool) -> ssl.SSLContext:
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
