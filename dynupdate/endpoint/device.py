"""The reference endpoint: what a device does with the protocol, step by step.

An :class:`Endpoint` polls with its peripherals, waits ``pollInterval`` (or
until ``retryAt``, whichever comes first) with its own jitter, never polls
while in a call and polls as soon as the call ends. For every ``<update>`` it
reports ``downloading``, downloads (resuming) and verifies the package,
reports ``installing``, installs (after the call, if one started meanwhile)
and reports ``installed`` with the new version, or ``failed`` with a detail.
During a staged rollout it is told ``staged`` (its wave is not open: status
``waiting``), ``held`` (its attempts are used up) or ``rate-limited`` (come
back at ``retryAt``, not before).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import tempfile
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dynupdate import protocol
from dynupdate.core.vocabulary import Reason, ReportState, Status
from dynupdate.endpoint.client import ClientSession, EndpointClient
from dynupdate.endpoint.errors import EndpointError
from dynupdate.protocol import NoOffer, Offer
from dynupdate.protocol_client import DEFAULT_POLL_INTERVAL, PollAnswer

__all__ = ["DOWNLOAD_MODES", "NOT_POLLED", "STATUSES", "Device", "Endpoint", "Installer"]

# Only the device knows it has had no answer yet; the rest are the server's words.
NOT_POLLED = "not-polled"
STATUSES = (NOT_POLLED, *Status)
DOWNLOAD_MODES = ("full", "head")


@dataclass(eq=False)
class Device:
    """One device as the endpoint sees it: itself or a peripheral.

    ``status`` is one of :data:`STATUSES`; ``target`` the version last
    offered; ``detail`` why the last update failed.
    """

    serial: str
    type: str
    version: str
    status: str = NOT_POLLED
    target: str | None = None
    detail: str | None = None


Installer = Callable[[Device, Offer, Path | None], Awaitable[str | None]]
"""Installs a verified package (``None`` with ``download="head"``); raises to fail.

The path is the very file that was hashed, read-only (0400), in the private
work directory: no other user can change or replace it after verification.
It returns the version the device runs afterwards, or ``None`` for the
offered one: a device whose new image fails to boot and falls back to the
old one returns the old version. The install is reported ``installed``
either way (it was); the next poll tells the server the version it runs.
"""


async def _no_install(device: Device, offer: Offer, path: Path | None) -> str | None:
    return None


class Endpoint:
    """A device that polls a dynupdate server and updates itself and its peripherals.

    ``download`` is ``"full"`` (fetch and verify every byte into ``workdir``)
    or ``"head"`` (check the size and hash headers only, for rehearsals at
    scale). ``workdir`` is made private (0700); by default it is a new
    ``tempfile.mkdtemp()`` directory, removed with the endpoint, so a download
    resumes across polls but not across restarts: give a directory of the
    device's own to keep partial downloads. ``poll_interval`` overrides the
    server's ``pollInterval`` (seconds); ``jitter`` spreads each wait by ±
    that share. An update that failed ``max_attempts`` times (a bad size or
    hash, or the install; not the network) is not tried again until the
    server offers another package.
    ``on_status(device, old_status)`` is called on every change of a
    device's status.
    """

    def __init__(
        self,
        serial: str,
        type: str,
        version: str,
        *,
        peripherals: Sequence[Device] = (),
        model: str | None = None,
        mac: str | None = None,
        tz: str | None = None,
        download: str = "full",
        workdir: Path | None = None,
        installer: Installer | None = None,
        poll_interval: float | None = None,
        jitter: float = 0.1,
        max_attempts: int = 3,
        rng: random.Random | None = None,
        on_status: Callable[[Device, str], None] | None = None,
    ) -> None:
        if download not in DOWNLOAD_MODES:
            raise ValueError(f"download must be one of {DOWNLOAD_MODES}, not {download!r}")
        self.device = Device(serial, type, version)
        self.peripherals = list(peripherals)
        self.model, self.mac, self.tz = model, mac, tz
        self.download = download
        self.workdir = workdir
        self.installer = installer or _no_install
        self.poll_interval = poll_interval
        self.jitter = jitter
        self.max_attempts = max_attempts
        self.rng = rng or random.Random()
        self.on_status = on_status
        self.last_answer: PollAnswer | None = None
        self.polls = 0
        self._server_interval = DEFAULT_POLL_INTERVAL
        self._failures: dict[tuple[str, str], int] = {}  # (serial, sha256) → failed attempts
        self._free = asyncio.Event()  # set while not in a call
        self._free.set()
        self._wake = asyncio.Event()  # a call ended, or stop()
        self._stopping = False

    @property
    def serial(self) -> str:
        return self.device.serial

    @property
    def devices(self) -> list[Device]:
        """The endpoint itself, then its peripherals, in poll order."""
        return [self.device, *self.peripherals]

    # -- calls -----------------------------------------------------------------------------

    @property
    def in_call(self) -> bool:
        return not self._free.is_set()

    def start_call(self) -> None:
        """From now on no poll is sent, and no install starts, until :meth:`end_call`."""
        self._free.clear()

    def end_call(self) -> None:
        """The call is over: poll at once."""
        if not self._free.is_set():
            self._free.set()
            self._wake.set()

    def stop(self) -> None:
        """Make :meth:`run` return after the step it is in."""
        self._stopping = True
        self._wake.set()

    # -- the loop --------------------------------------------------------------------------

    async def run(self, client: EndpointClient, *, first_delay: float = 0.0) -> None:
        """Poll and update until :meth:`stop` (or cancellation)."""
        delay = first_delay
        errors = 0
        while not self._stopping:
            if delay > 0:
                await self._sleep(delay)
            if self._stopping:
                break
            if self.in_call:
                self._wake.clear()
                await self._wake.wait()  # end_call() or stop()
                delay = 0.0
                continue
            try:
                answer = await self.poll_once(client)
            except EndpointError:
                errors += 1
                delay = self._spread(min(self._interval(), 5.0 * 2 ** min(errors - 1, 10)))
                continue
            errors = 0
            delay = self._next_delay(answer)

    async def poll_once(self, client: EndpointClient) -> PollAnswer:
        """One poll and the updates it offers; the answer, or :class:`EndpointError`.

        :meth:`run` never calls it during a call; called then anyway, the poll
        says ``in-call="true"``, so the server offers nothing.
        """
        endpoint, peripherals = self._poll_message()
        self.polls += 1
        async with client.session() as link:  # one connection for the poll and what follows
            return await self._cycle(link, endpoint, peripherals)

    def _poll_message(self) -> tuple[protocol.PollEndpoint, list[protocol.Device]]:
        endpoint = protocol.PollEndpoint(
            self.device.serial,
            self.device.type,
            self.device.version,
            self.model,
            self.mac,
            self.tz,
            in_call=self.in_call,  # run() never polls in a call; a forced poll says so
        )
        return endpoint, [protocol.Device(p.serial, p.type, p.version) for p in self.peripherals]

    async def _cycle(
        self,
        link: ClientSession,
        endpoint: protocol.PollEndpoint,
        peripherals: list[protocol.Device],
    ) -> PollAnswer:
        answer = await link.poll(endpoint, peripherals)
        for device, offer in self._answered(answer):
            await self._update(link, device, offer)
        return answer

    def _answered(self, answer: PollAnswer) -> list[tuple[Device, Offer]]:
        """Take in a poll's answer: each device's status; the offers to act on, in order."""
        self.last_answer = answer
        self._server_interval = answer.poll_interval
        offers = []
        for position, device in enumerate(self.devices):
            item = answer.for_serial(device.serial)
            if item is None and position < len(answer.answers):
                item = answer.answers[position]
            if isinstance(item, Offer):
                device.target = item.version
                if self._failures.get((device.serial, item.sha256), 0) >= self.max_attempts:
                    self._set(device, Status.FAILED)  # given up on this package
                else:
                    self._set(device, Status.PENDING)
                    offers.append((device, item))
            elif isinstance(item, NoOffer):
                self._set(device, _status_of(item.reason))
                if item.reason == Reason.UP_TO_DATE:
                    device.target, device.detail = device.version, None
        return offers

    async def _update(self, client: ClientSession, device: Device, offer: Offer) -> None:
        self._set(device, Status.IN_PROGRESS)
        path = None
        try:
            await self._report(client, device, offer.version, ReportState.DOWNLOADING)
            if self.download == "head":
                await client.check(offer)
            else:
                try:
                    path = await client.download(offer, self._directory())
                except OSError as e:  # a full or read-only disk on the device's side
                    raise EndpointError(
                        "storage", f"Cannot store the package: {e.strerror or e}."
                    ) from e
            if self.in_call:  # never installs during a call; the connection is not kept
                client.release()
                await self._free.wait()
            await self._report(client, device, offer.version, ReportState.INSTALLING)
            try:
                running = await self.installer(device, offer, path)
            except EndpointError:
                raise
            except Exception as e:
                raise EndpointError("install", f"Install failed: {e}") from e
        except EndpointError as e:
            device.detail = str(e)
            if _transient(e):
                # The network, not the package: the next poll tries again, resuming
                # what was downloaded, and it does not count as a failed attempt.
                self._set(device, Status.PENDING)
                return
            failures = self._failures.get((device.serial, offer.sha256), 0) + 1
            self._failures[(device.serial, offer.sha256)] = failures
            self._set(device, Status.FAILED)
            with contextlib.suppress(EndpointError):
                await self._report(client, device, offer.version, ReportState.FAILED, str(e))
            return
        finally:
            if path is not None:
                path.unlink(missing_ok=True)
        device.version = running or offer.version
        device.detail = None
        self._failures.pop((device.serial, offer.sha256), None)
        with contextlib.suppress(EndpointError):
            # Lost, the next poll still tells the server the new version.
            await self._report(client, device, offer.version, ReportState.INSTALLED)
        # Fell back to the old image: the next poll says so, and is offered the update again.
        reverted = device.version != offer.version
        self._set(device, Status.PENDING if reverted else Status.UP_TO_DATE)

    async def _report(
        self,
        client: ClientSession,
        device: Device,
        version: str,
        state: str,
        detail: str | None = None,
    ) -> None:
        reports = [protocol.DeviceReport(device.serial, device.type, version, state, detail)]
        try:
            await client.report(reports)
        except EndpointError as e:
            if e.kind != "http-409":
                raise
            # unknown-device: the server registers devices from polls only, and does
            # not know this one (forgotten meanwhile, or a restored database). Poll
            # once to register, then report once more; a second refusal is final.
            self.polls += 1
            await client.poll(*self._poll_message())
            await client.report(reports)

    # -- timing ----------------------------------------------------------------------------

    def _interval(self, answer: PollAnswer | None = None) -> float:
        if self.poll_interval is not None:
            return self.poll_interval
        return answer.poll_interval if answer is not None else self._server_interval

    def _spread(self, seconds: float) -> float:
        return max(0.0, seconds * self.rng.uniform(1 - self.jitter, 1 + self.jitter))

    def _next_delay(self, answer: PollAnswer) -> float:
        """The poll interval with jitter, or sooner when a ``retryAt`` comes first.

        ``retryAt`` is read against the answer's ``serverTime``, so a device with
        a wrong clock still comes back at the right moment; a little jitter is
        added so devices the server spread over the same second do not all come.
        A ``rate-limited`` device comes back at its ``retryAt`` and never sooner,
        even when its poll interval is shorter: polling earlier would only be
        refused again. The many devices such a limit turns away may all be given
        the same slot, so they spread over a tenth of the wait (jitter 0.1), at
        least a minute's tenth.
        """
        interval = self._interval(answer)
        delay = self._spread(interval)
        retries = [a.retry_at for a in answer.answers if isinstance(a, NoOffer) and a.retry_at]
        if retries:
            wait = max((min(retries) - answer.server_time).total_seconds(), 0.0)
            wait += self.rng.uniform(0, self.jitter * min(interval, 60.0))
            delay = min(delay, wait)
        limited = [
            a.retry_at
            for a in answer.answers
            if isinstance(a, NoOffer) and a.reason == Reason.RATE_LIMITED and a.retry_at
        ]
        if limited:
            wait = max((min(limited) - answer.server_time).total_seconds(), 0.0)
            delay = max(delay, wait + self.rng.uniform(0, self.jitter * max(wait, 60.0)))
        return delay

    async def _sleep(self, delay: float) -> None:
        """Wait ``delay`` seconds, or less when a call ends or stop() is called."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()

    # -- helpers ---------------------------------------------------------------------------

    def _set(self, device: Device, status: str) -> None:
        old = device.status
        if old != status:
            device.status = status
            if self.on_status is not None:
                self.on_status(device, old)

    def _directory(self) -> Path:
        if self.workdir is None:
            # Private (0700) and unpredictable: a fixed path under /tmp would let another
            # local user plant a symlink there first. It goes with the endpoint.
            self.workdir = Path(tempfile.mkdtemp(prefix="dynupdate-endpoint-"))
            weakref.finalize(self, shutil.rmtree, self.workdir, ignore_errors=True)
        return self.workdir


def _transient(error: EndpointError) -> bool:
    """A failure of the way to the server (worth retrying), not of the package."""
    if error.kind in ("connect", "timeout", "reset", "tls", "pin-mismatch"):
        return True
    return error.kind.startswith("http-5")


_STATUS_OF_REASON: dict[str, Status] = {
    Reason.NO_POLICY: Status.NO_POLICY,
    Reason.UP_TO_DATE: Status.UP_TO_DATE,
    Reason.STAGED: Status.WAITING,
    Reason.HELD: Status.HELD,
}


def _status_of(reason: str) -> str:
    """What a ``<noUpdate>`` means for the device's status.

    ``pending`` for ``in-call``, ``outside-window``, ``rate-limited`` (it
    should update and has not started) and for reasons later servers add.
    """
    return _STATUS_OF_REASON.get(reason, Status.PENDING)
