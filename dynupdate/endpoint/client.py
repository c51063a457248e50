"""The endpoint's side of SPEC section 3: the protocol's requests, sent to one server.

Like real devices, an endpoint opens a new connection for every poll; the
reports and the download that follow it reuse that connection: a
:class:`ClientSession`, from :meth:`EndpointClient.session`. The documents are
built and read by :mod:`dynupdate.protocol_client`, with the server's own guard
and hardened lxml parser (no DTD, no entities, no network), so there is one
hardening to maintain. HTTP and TLS (trust by CA file, system store or pinned
fingerprint) are :mod:`dynupdate.endpoint.transport`; the download's files
:mod:`dynupdate.endpoint.files`.

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
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dynupdate import protocol, protocol_client
from dynupdate.core.errors import InvalidInput
from dynupdate.endpoint.errors import EndpointError
from dynupdate.endpoint.files import (
    FileReceiver,
    discard,
    partial_size,
    private_directory,
    read_tag,
    seal,
    storage_error,
)
from dynupdate.endpoint.transport import (
    ClientStats,
    Connections,
    Exchange,
    Target,
    Transport,
    tls_context,
)
from dynupdate.fingerprints import normalize_fingerprint
from dynupdate.protocol import Offer
from dynupdate.protocol_client import PollAnswer, poll_document, report_document

__all__ = [
    "BaseClient",
    "ClientSession",
    "ClientStats",
    "EndpointClient",
    "EndpointError",
    "Exchange",
    "PollAnswer",
    "parse_poll_response",
    "poll_document",
    "report_document",
]

_REPORT_TRIES = 3


def parse_poll_response(body: bytes) -> PollAnswer:
    """The :class:`PollAnswer` in a ``<pollResponse>``, or :class:`EndpointError` ``bad-response``.

    :func:`dynupdate.protocol_client.parse_poll_response`, its refusals in the
    endpoint's terms; unknown elements are ignored.
    """
    try:
        return protocol_client.parse_poll_response(body)
    except protocol.ProtocolError as e:
        raise EndpointError("bad-response", e.message) from None


def _http_error(what: str, status: int, body: bytes) -> EndpointError:
    message = protocol_client.error_message(body)
    shown = f" ({message})." if message else "."
    return EndpointError(f"http-{status}", f"The {what} request got HTTP {status}{shown}")


@dataclass(eq=False)
class BaseClient:
    """The protocol's requests, as :class:`EndpointClient` and :class:`ClientSession` send them.

    They differ only in the connections a request goes on: a session's own,
    kept between its requests, or (``_connections`` None) a new one each time.
    """

    url: str
    poll_url: str
    report_url: str
    transport: Transport
    _connections: Connections | None = None

    @property
    def stats(self) -> ClientStats:
        """The counters of the client and all its sessions (one object)."""
        return self.transport.stats

    def _count(self, error: EndpointError) -> EndpointError:
        return self.transport.count(error)

    # -- the protocol --------------------------------------------------------------------

    async def poll(
        self, endpoint: protocol.PollEndpoint, peripherals: Sequence[protocol.Device] = ()
    ) -> PollAnswer:
        """``POST /poll``; the parsed answer, or :class:`EndpointError`."""
        document = poll_document(endpoint, peripherals)
        status, _, body = await self.transport.call(
            "POST", self.poll_url, document, connections=self._connections
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
        status, _, _ = await self.transport.call(
            "HEAD", self.poll_url, None, connections=self._connections
        )
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
                status, headers, body = await self.transport.call(
                    "POST", self.report_url, document, connections=self._connections
                )
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
        status, headers, body = await self.transport.call(
            "HEAD", offer.url, None, connections=self._connections
        )
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
        private_directory(directory)
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
            hashed = await asyncio.get_running_loop().run_in_executor(None, seal, part, offer)
        except (EndpointError, OSError) as e:
            discard(part, tag_file)
            error = e if isinstance(e, EndpointError) else storage_error(part, e)
            raise self._count(error) from None
        final = directory / offer.sha256
        part.replace(final)  # a rename: a symlink at the final name is replaced, not followed
        if not os.path.samestat(hashed, os.lstat(final)):
            discard(final, tag_file)
            raise self._count(
                EndpointError("storage", f"{offer.name} was replaced on disk while verified.")
            )
        tag_file.unlink(missing_ok=True)
        return final

    async def _fetch(self, offer: Offer, part: Path, tag_file: Path) -> None:
        have = partial_size(part)
        tag = read_tag(tag_file) if have else ""
        if have > offer.size or (have and not tag):
            have = 0  # nothing to resume safely
        if have and have == offer.size:
            return
        headers = {}
        if have:
            headers = {"Range": f"bytes={have}-", "If-Range": tag}
        receiver = FileReceiver(part, tag_file, have, offer.size, self.stats)
        self.stats.downloads += 1
        try:
            status, _, body = await self.transport.call(
                "GET", offer.url, None, headers, receiver, self._connections
            )
        finally:
            receiver.close()
        if status == 416 and have:
            discard(part, tag_file)  # the server no longer knows our range: start over
            raise self._count(EndpointError("reset", "The resumed range was refused."))
        if status not in (200, 206):
            raise self._count(_http_error("package", status, body))


class EndpointClient(BaseClient):
    """Talks to one dynupdate server as an endpoint would; share one among many endpoints.

    ``url`` is the server's base URL (``https://host:8443``; a path prefix is
    kept, for servers behind a proxy). Trust ``cafile``, or ``pin`` the
    server certificate's SHA-256 fingerprint (hex, either case, colons
    optional), or neither for the system trust store. ``max_connections``
    bounds the connections open at once (a fleet in one process);
    ``timeout`` bounds connecting and each wait for data, in seconds.
    ``trace`` is called with an :class:`Exchange` after every request.
    Each request of the client itself goes on a connection of its own;
    :meth:`session` keeps one for a poll cycle.
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
        base = Target.parse(url, "server URL")
        if cafile is not None and pin is not None:
            raise InvalidInput("Give a CA file or a pinned fingerprint, not both.")
        pin = normalize_fingerprint(pin) if pin is not None else None
        transport = Transport(
            context=tls_context(cafile, pin is not None),
            pin=pin,
            timeout=timeout,
            max_connections=max_connections,
            trace=trace,
            user_agent=user_agent,
            stats=ClientStats(),
        )
        prefix = base.path.split("?")[0].rstrip("/")
        super().__init__(
            url.rstrip("/"),
            f"https://{base.netloc}{prefix}/poll",
            f"https://{base.netloc}{prefix}/report",
            transport,
        )

    def session(self) -> ClientSession:
        """A session of this client for one poll cycle; see :class:`ClientSession`."""
        return ClientSession(self)


class ClientSession(BaseClient):
    """A client's poll cycle: its requests share one kept connection per host.

    Use it as ``async with client.session() as link:``. The first request
    opens a connection and takes one of the client's ``max_connections``
    slots, held until the session ends however many requests follow; the
    reports and the download of the cycle reuse the connection. Leaving the
    block, or :meth:`release`, closes it and gives the slot back; the session
    may go on, and its next request opens anew.

    Shared with the client, not copied: ``stats`` (``session.stats is
    client.stats``: each request is counted once, in the client's counters),
    trust, timeout, trace and the ``max_connections`` bound. Its own: the
    connections and the slot.
    """

    _connections: Connections  # its own, never None

    def __init__(self, client: EndpointClient) -> None:
        super().__init__(
            client.url,
            client.poll_url,
            client.report_url,
            client.transport,
            client.transport.connections(),
        )
        self.client = client

    async def __aenter__(self) -> ClientSession:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.release()

    def release(self) -> None:
        """Close the session's connections and give back its slot; it may go on."""
        self._connections.close()
