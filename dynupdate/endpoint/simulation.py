"""A fleet of reference endpoints in one process, to rehearse a rollout against a server.

>>> [(s.type, s.version, s.percent) for s in parse_fleet("GroupSeries=6.2.1:70%,Trio=7.1.0")]
[('GroupSeries', '6.2.1', 70.0), ('Trio', '7.1.0', 30.0)]
>>> split_counts(10, parse_fleet("A=1:70%,B=1:30%"))
[7, 3]
>>> parse_faults("GroupSeries=6.2.2:5%", "--fail-version")
(Fault(kind='fail', type='GroupSeries', version='6.2.2', percent=5.0),)
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dynupdate.core.devices import validate_type
from dynupdate.core.durations import parse_seconds
from dynupdate.core.errors import InvalidInput
from dynupdate.core.versions import same_version, validate_version
from dynupdate.core.vocabulary import Status
from dynupdate.endpoint.client import EndpointClient
from dynupdate.endpoint.device import NOT_POLLED, Device, Endpoint
from dynupdate.endpoint.errors import EndpointError
from dynupdate.protocol import Offer

__all__ = [
    "FAULT_OPTIONS",
    "MILESTONES",
    "Fault",
    "Share",
    "Silenced",
    "Simulation",
    "build_fleet",
    "parse_fault_options",
    "parse_faults",
    "parse_fleet",
    "parse_percent",
    "parse_seconds",
    "split_counts",
]

MILESTONES = (50, 90, 100)
_PERCENT = re.compile(r"([0-9]+(?:\.[0-9]+)?)%?")
_RATE_WINDOW = 5.0  # seconds over which the live polls/s is measured
# Still to move: a run is done when no device is in one of these (silent ones aside).
_UNSETTLED = (NOT_POLLED, Status.WAITING, Status.PENDING, Status.IN_PROGRESS)
FAULT_OPTIONS = {"fail": "--fail-version", "revert": "--revert-version", "brick": "--brick-version"}


@dataclass(frozen=True)
class Share:
    """One part of a fleet: devices of ``type`` starting on ``version``, ``percent`` of them."""

    type: str
    version: str
    percent: float


@dataclass(frozen=True)
class Fault:
    """Installs of ``version`` on ``percent`` of the devices of ``type`` go wrong, by ``kind``.

    ``fail``: the install fails (reported ``failed``). ``revert``: it is
    reported ``installed``, then the device runs its old version again (its
    next poll says so). ``brick``: the device reports ``installing``, then its
    endpoint never polls or reports again (a peripheral's takes the endpoint
    with it: a simulated peripheral cannot leave its endpoint's polls).
    """

    kind: str
    type: str
    version: str
    percent: float


class Silenced(BaseException):
    """Raised by a bricked device's installer: its endpoint's task ends, sending nothing more.

    Not an :class:`Exception`, so no error handler on the way takes it for a
    failed install and reports it.
    """


def parse_percent(text: str, option: str) -> float:
    """``"30%"`` or ``"30"`` → 30.0, between 0 and 100.

    >>> parse_percent("12.5%", "--fail")
    12.5
    """
    match = _PERCENT.fullmatch(text.strip())
    value = float(match[1]) if match else -1.0
    if not 0 <= value <= 100:
        raise InvalidInput(f"Invalid {option} '{text}': give a percentage from 0% to 100%.")
    return value


def parse_fleet(text: str, option: str = "--fleet") -> tuple[Share, ...]:
    """``TYPE=VERSION[:P%],…``: parts without a share split what the others leave.

    >>> parse_fleet("Trio=7.1.0:110%")
    Traceback (most recent call last):
    ...
    dynupdate.core.errors.InvalidInput: Invalid --fleet 'Trio=7.1.0:110%': the share \
'110%' is not a percentage from 0% to 100%.
    """
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or not all(items):
        raise InvalidInput(
            f"Invalid {option} '{text}': use TYPE=VERSION[:P%],… e.g. GroupSeries=6.2.1:70%,"
            "Trio=7.1.0:30%."
        )
    parsed: list[tuple[str, str, float | None]] = []
    for item in items:
        type_, version, percent = _item(text, item, option)
        if any(t.lower() == type_.lower() and v == version for t, v, _ in parsed):
            raise InvalidInput(f"Invalid {option} '{text}': {type_}={version} is given twice.")
        parsed.append((type_, version, percent))
    given = sum(p for _, _, p in parsed if p is not None)
    open_parts = [item for item in parsed if item[2] is None]
    if given > 100.001 or (not open_parts and abs(given - 100) > 0.001):
        raise InvalidInput(f"Invalid {option} '{text}': the shares add up to {given:g}%, not 100%.")
    rest = (100 - given) / len(open_parts) if open_parts else 0.0
    return tuple(Share(t, v, p if p is not None else rest) for t, v, p in parsed)


def parse_faults(text: str, option: str) -> tuple[Fault, ...]:
    """``TYPE=VERSION:P%,…`` of ``--fail-version``, ``--revert-version`` or ``--brick-version``.

    >>> parse_faults("Trio=7.2.0", "--brick-version")
    Traceback (most recent call last):
    ...
    dynupdate.core.errors.InvalidInput: Invalid --brick-version 'Trio=7.2.0': 'Trio=7.2.0' \
needs a share, TYPE=VERSION:P%, e.g. GroupSeries=6.2.2:5%.
    """
    kind = next(k for k, name in FAULT_OPTIONS.items() if name == option)
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or not all(items):
        raise InvalidInput(
            f"Invalid {option} '{text}': use TYPE=VERSION:P%,… e.g. GroupSeries=6.2.2:5%."
        )
    faults: list[Fault] = []
    for item in items:
        type_, version, percent = _item(text, item, option)
        if percent is None:
            raise InvalidInput(
                f"Invalid {option} '{text}': {item!r} needs a share, TYPE=VERSION:P%, "
                "e.g. GroupSeries=6.2.2:5%."
            )
        if any(f.type.lower() == type_.lower() and f.version == version for f in faults):
            raise InvalidInput(f"Invalid {option} '{text}': {type_}={version} is given twice.")
        faults.append(Fault(kind, type_, version, percent))
    return tuple(faults)


def parse_fault_options(**texts: str | None) -> tuple[Fault, ...]:
    """The faults of ``fail=``, ``revert=`` and ``brick=`` (the options' texts, or None)."""
    return tuple(
        fault
        for kind, text in texts.items()
        if text is not None
        for fault in parse_faults(text, FAULT_OPTIONS[kind])
    )


def _item(text: str, item: str, option: str) -> tuple[str, str, float | None]:
    """One ``TYPE=VERSION[:P%]`` of a list option: its parts, checked."""
    type_, eq, rest = item.partition("=")
    version, colon, share = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not eq or not type_ or not version:
        raise InvalidInput(
            f"Invalid {option} '{text}': {item!r} is not TYPE=VERSION[:P%], "
            "e.g. GroupSeries=6.2.1:70%."
        )
    try:
        validate_type(type_)
        validate_version(version)
    except InvalidInput as e:
        raise InvalidInput(f"Invalid {option} '{text}': {e}") from None
    if not colon:
        return type_, version, None
    match = _PERCENT.fullmatch(share)
    percent = float(match[1]) if match else -1.0
    if not 0 <= percent <= 100:
        raise InvalidInput(
            f"Invalid {option} '{text}': the share {share!r} is not a percentage from 0% to 100%."
        )
    return type_, version, percent


def split_counts(total: int, shares: Sequence[Share]) -> list[int]:
    """``total`` split by the shares, exactly (largest remainders get the leftovers)."""
    exact = [total * s.percent / 100 for s in shares]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def build_fleet(
    count: int,
    shares: Sequence[Share],
    *,
    peripherals: int = 0,
    peripheral_shares: Sequence[Share] = (),
    in_call: float = 0.0,
    fail: float = 0.0,
    faults: Sequence[Fault] = (),
    prefix: str = "SIM",
    seed: int | None = None,
    **options,
) -> tuple[list[Endpoint], set[str]]:
    """``count`` endpoints of the shares, with ``peripherals`` each drawn from theirs.

    ``in_call`` percent of the endpoints start in a call; installs fail on
    ``fail`` percent of all devices; each :class:`Fault` strikes its share
    of the devices of its type (drawn for each fault on its own). Returns
    the endpoints and the serials of those in a call. ``options`` go to
    every :class:`Endpoint`.
    """
    rng = random.Random(seed)
    width = max(6, len(str(count)))
    kinds = [s for s, n in zip(shares, split_counts(count, shares), strict=True) for _ in range(n)]
    rng.shuffle(kinds)
    fleet = []
    for index, share in enumerate(kinds, 1):
        serial = f"{prefix}{index:0{width}d}"
        attached = []
        if peripherals:
            mix = list(peripheral_shares)
            weights = [s.percent for s in mix]
            for number in range(1, peripherals + 1):
                part = rng.choices(mix, weights)[0] if any(weights) else mix[0]
                attached.append(Device(f"{serial}-P{number}", part.type, part.version))
        fleet.append(
            Endpoint(
                serial,
                share.type,
                share.version,
                peripherals=attached,
                rng=random.Random(rng.random()),
                **options,
            )
        )
    devices = [d for e in fleet for d in e.devices]
    failing = set(rng.sample(range(len(devices)), round(len(devices) * fail / 100)))
    failing_serials = {devices[i].serial for i in failing}
    for endpoint in fleet:
        if any(d.serial in failing_serials for d in endpoint.devices):
            endpoint.installer = _failing(failing_serials, endpoint.installer)
    calling = rng.sample(fleet, round(count * in_call / 100))
    for endpoint in calling:
        endpoint.start_call()
    struck: dict[str, list[Fault]] = {}  # serial → the faults it suffers
    for fault in faults:
        kind = [d.serial for d in devices if d.type.lower() == fault.type.lower()]
        for serial in rng.sample(kind, round(len(kind) * fault.percent / 100)):
            struck.setdefault(serial, []).append(fault)
    for endpoint in fleet:
        if any(d.serial in struck for d in endpoint.devices):
            endpoint.installer = _faulty(struck, endpoint.installer)
    return fleet, {e.serial for e in calling}


def _failing(serials: set[str], installer):
    async def install(device: Device, offer: Offer, path: Path | None) -> str | None:
        if device.serial in serials:
            raise EndpointError("install", "simulated install failure")
        return await installer(device, offer, path)

    return install


_GRAVITY = {"brick": 0, "fail": 1, "revert": 2}  # a device struck twice for one version


def _faulty(struck: dict[str, list[Fault]], installer):
    async def install(device: Device, offer: Offer, path: Path | None) -> str | None:
        hits = [
            f
            for f in struck.get(device.serial, ())
            if f.type.lower() == device.type.lower() and same_version(f.version, offer.version)
        ]
        kinds = sorted((f.kind for f in hits), key=_GRAVITY.__getitem__)
        if kinds and kinds[0] == "brick":
            raise Silenced(device.serial)
        if kinds and kinds[0] == "fail":
            raise EndpointError("install", f"simulated install failure of {offer.version}")
        old = device.version
        running = await installer(device, offer, path)
        return old if kinds else running

    return install


class Simulation:
    """Runs a fleet against a server and keeps the figures a rollout is judged by.

    Status counts per device type are kept up to date on every change, so
    the times to 50/90/100 % on target are exact. "On target" means
    up-to-date among the devices that have a policy. A bricked endpoint's
    devices keep the status they had when it went silent (``silent`` counts
    them); a run is done without them.
    """

    def __init__(
        self,
        client: EndpointClient,
        fleet: Sequence[Endpoint],
        *,
        call_length: float = 60.0,
        ramp: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.client = client
        self.fleet = list(fleet)
        self.call_length = call_length
        self.ramp = ramp
        self.rng = random.Random(seed)
        self.counts: dict[str, Counter] = {}
        self.totals: Counter = Counter()
        self.devices = 0
        self.milestones: dict[int, float | None] = dict.fromkeys(MILESTONES)
        self.started: float | None = None
        self.ended: float | None = None
        self.done = asyncio.Event()
        self.silent = 0  # devices of endpoints that went silent
        self._silent_unsettled = 0  # of those, the ones left in an unsettled status
        self._samples: deque[tuple[float, int]] = deque()
        for endpoint in self.fleet:
            endpoint.on_status = self._changed
            for device in endpoint.devices:
                self.devices += 1
                self.counts.setdefault(device.type, Counter())[device.status] += 1
                self.totals[device.status] += 1

    @classmethod
    def from_options(
        cls,
        url: str,
        *,
        cafile: Path | None = None,
        pin: str | None = None,
        endpoints: int = 100,
        fleet: str,
        peripherals: int = 0,
        peripheral_fleet: str = "EagleEyeIV=1.0.0",
        in_call: str = "0%",
        call_length: str = "1m",
        fail: str = "0%",
        fail_version: str | None = None,
        revert_version: str | None = None,
        brick_version: str | None = None,
        poll_interval: str | None = None,
        download: str = "full",
        concurrency: int = 200,
        ramp: str | None = None,
        timeout: str = "30s",
        prefix: str = "SIM",
        seed: int | None = None,
        workdir: Path | None = None,
    ) -> Simulation:
        """A simulation from the options of ``dynupdate simulate``, as typed.

        Every bad value raises :class:`InvalidInput` naming the option and the value.
        Endpoints download into ``workdir/<serial>``.
        """
        client = EndpointClient(
            url,
            cafile=cafile,
            pin=pin,
            timeout=parse_seconds(timeout, "--timeout"),
            max_connections=concurrency,
        )
        shares = parse_fleet(fleet)
        extra = parse_fleet(peripheral_fleet, "--peripheral-fleet") if peripherals else ()
        interval = parse_seconds(poll_interval, "--poll-interval") if poll_interval else None
        members, _ = build_fleet(
            endpoints,
            shares,
            peripherals=peripherals,
            peripheral_shares=extra,
            in_call=parse_percent(in_call, "--in-call"),
            fail=parse_percent(fail, "--fail"),
            faults=parse_fault_options(
                fail=fail_version, revert=revert_version, brick=brick_version
            ),
            prefix=prefix,
            seed=seed,
            download=download,
            poll_interval=interval,
        )
        if workdir is not None:
            for member in members:
                member.workdir = workdir / member.serial
        return cls(
            client,
            members,
            call_length=parse_seconds(call_length, "--call-length"),
            ramp=parse_seconds(ramp, "--ramp") if ramp else 0.0,
            seed=seed,
        )

    # -- running -----------------------------------------------------------------------

    async def run(
        self,
        *,
        until_done: bool = False,
        duration: float | None = None,
        stop: asyncio.Event | None = None,
    ) -> dict:
        """Run until done (with ``until_done``), ``duration`` seconds, or ``stop``; the summary."""
        loop = asyncio.get_running_loop()
        self.started = time.monotonic()
        self._samples.append((self.started, 0))
        timers = []
        for endpoint in self.fleet:
            if endpoint.in_call:
                length = self.call_length * self.rng.uniform(0.5, 1.0)
                timers.append(loop.call_later(length, endpoint.end_call))
        tasks = [
            asyncio.create_task(
                self._keep(e, first_delay=self.rng.uniform(0, self.ramp) if self.ramp else 0)
            )
            for e in self.fleet
        ]
        waits = [asyncio.create_task((stop or asyncio.Event()).wait())]
        if until_done:
            waits.append(asyncio.create_task(self.done.wait()))
        try:
            await asyncio.wait(waits, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.ended = time.monotonic()
            for item in (*waits, *tasks):
                item.cancel()
            for timer in timers:
                timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, *waits, return_exceptions=True)
        return self.summary()

    async def _keep(self, endpoint: Endpoint, first_delay: float) -> None:
        try:
            await endpoint.run(self.client, first_delay=first_delay)
        except Silenced:
            self.silent += len(endpoint.devices)
            self._silent_unsettled += sum(d.status in _UNSETTLED for d in endpoint.devices)
            if self.is_done():
                self.done.set()

    def _changed(self, device: Device, old: str) -> None:
        counts = self.counts[device.type]
        counts[old] -= 1
        counts[device.status] += 1
        self.totals[old] -= 1
        self.totals[device.status] += 1
        percent = self.on_target_percent()
        if percent is not None:
            for milestone, at in self.milestones.items():
                if at is None and percent >= milestone:
                    self.milestones[milestone] = self.elapsed()
        if self.is_done():
            self.done.set()

    # -- figures -----------------------------------------------------------------------

    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or time.monotonic()) - self.started

    def on_target_percent(self) -> float | None:
        managed = self.devices - self.totals[Status.NO_POLICY]
        if managed <= 0:
            return None
        return 100.0 * self.totals[Status.UP_TO_DATE] / managed

    def to_update(self) -> int:
        """Devices still to move: not polled yet, waiting, pending or in progress (not silent)."""
        return sum(self.totals[status] for status in _UNSETTLED) - self._silent_unsettled

    def is_done(self) -> bool:
        """Every device has answered and is up to date, failed, held or without a policy.

        Devices ``waiting`` for their wave of a rollout are not done; those
        of an endpoint that went silent are.
        """
        return self.to_update() == 0

    def polls_per_second(self) -> float:
        """Over the last few seconds while running; over the whole run once it ended."""
        polls = self.client.stats.polls
        if self.ended is not None:
            return polls / self.elapsed() if self.elapsed() > 0 else 0.0
        now = time.monotonic()
        self._samples.append((now, polls))
        while len(self._samples) > 2 and self._samples[1][0] < now - _RATE_WINDOW:
            self._samples.popleft()
        then, before = self._samples[0]
        return (polls - before) / (now - then) if now > then else 0.0

    def types(self) -> list[dict]:
        """Per device type: ``devices``, ``not_polled`` and ``counts`` keyed by status value."""
        rows = []
        for name in sorted(self.counts, key=str.lower):
            counts = self.counts[name]
            rows.append(
                {
                    "type": name,
                    "devices": sum(counts.values()),
                    "not_polled": counts[NOT_POLLED],
                    "counts": {status.value: counts[status] for status in Status},
                }
            )
        return rows

    def summary(self) -> dict:
        """The figures as one JSON-ready object (snake_case keys, seconds, bytes)."""
        stats = self.client.stats
        elapsed = self.elapsed()
        percent = self.on_target_percent()
        return {
            "url": self.client.url,
            "endpoints": len(self.fleet),
            "devices": self.devices,
            "elapsed_seconds": round(elapsed, 3),
            "done": self.is_done(),
            "on_target_percent": round(percent, 1) if percent is not None else None,
            **{
                f"time_to_{m}_percent": round(at, 3) if at is not None else None
                for m, at in self.milestones.items()
            },
            "polls": stats.polls,
            "polls_per_second": round(stats.polls / elapsed, 1) if elapsed > 0 else 0.0,
            "requests": stats.requests,
            "connections": stats.connections,
            "reports": stats.reports,
            "downloads": stats.downloads,
            "heads": stats.heads,
            "bytes_downloaded": stats.bytes_downloaded,
            "errors": dict(sorted(stats.errors.items())),
            "error_count": sum(stats.errors.values()),
            "not_polled": self.totals[NOT_POLLED],
            "silent": self.silent,
            "to_update": self.to_update(),
            "counts": {status.value: self.totals[status] for status in Status},
            "types": self.types(),
        }
