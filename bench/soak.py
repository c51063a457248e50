"""A bounded soak of ``dynupdate serve``: polls and reports at half its peak rate, RSS flat.

What it does, in order:

1. makes a temporary home through the CLI: GroupSeries packages 6.2.2.0-100
   and 6.2.3.0-10, EagleEyeIV 1.4.0, exact policies (6.2.2.0-100, 1.4.0);
2. builds a fleet of reference endpoints (``dynupdate.endpoint``, what
   ``dynupdate simulate`` runs) on GroupSeries 6.2.1.1-600021, every other one
   with an EagleEyeIV camera on 1.3.0, downloading with ``head`` (size and
   hash headers; the soak is not bandwidth bound). A cycle is one endpoint's
   ``poll_once``: a new TLS connection, the poll, and for each offer the
   ``downloading`` report, the HEAD of the package, ``installing`` and
   ``installed`` (or ``failed``: ``--fail`` of the installs fail). To keep the
   rollout going for the whole run, ``--reset`` of the cycles first put their
   endpoint back on the old versions (a device reimaged), and every
   ``--flip`` seconds the GroupSeries policy switches between 6.2.2.0-100 and
   6.2.3.0-10 through the CLI (the server reloads it while serving);
3. peak: starts ``dynupdate serve --workers 1 --no-access-log`` (on one CPU,
   the load on another, with ``os.sched_setaffinity``, when there are two)
   and runs the cycles in closed loop (``--peak-concurrency`` at once) for
   ``--peak-seconds``; the peak is polls per second of server CPU (the
   server's capacity on one core: the load client, Python on its own core,
   may saturate first, and the figures say how busy the server was). Skipped
   with ``--rate``;
4. soak: a fresh server on the same home, cycles started at half the peak
   (open loop: at a fixed rate, whatever the answers' latency) for
   ``--minutes``; every ``--sample`` seconds the server's RSS (VmRSS of the
   process and its children) and CPU time (``/proc/<pid>/stat``) are read;
5. prints duration, polls, reports, errors by kind (client errors, non-200
   answers, anything the server wrote on stderr, a non-zero exit), the RSS at
   the start of the steady state (after ``--warmup``), at the end and its
   maximum (with its parts: heap, mapped files, shared memory), the server's
   open file descriptors and the WAL's size, the server's CPU per poll, and
   how much of both CPUs other processes took (and whether one of them moved
   the pinned processes). PASS when there was no error and the RSS stayed
   within 10 % of the start; exits 1 on FAIL.

    .venv/bin/python bench/soak.py                          # 10 minutes
    .venv/bin/python bench/soak.py --minutes 1 --rate 400   # short, no peak run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shlex
import shutil
import sqlite3
import ssl
import sys
import tempfile
import time
import traceback
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from _server import Serve, admin, cpu_times, interference, two_cores  # noqa: E402

from dynupdate.endpoint import Device, Endpoint, EndpointClient, EndpointError  # noqa: E402
from dynupdate.server.workers import loop_factory  # noqa: E402

GS, GS_OLD, GS_TARGETS = "GroupSeries", "6.2.1.1-600021", ("6.2.2.0-100", "6.2.3.0-10")
CAM, CAM_OLD, CAM_TARGET = "EagleEyeIV", "1.3.0", "1.4.0"
FLAT = 0.10  # the RSS may move this share of its start value
MIB = 1024


# -- the fleet ----------------------------------------------------------------------------


class Fleet:
    """Reference endpoints; a cycle polls one of them (reset first, ``reset`` of the time)."""

    def __init__(self, size: int, *, reset: float, fail: float, seed: int) -> None:
        self.rng = random.Random(seed)
        self.reset, self.fail = reset, fail
        self.outcomes: Counter = Counter()  # installs: installed / failed (simulated)
        self.endpoints = [self._new(index) for index in range(size)]
        self.busy: set[int] = set()
        self._next = 0

    def _new(self, index: int) -> Endpoint:
        serial = f"SOAK{index:06d}"
        cameras = [Device(f"{serial}-CAM", CAM, CAM_OLD)] if index % 2 else []
        return Endpoint(
            serial, GS, GS_OLD, peripherals=cameras, model="RealPresence Group 500",
            download="head", installer=self._install, rng=random.Random(self.rng.random()),
        )  # fmt: skip

    async def _install(self, device: Device, offer, path) -> None:
        if self.rng.random() < self.fail:
            self.outcomes["failed"] += 1
            raise EndpointError("install", "simulated install failure")
        self.outcomes["installed"] += 1

    async def cycle(self, client: EndpointClient) -> None:
        """One endpoint's poll and the updates it is offered; it is in no other cycle meanwhile."""
        index = self._next
        while index in self.busy:
            index = (index + 1) % len(self.endpoints)
        self._next = (index + 1) % len(self.endpoints)
        if self.rng.random() < self.reset:
            self.endpoints[index] = self._new(index)  # reimaged: on the old versions again
        self.busy.add(index)
        try:
            await self.endpoints[index].poll_once(client)
        finally:
            self.busy.discard(index)


class Load:
    """Runs cycles, closed loop or at a rate; counts answers by route and status."""

    def __init__(self, fleet: Fleet, url: str, pin: str, connections: int, max_inflight: int):
        self.fleet = fleet
        self.answers: Counter = Counter()  # (method, route, status or error kind)
        self.client = self._client(url, pin, connections)
        self.max_inflight = max_inflight
        self.inflight = 0
        self.cycles = 0
        self.skipped = 0  # starts not made: max_inflight cycles were waiting already
        self.unexpected: Counter = Counter()
        self.retired: Counter = Counter()  # errors of clients used before point_at
        self.first_traceback = ""
        self.latency = array("d")
        self.lag = 0.0  # the longest the pacing loop woke late, seconds (reset by the sampler)
        self._tasks: set[asyncio.Task] = set()

    def _client(self, url: str, pin: str, connections: int) -> EndpointClient:
        def trace(exchange) -> None:
            route = exchange.url.rsplit("/", 1)[-1]
            route = route if route in ("poll", "report") else "package"
            self.answers[exchange.method, route, exchange.error or exchange.status] += 1

        return EndpointClient(url, pin=pin, timeout=30, max_connections=connections, trace=trace)

    def point_at(self, url: str, pin: str, connections: int) -> None:
        """Another server (the same home): a new client, the counters go on."""
        self.retired.update(self.client.stats.errors)
        self.client = self._client(url, pin, connections)

    async def _one(self) -> None:
        self.inflight += 1
        started = time.perf_counter()
        try:
            await self.fleet.cycle(self.client)
        except EndpointError:
            pass  # counted by the client (stats.errors) and the trace
        except Exception as e:
            self.unexpected[f"client-{type(e).__name__}"] += 1
            self.first_traceback = self.first_traceback or traceback.format_exc()
        else:
            self.latency.append(time.perf_counter() - started)
        finally:
            self.inflight -= 1
            self.cycles += 1

    def start_one(self) -> None:
        if self.inflight >= self.max_inflight:
            self.skipped += 1
            return
        task = asyncio.create_task(self._one())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def closed(self, concurrency: int, seconds: float, cycles: int | None = None) -> None:
        """``concurrency`` cycles at once, for ``seconds`` or until ``cycles`` more were run."""
        end = time.monotonic() + seconds
        last = self.cycles + cycles if cycles is not None else None

        async def worker() -> None:
            while time.monotonic() < end and (last is None or self.cycles < last):
                await self._one()

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def paced(self, rate: float, seconds: float) -> None:
        """Start ``rate`` cycles a second (evenly, in 5 ms steps) for ``seconds``."""
        loop = asyncio.get_running_loop()
        begin = loop.time()
        started = 0
        while (elapsed := loop.time() - begin) < seconds:
            due = int(elapsed * rate) - started
            for _ in range(due):
                self.start_one()
            started += due
            asleep = loop.time()
            await asyncio.sleep(0.005)
            # How late this process's event loop wakes: a slow load client, not a slow server.
            self.lag = max(self.lag, loop.time() - asleep - 0.005)

    async def drain(self, timeout: float = 60) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
                self.unexpected["client-cycle-hung"] += 1

    def errors(self) -> Counter:
        """Every error so far by kind: the client's, and answers that were not 200."""
        found = Counter(self.retired)
        found.update(self.client.stats.errors)
        found.update(self.unexpected)
        return found


# -- measuring ----------------------------------------------------------------------------


@dataclass
class Sample:
    at: float  # seconds since the soak started
    rss: dict[str, int]  # KiB: VmRSS, RssAnon, RssFile, RssShmem
    fds: int  # the server's open file descriptors
    wal: int  # bytes in the database's -wal file
    cpu: float  # server CPU seconds
    polls: int
    reports: int  # acknowledged (200)
    requests: int
    own_cpu: float  # this process's CPU seconds
    core: list[int]  # /proc/stat of the server's CPU (all CPUs when not pinned)
    client_core: list[int]  # and of the load client's


def sample(args, server: Serve, load: Load, began: float, base: Counter, cores: tuple) -> Sample:
    answers = load.answers
    wal = args.home / "dynupdate.db-wal"
    polls = sum(n for (m, r, _), n in answers.items() if r == "poll") - base["polls"]
    reports = answers["POST", "report", 200] - base["reports"]
    return Sample(
        time.monotonic() - began, server.rss_parts(), server.open_fds(),
        wal.stat().st_size if wal.exists() else 0, server.cpu_seconds(), polls, reports,
        sum(answers.values()) - base["requests"], time.process_time(), cpu_times(cores[0]),
        cpu_times(cores[1]),
    )  # fmt: skip


def busy_elsewhere(a: Sample, b: Sample, *, pinned: bool) -> tuple[float, float, float]:
    """(others, steal, others on the client's CPU) between two samples: the shares of CPU
    time other processes used (all CPUs, and the same figure twice, when not pinned)."""
    if not pinned:
        others, steal = interference(a.core, b.core, b.cpu - a.cpu + b.own_cpu - a.own_cpu)
        return others, steal, others
    others, steal = interference(a.core, b.core, b.cpu - a.cpu)
    client, _ = interference(a.client_core, b.client_core, b.own_cpu - a.own_cpu)
    return others, steal, client


def placement(server: Serve, cores: tuple) -> str:
    """What another process changed in the pinning (``taskset -p`` on everything), or ""."""
    moved = []
    for name, pid, core in (("server", server.process.pid, cores[0]), ("load", 0, cores[1])):
        if core is not None:
            with contextlib.suppress(OSError):
                allowed = sorted(os.sched_getaffinity(pid))
                if allowed != [core]:
                    moved.append(f"the {name} may now run on CPU {allowed}, not {core}")
    return "; ".join(moved) + (" (changed by another process)" if moved else "")


async def soak_phase(args, server: Serve, load: Load, rate: float, cores: tuple) -> list[Sample]:
    answers = load.answers
    base = Counter(
        polls=sum(n for (_, r, _), n in answers.items() if r == "poll"),
        reports=answers["POST", "report", 200],
        requests=sum(answers.values()),
    )
    seconds = args.minutes * 60
    began = time.monotonic()
    samples = [sample(args, server, load, began, base, cores)]
    stop = asyncio.Event()

    async def sampler() -> None:
        shown, latency_seen = samples[0], len(load.latency)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.sample)
            if server.process.poll() is not None:
                load.unexpected["server-exited"] += 1
                stop.set()
                return
            s = sample(args, server, load, began, base, cores)
            samples.append(s)
            moved = placement(server, cores)
            if moved and moved not in args.moved:
                args.moved.append(moved)
                print(f"  {s.at:5.0f} s  note: {moved}", file=sys.stderr, flush=True)
            if s.at - shown.at >= args.progress or stop.is_set():
                span = max(s.at - shown.at, 1e-9)
                recent = load.latency[latency_seen:]
                others, steal, client = busy_elsewhere(shown, s, pinned=cores[1] is not None)
                print(
                    f"  {s.at:5.0f} s  {(s.polls - shown.polls) / span:6.0f} polls/s"
                    f"  {(s.reports - shown.reports) / span:6.0f} reports/s"
                    f"  server CPU {(s.cpu - shown.cpu) / span:4.0%}"
                    f"  RSS {s.rss['VmRSS'] / MIB:6.1f} MiB  fds {s.fds}"
                    f"  WAL {s.wal / 2**20:.1f} MiB"
                    f"  errors {sum(load.errors().values())}"
                    f"  in flight {load.inflight:4d}  cycle p50 {percentile(recent, 0.5):.3f} s"
                    f" p99 {percentile(recent, 0.99):.3f} s  client lag {load.lag * 1e3:.0f} ms"
                    + (
                        f"  others on the server's CPU {others:.0%} (steal {steal:.0%}),"
                        f" on the client's {client:.0%}"
                        if cores[1] is not None
                        else f"  others on the CPUs {others:.0%} (steal {steal:.0%})"
                    ),
                    file=sys.stderr,
                    flush=True,
                )
                shown, latency_seen = s, len(load.latency)
                load.lag = 0.0

    async def flipper() -> None:
        target = 0
        while args.flip:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.flip)
            if stop.is_set():
                return
            target = 1 - target
            version = GS_TARGETS[target]
            await asyncio.to_thread(admin, args.home, "policy", "set", GS, "--version", version)
            args.flips += 1

    tasks = [asyncio.create_task(sampler()), asyncio.create_task(flipper())]
    try:
        await load.paced(rate, seconds)
        await load.drain()
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return samples


def measure_peak(args, server: Serve, load: Load) -> tuple[float, str]:
    """Polls per second of server CPU in a closed-loop run, and a line describing it."""

    async def run() -> tuple[int, float, float]:
        # Warm-up: every endpoint polls once (first sightings are inserts), at most a minute.
        await load.closed(args.peak_concurrency, 60, cycles=args.endpoints)
        polls0 = load.client.stats.polls
        cpu0, wall0 = server.cpu_seconds(), time.monotonic()
        await load.closed(args.peak_concurrency, args.peak_seconds)
        return (
            load.client.stats.polls - polls0,
            server.cpu_seconds() - cpu0,
            time.monotonic() - wall0,
        )

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        polls, cpu, wall = runner.run(run())
    peak = polls / cpu if cpu else 0.0
    line = (
        f"peak (closed loop, {args.peak_concurrency} cycles at once, {args.peak_seconds:g} s): "
        f"{polls / wall:.0f} polls/s measured, server CPU busy {cpu / wall:.0%}, "
        f"{cpu / max(polls, 1) * 1e3:.3f} ms server CPU per poll → peak {peak:.0f} polls/s"
    )
    if cpu / wall < 0.9:
        line += " (the load client saturated first: the peak is polls per server CPU second)"
    return peak, line


# -- the bench ----------------------------------------------------------------------------


def set_up(home: Path, work: Path) -> None:
    for type_, version in [(GS, v) for v in GS_TARGETS] + [(CAM, CAM_TARGET)]:
        path = work / f"{type_}-{version}.pup"
        path.write_bytes(os.urandom(64 * 1024))
        admin(home, "package", "add", str(path), "--type", type_, "--version", version)
    admin(home, "policy", "set", GS, "--version", GS_TARGETS[0], "--exact")
    admin(home, "policy", "set", CAM, "--version", CAM_TARGET, "--exact")


def percentile(values, share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10, help="length of the soak")
    parser.add_argument("--rate", type=float, help="polls/s (default: half the measured peak)")
    parser.add_argument("--endpoints", type=int, default=4000, help="fleet size")
    parser.add_argument("--reset", type=float, default=50, help="%% of cycles that reset first")
    parser.add_argument("--fail", type=float, default=5, help="%% of installs that fail")
    parser.add_argument("--flip", type=float, default=60, help="seconds between policy flips")
    parser.add_argument("--sample", type=float, default=5, help="seconds between RSS samples")
    parser.add_argument("--warmup", type=float, help="seconds before the steady state")
    parser.add_argument("--progress", type=float, default=60, help="seconds between lines")
    parser.add_argument("--peak-seconds", type=float, default=20)
    parser.add_argument("--peak-concurrency", type=int, default=64)
    parser.add_argument("--connections", type=int, default=64, help="open at once during the soak")
    parser.add_argument("--no-pin", action="store_true", help="pin neither server nor load")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home")
    args = parser.parse_args()
    args.flips = 0
    args.moved = []  # changes of the pinning made by others while it ran
    seconds = args.minutes * 60
    warmup = args.warmup if args.warmup is not None else min(60.0, max(15.0, seconds / 6))
    if seconds <= warmup + 2 * args.sample:
        raise SystemExit(f"--minutes {args.minutes:g} leaves no steady state after the warm-up")

    sys.stdout.reconfigure(line_buffering=True)  # figures and progress (stderr) in order
    server_core, client_core = (None, None) if args.no_pin else two_cores()
    args.pinned = client_core is not None
    if client_core is not None:
        os.sched_setaffinity(0, {client_core})  # before any thread: they inherit it
    factory = loop_factory()
    if client_core is not None:
        where = f"server on CPU {server_core}, load on CPU {client_core}"
    else:
        where = f"nothing pinned: server and load may use CPU {sorted(os.sched_getaffinity(0))}"
        if len(os.sched_getaffinity(0)) < min(2, os.cpu_count() or 1):
            where += " (taskset -c 0,1 … lets them use two)"
    print(
        f"python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, sqlite {sqlite3.sqlite_version}, "
        f"{'uvloop' if factory else 'asyncio'}; {os.cpu_count()} cpus: {where}"
    )
    work = Path(tempfile.mkdtemp(prefix="dynupdate-soak-"))
    args.home = home = work / "home"
    fleet = Fleet(args.endpoints, reset=args.reset / 100, fail=args.fail / 100, seed=1)
    print(
        f"fleet: {args.endpoints:,} endpoints ({GS} {GS_OLD}, every other with a {CAM} "
        f"{CAM_OLD}), download head; {args.reset:g}% of cycles reset their endpoint first, "
        f"{args.fail:g}% of installs fail; policy flip every {args.flip:g} s"
    )
    commands: list[str] = []
    status = 1
    try:
        set_up(home, work)
        rate = args.rate
        load: Load | None = None
        if rate is None:
            with Serve(home, core=server_core) as server:
                commands.append(server.shown)
                load = Load(fleet, server.url, server.pin, args.peak_concurrency, 10**9)
                peak, line = measure_peak(args, server, load)
            print(line)
            rate = peak / 2
            print(f"soak rate: {rate:.0f} polls/s (half the peak)")
        else:
            print(f"soak rate: {rate:.0f} polls/s (--rate)")
        server = Serve(home, core=server_core)
        try:
            inflight = min(4 * args.connections, args.endpoints // 2)  # fewer than the fleet
            if load is None:
                load = Load(fleet, server.url, server.pin, args.connections, inflight)
            else:
                load.point_at(server.url, server.pin, args.connections)
                load.max_inflight = inflight
            peak_errors = sum(load.errors().values())
            cycles0, skipped0 = load.cycles, load.skipped
            latency0 = len(load.latency)
            outcomes0 = Counter(fleet.outcomes)
            answers0 = Counter(load.answers)
            print(f"soak: {args.minutes:g} min, RSS and CPU every {args.sample:g} s "
                  f"(progress on stderr)", flush=True)  # fmt: skip
            with asyncio.Runner(loop_factory=factory) as runner:
                cores = (server_core, client_core)
                samples = runner.run(soak_phase(args, server, load, rate, cores))
        finally:
            exit_status = server.stop()
        if server.shown not in commands:
            commands.append(server.shown)
        errors = load.errors()
        if exit_status != 0:
            errors["server-exit-status"] += 1
        if server.after_start_count:
            errors["server-stderr-lines"] += server.after_start_count
        status = report(
            args, samples, warmup, rate, load, fleet, errors, peak_errors, server,
            cycles=load.cycles - cycles0, skipped=load.skipped - skipped0,
            latency=load.latency[latency0:], outcomes=fleet.outcomes - outcomes0,
            answers=load.answers - answers0,
        )  # fmt: skip
        db = home / "dynupdate.db"
        sizes = [p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists()]
        print(f"database at the end: {sizes[0] / 2**20:.1f} MiB"
              + (f" (+ WAL {sizes[1] / 2**20:.1f} MiB)" if len(sizes) > 1 else ""))  # fmt: skip
        print("commands:")
        for command in commands:
            print("  " + command)
        print("  run as: " + shlex.join([sys.executable, *sys.argv]))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return status


def report(args, samples, warmup, rate, load, fleet, errors, peak_errors, server, **run) -> int:
    steady = [s for s in samples if s.at >= warmup] or samples[-1:]
    first, last = steady[0], samples[-1]
    total = samples[-1]
    span = last.at - first.at
    polls, reports = last.polls - first.polls, last.reports - first.reports
    cpu = last.cpu - first.cpu
    start, end = first.rss["VmRSS"], last.rss["VmRSS"]
    top = max(s.rss["VmRSS"] for s in steady)
    flat = end <= start * (1 + FLAT) and top <= start * (1 + FLAT)
    error_count = sum(errors.values())
    passed = flat and error_count == 0
    per_minute = [s for s in samples if round(s.at) % 60 < args.sample or s is samples[-1]]
    print("\n== soak figures")
    print(f"duration       {total.at:.1f} s; steady state {span:.1f} s after {first.at:.0f} s "
          f"of warm-up")  # fmt: skip
    print(f"polls          {total.polls:,} ({total.polls / total.at:.1f}/s; target {rate:.0f}/s); "
          f"steady state {polls:,} ({polls / span:.1f}/s)")  # fmt: skip
    outcomes = run["outcomes"]
    print(f"reports        {total.reports:,} acknowledged ({total.reports / total.at:.1f}/s); "
          f"steady state {reports:,} ({reports / span:.1f}/s); installs "
          f"{outcomes['installed']:,} installed, {outcomes['failed']:,} failed (simulated); "
          f"policy flips {args.flips}")  # fmt: skip
    routes = Counter()
    for (method, route, outcome), n in run["answers"].items():
        routes[f"{method} /{route} {outcome}"] += n
    print("requests       " + ", ".join(f"{k}: {v:,}" for k, v in sorted(routes.items())))
    shown = ", ".join(f"{kind} {n}" for kind, n in sorted(errors.items())) or "none"
    print(f"errors         {error_count} ({shown})"
          + (f"; {peak_errors} during the peak run" if peak_errors else ""))  # fmt: skip
    print(f"RSS (server)   start {start / MIB:.1f} MiB, end {end / MIB:.1f} MiB "
          f"({(end - start) / start:+.1%}), max {top / MIB:.1f} MiB ({(top - start) / start:+.1%})"
          f": {'PASS' if flat else 'FAIL'} (flat within {FLAT:.0%})")  # fmt: skip
    print("RSS per minute " + " ".join(f"{s.rss['VmRSS'] / MIB:.1f}" for s in per_minute) + " MiB")
    parts = [
        f"{name[3:].lower()} {first.rss[name] / MIB:.1f} → {last.rss[name] / MIB:.1f}"
        for name in ("RssAnon", "RssFile", "RssShmem")
    ]
    print(f"RSS parts      {', '.join(parts)} MiB (start → end; anon: the heap)")
    print(f"WAL file       start {first.wal / 2**20:.1f} MiB, end {last.wal / 2**20:.1f} MiB, "
          f"max {max(s.wal for s in steady) / 2**20:.1f} MiB")  # fmt: skip
    print(f"open fds       start {first.fds}, end {last.fds}, max {max(s.fds for s in steady)}"
          " (the server's; each open connection is one)")  # fmt: skip
    print(f"server CPU     {cpu / max(polls, 1) * 1e3:.3f} ms per poll, "
          f"{cpu / max(last.requests - first.requests, 1) * 1e3:.3f} ms per request; "
          f"busy {cpu / span:.0%} of one core (steady state)")  # fmt: skip
    others, steal, client = busy_elsewhere(first, last, pinned=args.pinned)
    if args.pinned:
        print(f"interference   other processes used {others:.0%} of the server's CPU ({steal:.0%} "
              f"steal) and {client:.0%} of the load client's (0% on a quiet machine)")  # fmt: skip
    else:
        print(f"interference   other processes used {others:.0%} of the CPUs ({steal:.0%} steal; "
              f"0% on a quiet machine)")  # fmt: skip
    own = (last.own_cpu - first.own_cpu) / span
    latency = run["latency"]
    print(f"cycles         {run['cycles']:,} (poll + updates); latency p50 "
          f"{percentile(latency, 0.5) * 1e3:.1f} ms, p99 {percentile(latency, 0.99) * 1e3:.1f} ms, "
          f"max {max(latency, default=0) * 1e3:.0f} ms; load client busy {own:.0%} of its core; "
          f"starts skipped {run['skipped']}")  # fmt: skip
    if polls / span < 0.9 * rate:
        print(f"note: the load fell behind the target rate ({polls / span:.0f} of {rate:.0f}/s):"
              f" see the interference line")  # fmt: skip
    for moved in args.moved:
        print(f"note: {moved}")
    if server.after_start:
        print("server stderr (first lines):\n" + "".join(server.after_start[:30]))
    if load.first_traceback:
        print("first unexpected client error:\n" + load.first_traceback)
    print(f"result: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
