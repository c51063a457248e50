"""The HTTPS poll server: HTTP requests in, calls of core, XML out.

parse (hardened lxml, :mod:`dynupdate.protocol`) → decide (a cached
:class:`~dynupdate.core.fleet.FleetState`) → record (a writer thread that
groups endpoint writes into short transactions) → answer. :meth:`PollApp.handle`
takes a :class:`~dynupdate.server.messages.Request` and needs no socket; the TLS and
HTTP side is :mod:`dynupdate.server`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dynupdate import fingerprints, protocol
from dynupdate.core.attempts import device_standing
from dynupdate.core.decision import (
    RATE_LIMIT_RETRY,
    Decision,
    DeviceState,
    Standing,
    decide_for_target,
    decide_rollout,
)
from dynupdate.core.errors import InvalidInput
from dynupdate.core.fleet import ActiveRollout, FleetCache, FleetState
from dynupdate.core.home import Home, home_locked, open_home
from dynupdate.core.keys import remembered_key
from dynupdate.core.registry import Sighting, StatusReport, UnknownDevice, registered_parents
from dynupdate.core.times import utc_now
from dynupdate.core.versions import at_least
from dynupdate.core.vocabulary import UPDATE_OFFERED, Reason, RolloutState
from dynupdate.core.waves import ALL, BUCKETS, bucket, covers
from dynupdate.downloads import Downloads
from dynupdate.metrics import exporting
from dynupdate.recording import EndpointWriter
from dynupdate.server import listener, logs, tls, workers
from dynupdate.server.identity import Forbidden, certificate_names, check_poll, check_report
from dynupdate.server.messages import Request, Response, error_response

if TYPE_CHECKING:
    from dynupdate.metrics.exporter import Exporter

__all__ = ["PollApp", "ServeConfig", "ServeOptions", "run_server"]

log = logging.getLogger("dynupdate.serve")

XML = ("Content-Type", "application/xml")
_ROUTES = {"/poll": ("POST",), "/report": ("POST",)}
# The standing of a device in a call or already on the rollout's version: decide_rollout
# answers those before it looks at a standing.
_UNREAD = Standing(bucket=0)
# A device no open wave covers (no bucket reaches BUCKETS): it gets the stable decision.
_NOT_COVERED = Standing(bucket=BUCKETS)
# The buckets of the serials that poll, remembered: hashing each poll's serial was the
# largest part of a running rollout's cost per poll. At most 65,536 (12 MB; 16 MB of
# 64-character serials); where more endpoints poll a worker, those it no longer
# holds are hashed again.
_bucket = functools.lru_cache(maxsize=1 << 16)(bucket)


@dataclass
class ServeOptions:
    poll_interval: int = 3600
    public_url: str | None = None  # base of package URLs (behind a proxy)
    package_url: str | None = None  # a CDN or web server with a copy of the store
    fallback_base: str = "https://localhost:8443"
    flush_interval: float = 0.2  # seconds between grouped endpoint writes
    # A client certificate speaks only for its own serial and peripherals (--bind-serial).
    bind_serial: bool = False
    clock: Callable[[], datetime] = field(default=utc_now)


def _error(status: int, code: str, message: str, *extra: tuple[str, str]) -> Response:
    return error_response(status, message, code, *extra, log=code)


# Seconds a full --max-in-flight/--max-per-hour is believed without asking the
# writer again: short, since a verified success frees a slot at any time.
LIMITED_FOR = 1.0


class PollApp:
    """The endpoint protocol over a home's database and package store."""

    def __init__(
        self, home: Home, options: ServeOptions | None = None, meter: Exporter | None = None
    ) -> None:
        self.home = home
        self.options = options or ServeOptions()
        self.meter = meter  # serve --metrics: counts answered polls and stored reports
        self._fleet = FleetCache(home.db, home.path / "dynupdate.db")
        self.writer = EndpointWriter(
            home.path / "dynupdate.db", self.options.flush_interval,
            sampled=meter.sampled if meter is not None else None,
        )  # fmt: skip
        self.downloads = Downloads(home.store, self.options, self._known)
        self._bind_serial = self.options.bind_serial
        # Per rollout id: (time.monotonic() until which, retryAt) after a reservation
        # found --max-in-flight or --max-per-hour full.
        self._limited: dict[int, tuple[float, datetime]] = {}

    def start(self) -> None:
        self.writer.start()

    def close(self) -> None:
        self.writer.stop()
        self.home.close()
        self._fleet.close()  # last: it must outlive every connection (see FleetCache)

    async def aclose(self) -> None:
        """Flush queued endpoint writes once the server has drained (called by the server)."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)
        if self.meter is not None:
            await self.meter.aclose()

    def __call__(self, request: Request) -> Coroutine[Any, Any, Response]:
        return self.handle(request)  # the coroutine itself: one frame less per request

    def fleet(self) -> FleetState:
        """The cached state, reloaded when a CLI (or anyone) changed it."""
        return self._fleet.get()

    def _known(self, sha256: str) -> bool:
        """Whether a package of the configuration has this hash (others are never served)."""
        return any(
            p.sha256 == sha256 for kind in self.fleet().types.values() for p in kind.packages
        )

    async def handle(self, request: Request) -> Response:
        if request.path.startswith("/packages/"):
            return self.downloads.answer(request)
        allowed = _ROUTES.get(request.path)
        if allowed is None:
            return _error(404, "not-found", f"No such path {request.path[:64]!r}.")
        if request.method not in allowed:
            return _error(
                405,
                "method-not-allowed",
                f"Use {', '.join(allowed)} on {request.path}.",
                ("Allow", ", ".join(allowed)),
            )
        try:
            if request.path == "/poll":
                response = self._poll(request)
                if type(response) is not Response:  # an offer that opens an attempt
                    response = await response
                return response
            return await self._report(request)
        except protocol.ProtocolError as e:
            return _error(400, e.code, e.message)

    def _poll(self, request: Request) -> Response | Coroutine[Any, Any, Response]:
        """The answer; or, when an offer opens a rollout attempt, a coroutine reserving first."""
        poll = protocol.parse_poll(request.body)
        refused: frozenset[str] = frozenset()
        if self._bind_serial:
            try:
                refused = self._refused_peripherals(request, poll)
            except Forbidden as e:
                return _error(403, Reason.FORBIDDEN, str(e))
        now = self.options.clock()
        fleet = self.fleet()
        window = fleet.window
        endpoint = poll.endpoint
        in_call, tz = endpoint.in_call, endpoint.tz
        address = request.client[0]
        answers: list = []
        sightings: list = []
        reserving: list[tuple[int, int, Any, Decision, int]] | None = None
        for device in (endpoint, *poll.peripherals):
            serial, type_, version = device.serial, device.type, device.version
            if refused and serial in refused:
                # Another endpoint's: answered on its own, recorded nowhere.
                answers.append(protocol.NoOffer(serial, type_, Reason.FORBIDDEN))
                continue
            kind = fleet.of(type_)
            rollout = kind.rollout
            state = DeviceState(serial, type_, version, in_call, tz)
            if rollout is None:
                decision = decide_for_target(kind.policy, kind.target, window, state, now)
                rollout_id = None
            else:
                decision = self._decide_in_rollout(fleet, rollout, state, endpoint.serial, now)
                rollout_id = rollout.id
                if decision.opens_attempt:
                    # Answered once its slot is taken (or refused): see _reserve_then_answer.
                    reserving = reserving or []
                    reserving.append((len(answers), len(sightings), device, decision, rollout_id))
                    answers.append(None)
                    sightings.append(None)
                    continue
            self._answer(request, fleet, device, endpoint, decision, rollout_id, address, now,
                         answers, sightings)  # fmt: skip
        if reserving is not None:
            return self._reserve_then_answer(request, poll, reserving, answers, sightings, now)
        return self._poll_answer(endpoint.serial, answers, sightings, now)

    def _answer(
        self, request, fleet: FleetState, device, endpoint, decision: Decision, rollout_id,
        address, now, answers: list, sightings: list,
    ) -> None:  # fmt: skip
        """Append the answer for one device and what its poll records."""
        serial, type_, version = device.serial, device.type, device.version
        package = decision.package
        if package is not None:
            url = self.downloads.url(request, package.sha256)
            # Offers only, once any key was imported: an indexed read, then remembered.
            key = (
                remembered_key(fleet.key_memo, self.home.db, serial, package.version)
                if fleet.keys
                else None
            )
            answers.append(
                protocol.Offer(
                    serial, type_, package.version, package.size, package.sha256,
                    package.name, url, key,
                )
            )  # fmt: skip
            offered = package.version
            told: str = UPDATE_OFFERED
        else:
            # A decision without a package always carries its reason.
            told = reason = cast(Reason, decision.reason)
            answers.append(protocol.NoOffer(serial, type_, reason, decision.retry_at))
            offered = None
        # Sighting(serial, type, version, model, mac, tz, in_call, address, parent, offered,
        # rollout, reason, retry_at)
        tz, in_call = endpoint.tz, endpoint.in_call
        if device is endpoint:
            sighting = Sighting(
                serial, type_, version, endpoint.model, endpoint.mac, tz, in_call, address,
                None, offered, rollout_id, told, decision.retry_at,
            )  # fmt: skip
        else:
            sighting = Sighting(
                serial, type_, version, None, None, tz, in_call, address, endpoint.serial,
                offered, rollout_id, told, decision.retry_at,
            )  # fmt: skip
        sightings.append((sighting, now))

    def _poll_answer(self, lead: str, answers: list, sightings: list, now: datetime) -> Response:
        self.writer.polls(sightings)
        if self.meter is not None:
            self.meter.polled(answers)
        body = protocol.poll_response(answers, self.options.poll_interval, now)
        outcome = UPDATE_OFFERED if isinstance(answers[0], protocol.Offer) else answers[0].reason
        return Response(200, [XML], body, log=f"{lead} poll {outcome}")

    def _decide_in_rollout(
        self, fleet: FleetState, rollout: ActiveRollout, state: DeviceState, lead: str,
        now: datetime,
    ) -> Decision:  # fmt: skip
        """Section 6's decision; the device's attempts are read only when V may be offered."""
        view = rollout.view
        if (
            state.in_call
            or view.state != RolloutState.RUNNING
            or at_least(state.version, view.version)
        ):
            # Answered before any standing is looked at (a rollout that does not run
            # admits nobody): no bucket to hash, nothing to read.
            return decide_rollout(view, _UNREAD, fleet.window, state, now)
        trial = fleet.trial
        in_trial = bool(trial) and (state.serial in trial or lead in trial)
        wave = view.wave
        # The bucket (a SHA-256 of the serial) only where it decides admission: not
        # for a trial device, in a trial-only wave or once the wave is 100 %, where
        # 0 admits exactly as the real bucket would.
        hashed = not in_trial and wave.share is not None and wave.share < ALL
        lead_bucket = _bucket(lead) if hashed else 0
        if not covers(wave, bucket=lead_bucket, trial=in_trial):
            return decide_rollout(view, _NOT_COVERED, fleet.window, state, now)
        _attempted, held, attempt_open = device_standing(
            self.home.db, rollout.id, state.serial, rollout.max_attempts
        )
        limited = self._limited.get(rollout.id) if rollout.limited else None
        until = limited[1] if limited and limited[0] > time.monotonic() else None
        standing = Standing(lead_bucket, in_trial, held, attempt_open, until)
        return decide_rollout(view, standing, fleet.window, state, now)

    async def _reserve_then_answer(
        self,
        request: Request,
        poll: protocol.Poll,
        reserving: list[tuple[int, int, Any, Decision, int]],
        answers: list,
        sightings: list,
        now: datetime,
    ) -> Response:
        """Take the attempts' slots through the writer (one lock: limits hold across workers)."""
        endpoint = poll.endpoint
        parent = endpoint.serial
        items = [
            (rollout_id, device.serial, None if device is endpoint else parent, device.version, now)
            for _, _, device, _, rollout_id in reserving
        ]
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def done(results: list[datetime | Exception | None]) -> None:
            loop.call_soon_threadsafe(_settle, future, results)

        self.writer.reserve(items, done)
        results = await future
        address = request.client[0]
        for (at, seen_at, device, decision, rollout_id), result in zip(
            reserving, results, strict=True
        ):
            if result is None:
                answer_decision = decision
            elif isinstance(result, datetime):
                # Full: for a moment, answer the rollout's other admitted devices without
                # asking the writer (a device that polls in a loop costs no transaction).
                self._limited[rollout_id] = (time.monotonic() + LIMITED_FOR, result)
                answer_decision = Decision(
                    reason=Reason.RATE_LIMITED, retry_at=max(result, now + RATE_LIMIT_RETRY)
                )
            else:
                # A limit is full, or the rollout stopped or the device became held since
                # the decision (or the database cannot be written): come back later.
                retry = result if isinstance(result, datetime) else now
                answer_decision = Decision(
                    reason=Reason.RATE_LIMITED, retry_at=max(retry, now + RATE_LIMIT_RETRY)
                )
            one_answer: list = []
            one_sighting: list = []
            self._answer(request, self.fleet(), device, endpoint, answer_decision, rollout_id,
                         address, now, one_answer, one_sighting)  # fmt: skip
            answers[at] = one_answer[0]
            sightings[seen_at] = one_sighting[0]
        return self._poll_answer(endpoint.serial, answers, sightings, now)

    async def _report(self, request: Request) -> Response:
        report = protocol.parse_report(request.body)
        if self._bind_serial and (denied := await self._deny_report(request, report)) is not None:
            return denied
        now = self.options.clock()
        fleet = self.fleet()
        items = [
            (StatusReport(d.serial, d.type, d.version, d.state, d.detail,
                          _rollout_id(fleet, d.type)), now)
            for d in report.devices
        ]  # fmt: skip
        error = await self._store_report(items)
        if isinstance(error, UnknownDevice):
            # The device's first poll may wait for the grouped write of another
            # worker (this worker's polls are written before its reports): once more.
            await asyncio.sleep(2 * self.options.flush_interval + 0.1)
            error = await self._store_report(items)
            if isinstance(error, UnknownDevice):
                return _error(409, protocol.UNKNOWN_DEVICE, str(error))
        if error is not None:
            return _error(
                503,
                "unavailable",
                "The report could not be stored yet; retry.",
                ("Retry-After", "5"),
            )
        if self.meter is not None:
            self.meter.reported(report.devices)
        first = report.devices[0]
        return Response(
            200, [XML], protocol.report_response(), log=f"{first.serial} report {first.state}"
        )

    async def _store_report(self, items: list[tuple[StatusReport, datetime]]) -> Exception | None:
        """Hand the report to the writer; its error once the transaction is over, or None."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def done(error: Exception | None) -> None:
            loop.call_soon_threadsafe(_settle, future, error)

        self.writer.reports(items, done)
        return await future

    # Who may speak for a device (--bind-serial) --------------------------------------------

    def _refused_peripherals(self, request: Request, poll: protocol.Poll) -> frozenset[str]:
        """The peripherals the certificate may not speak for; Forbidden for the endpoint itself."""
        names = certificate_names(request.peer_cert)
        serial = poll.endpoint.serial
        others = [p.serial for p in poll.peripherals if p.serial not in names]
        parents = registered_parents(self.home.db, others) if others and serial in names else {}
        return check_poll(names, serial, [(s, _owner(parents, s)) for s in others])

    async def _deny_report(self, request: Request, report: protocol.Report) -> Response | None:
        """403 unless every reported device is the certificate's or one of its peripherals."""
        names = certificate_names(request.peer_cert)
        others = list(dict.fromkeys(d.serial for d in report.devices if d.serial not in names))
        if not others:
            return None
        for attempt in range(2):
            parents = registered_parents(self.home.db, others)
            try:
                check_report(names, [(s, _owner(parents, s)) for s in others])
                return None
            except Forbidden as e:
                denied = _error(403, Reason.FORBIDDEN, str(e))
            if attempt or all(s in parents for s in others):
                break
            # A peripheral's first poll may still wait for its grouped write (in this
            # worker or another): a device reports right after polling. Look once more.
            await asyncio.sleep(2 * self.options.flush_interval + 0.1)
        return denied


def _rollout_id(fleet: FleetState, type_: str) -> int | None:
    rollout = fleet.of(type_).rollout
    return None if rollout is None else rollout.id


def _owner(parents: dict[str, str | None], serial: str) -> str | None:
    """Who speaks for a registered device: its parent, or itself for an endpoint."""
    if serial not in parents:
        return None  # not registered yet: a poll may claim it as its peripheral
    parent = parents[serial]
    return serial if parent is None else parent


def _settle(future: asyncio.Future[Any], result: object) -> None:
    if not future.done():
        future.set_result(result)


# ---------------------------------------------------------------------------
# Running the server: what `dynupdate serve` calls


@dataclass(frozen=True)
class ServeConfig:
    """What ``dynupdate serve`` was given; the defaults are its options' defaults."""

    host: str = "0.0.0.0"
    port: int = 8443
    cert: Path | None = None  # with key; both None: a self-signed one made in the home
    key: Path | None = None
    client_ca: Path | None = None  # mutual TLS
    bind_serial: bool = False
    poll_interval: int = 3600
    public_url: str | None = None
    package_url: str | None = None
    workers: int = 0  # 0: one per core
    max_connections: int = 10_000  # per worker, lowered to what the open-file limit allows
    max_per_client: int | None = 1_000  # None: no cap
    request_timeout: float = 30.0
    access_log: bool = True
    log_format: str = "text"  # or "json": one JSON object a line
    metrics: tuple[str, int] | None = None  # (host, port) of /metrics; None: not served


def _stderr_line(line: str) -> None:
    sys.stderr.write(line + "\n")


def run_server(
    home_path: Path | None,
    config: ServeConfig,
    *,
    say: Callable[[str], None] = _stderr_line,
    quiet: bool = False,
) -> None:
    """Serve endpoints from the home until SIGINT or SIGTERM. Blocks.

    Checks ``config`` (InvalidInput naming the bad value), holds the home's
    lock while the server and its workers run, makes the self-signed
    certificate on first use. ``say`` gets the lines for the admin: the
    certificate's fingerprint and where it serves (not with ``quiet``), and a
    lowered ``max_connections`` (always). Access and connection log lines go
    to stderr.
    """
    _check(config)
    home = open_home(home_path)
    home_path = home.path
    if home.created:
        say(f"Created a new home at {home_path}")
    # Each worker opens its own connection: none may inherit this one across fork.
    home.close()
    # Held while the server runs; the workers it forks share it (see lock_home).
    with home_locked(home_path, "serve", "stop it first, or use another --home."):
        _serve_locked(home_path, config, say, quiet)


def _check(config: ServeConfig) -> None:
    if config.bind_serial and config.client_ca is None:
        raise InvalidInput(
            "--bind-serial needs --client-ca FILE: the serial comes from the endpoint's "
            "client certificate."
        )
    for name, url in (("--public-url", config.public_url), ("--package-url", config.package_url)):
        if url is not None and not url.startswith(("https://", "http://")):
            raise InvalidInput(f"Invalid {name} '{url}': use an http(s):// URL.")
    if (config.cert is None) != (config.key is None):
        raise InvalidInput("Give both --cert and --key, or neither (a self-signed one is made).")
    if config.metrics is not None and config.metrics[1] == config.port != 0:
        raise InvalidInput(f"--metrics port {config.port} is the poll port: choose another one.")


def _serve_locked(
    home_path: Path, config: ServeConfig, say: Callable[[str], None], quiet: bool
) -> None:
    cert, key = config.cert, config.key
    if cert is None or key is None:
        cert, key = tls.ensure_self_signed(home_path)
    log_format = logs.LogFormat(config.log_format)
    note = logs.server_log(log_format, _stderr_line)
    certificate = tls.ServerCertificate(cert, key, config.client_ca, note)
    worker_count = config.workers or os.cpu_count() or 1
    host, port = config.host, config.port
    shown_host = socket.gethostname() if host in ("0.0.0.0", "::") else host
    options = ServeOptions(
        poll_interval=config.poll_interval,
        public_url=config.public_url,
        package_url=config.package_url,
        fallback_base=f"https://{shown_host}:{port}",
        bind_serial=config.bind_serial,
    )
    max_connections = config.max_connections
    files = listener.open_file_limit()
    if max_connections > files - listener.FD_RESERVE:
        lowered = max(1, files - listener.FD_RESERVE)
        # Always shown, quiet or not: the server then holds fewer devices than asked.
        say(
            f"--max-connections {max_connections} lowered to {lowered}: the limit of open "
            f"files is {files}. Raise it (ulimit -n, or LimitNOFILE= in a systemd unit) "
            "to hold more connections."
        )
        max_connections = lowered
    if not quiet:
        say(f"Certificate SHA-256 fingerprint (for --pin): {fingerprints.fingerprint(cert)}")
        if config.client_ca is not None:
            bound = "; each speaks only for its own serial" if config.bind_serial else ""
            say(f"Endpoints need a client certificate from {config.client_ca}{bound}")

    def app_factory(meter: Exporter | None = None) -> PollApp:
        app = PollApp(open_home(home_path), options, meter)
        app.start()
        return app

    def ready(addresses: list[tuple[str, int]]) -> None:
        if not quiet:
            where = ", ".join(f"https://{_url_host(h)}:{p}" for h, p in addresses)
            processes = f"{worker_count} worker" + ("s" if worker_count != 1 else "")
            say(f"Serving {where} from {home_path} ({processes})")
        sys.stderr.flush()

    with exporting(home_path, config.metrics, app_factory, say, quiet) as (factory, metering):
        workers.run(
            factory,
            host,
            port,
            certificate.context,
            workers=worker_count,
            reload_tls=certificate.reload,
            log_format=log_format,
            ready=ready,
            max_connections=max_connections,
            max_per_client=config.max_per_client,
            request_timeout=config.request_timeout,
            access_log=_stderr_line if config.access_log else None,
            connection_log=_stderr_line,
            **metering,
        )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
