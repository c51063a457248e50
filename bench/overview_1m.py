"""How long the fleet views take with a million endpoints in the database.

Fills a temporary home with N endpoints (default 1,000,000) over a few device
types and versions, with mixed report states (nothing reported, downloading,
installing, installed, failed), peripherals among them, and the first-seen
history rows that a first poll leaves. Rows are inserted directly with
sqlite3 ``executemany`` in one transaction, in the schema the poll server
writes (``dynupdate.core.registry.record_polls``), which takes seconds where
real polls would take minutes. Then it times:

- ``overview`` as a core call (``overview(db, load_fleet_state(db))``),
- ``dynupdate --home H overview --json`` as a subprocess (interpreter start
  included: what an admin or a cron job waits for),
- ``dynupdate --home H endpoint list --status failed --json`` (subprocess),

each repeated, with the median printed. The target (issue 3) is an overview
under 1 s with 1,000,000 endpoints.

    .venv/bin/python bench/overview_1m.py                  # 1,000,000 endpoints
    .venv/bin/python bench/overview_1m.py --endpoints 100000 --repeat 5
    .venv/bin/python bench/overview_1m.py --rollout   # a GroupSeries rollout in its 10% wave

With ``--rollout`` a GroupSeries rollout runs in its second wave: the
statuses of that type then depend on each device's bucket, trial membership
and attempts, not only on its version and last report.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# type: (versions seen in the field with their weights, packages to upload, policy)
FLEET = {
    "GroupSeries": (
        {"6.2.0": 10, "6.2.1.1-600021": 30, "6.2.2.0-100": 55, "5.9.0.PVR": 5},
        ["6.2.1.1-600021", "6.2.2.0-100"],
        ("6.2.2.0-100", "--exact"),
    ),
    "Trio": (
        {"7.0.0": 20, "7.1.0": 30, "7.2.0": 45, "7.2.0_0049": 5},
        ["7.1.0", "7.2.0"],
        ("7.1.0", "--allow-newer"),
    ),
    "EagleEyeIV": ({"1.3.0": 40, "1.4.0": 60}, ["1.4.0"], ("1.4.0", "--exact")),
    "VVX": ({"5.9.5": 70, "6.0.0": 30}, [], None),  # endpoints of a type with no package
}
TYPE_WEIGHTS = {"GroupSeries": 45, "Trio": 30, "EagleEyeIV": 15, "VVX": 10}
# (report_state, report is about the target?) and weights; None: never reported.
REPORTS = {
    None: 70,
    ("downloading", True): 4,
    ("installing", True): 3,
    ("installed", True): 10,
    ("failed", True): 8,
    ("failed", False): 5,
}
TARGETS = {"GroupSeries": "6.2.2.0-100", "Trio": "7.2.0", "EagleEyeIV": "1.4.0"}
SERIAL = "EP{:08d}"


def dynupdate(home: Path, *args: str, capture: bool = False) -> str:
    """One ``python -m dynupdate --home H …`` command; exits the bench if it fails."""
    command = [sys.executable, "-m", "dynupdate", "--home", str(home), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    return result.stdout if capture else ""


def set_up_policies(home: Path, workdir: Path) -> None:
    """Upload the packages of FLEET and set its policies, through the CLI."""
    for type_, (_, packages, policy) in FLEET.items():
        for version in packages:
            path = workdir / f"{type_}-{version}.pup"
            path.write_bytes(f"{type_} {version}\n".encode() * 64)
            dynupdate(home, "package", "add", str(path), "--type", type_, "--version", version)
        if policy is not None:
            dynupdate(home, "policy", "set", type_, "--version", policy[0], policy[1])


def _pick(rng: random.Random, weights: dict):
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def endpoint_rows(count: int, seed: int = 1, now: datetime | None = None):
    """Rows for ``endpoints`` and ``endpoint_history``: serial EP00000000, EP00000001, …"""
    from dynupdate.core.waves import bucket

    rng = random.Random(seed)
    now = now or datetime.now(UTC)
    last_base = now - timedelta(hours=2)
    seen = (now - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    parents: list[str] = []
    for i in range(count):
        serial = SERIAL.format(i)
        type_ = _pick(rng, TYPE_WEIGHTS)
        version = _pick(rng, FLEET[type_][0])
        parent = None
        if type_ == "EagleEyeIV" and parents:
            parent = parents[rng.randrange(len(parents))]
        elif type_ == "GroupSeries" and len(parents) < 100_000:
            parents.append(serial)
        report = _pick(rng, REPORTS)
        state = report_version = at = detail = None
        target = TARGETS.get(type_)
        if report is not None and target is not None:
            state, about_target = report
            report_version = target if about_target else FLEET[type_][2][0]
            if state == "installed":
                version = report_version
            at = (last_base + timedelta(seconds=rng.randrange(7200))).strftime("%Y-%m-%dT%H:%M:%SZ")
            detail = "disk full" if state == "failed" else None
        last_poll = (last_base + timedelta(seconds=rng.randrange(7200))).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        yield (
            serial,
            type_,
            type_.casefold(),
            version,
            "RealPresence Group 500" if type_ == "GroupSeries" else None,
            None,
            None,
            int(rng.random() < 0.05),
            f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
            parent,
            seen,
            last_poll,
            at,
            state,
            report_version,
            detail,
            bucket(parent or serial),
        )


ROLLOUT_VERSION = "6.3.0"  # GroupSeries, rolled out with --rollout
# A rollout's devices in its open waves: (attempts, failures, open, succeeded) and weights.
ATTEMPTS = {None: 40, (1, 0, True, False): 25, (1, 0, False, True): 25, (1, 1, False, False): 6,
            (3, 3, False, False): 4}  # fmt: skip


def start_rollout(home: Path, workdir: Path) -> None:
    """Start a GroupSeries rollout through the CLI and open its second wave (10 %)."""
    path = workdir / f"GroupSeries-{ROLLOUT_VERSION}.pup"
    path.write_bytes(b"GroupSeries next\n" * 64)
    dynupdate(home, "package", "add", str(path), "--type", "GroupSeries",
              "--version", ROLLOUT_VERSION)  # fmt: skip
    dynupdate(home, "rollout", "start", "GroupSeries", "--version", ROLLOUT_VERSION)
    dynupdate(home, "rollout", "advance", "GroupSeries")


def fill_attempts(db_path: Path, seed: int = 2) -> int:
    """Attempts for the admitted GroupSeries devices, and 20 trial devices; returns the rows."""
    rng = random.Random(seed)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 15000")
        conn.execute("BEGIN IMMEDIATE")
        (rollout_id,) = conn.execute("SELECT max(id) FROM rollouts").fetchone()
        admitted = conn.execute(
            "SELECT serial, bucket FROM endpoints WHERE type_key = 'groupseries' AND bucket < 1000"
        ).fetchall()
        rows = []
        for serial, lead in admitted:
            attempt = _pick(rng, ATTEMPTS)
            if attempt is None:
                continue
            attempts, failures, open_, succeeded = attempt
            rows.append((rollout_id, serial, lead, stamp, attempts, failures,
                         stamp if open_ else None, 0.0 if open_ else None,
                         stamp if succeeded else None, stamp if failures else None))  # fmt: skip
        conn.executemany(
            "INSERT INTO rollout_devices (rollout_id, serial, bucket, offered_at, attempts,"
            " failures, open_at, open_stopped, succeeded_at, failed_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        trial = conn.execute(
            "SELECT serial FROM endpoints WHERE type_key = 'groupseries' AND bucket >= 5000"
            " LIMIT 20"
        ).fetchall()
        conn.executemany(
            "INSERT INTO trial_devices (serial, added_at) VALUES (?, ?)",
            [(serial, stamp) for (serial,) in trial],
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return len(rows)


def fill_endpoints(db_path: Path, count: int, seed: int = 1) -> float:
    """Insert ``count`` endpoints and their first-seen history; returns the seconds taken."""
    started = time.perf_counter()
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 15000")
        conn.execute("BEGIN IMMEDIATE")
        history: list[tuple] = []
        batch: list[tuple] = []

        def flush() -> None:
            conn.executemany(
                "INSERT INTO endpoints (serial, type, type_key, version, model, mac, tz,"
                " in_call, address, parent_serial, first_seen, last_poll, last_report,"
                " report_state, report_version, report_detail, bucket)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                batch,
            )
            conn.executemany(
                "INSERT INTO endpoint_history (serial, at, event, version, detail)"
                " VALUES (?, ?, ?, ?, ?)",
                history,
            )
            batch.clear()
            history.clear()

        for row in endpoint_rows(count, seed):
            batch.append(row)
            history.append((row[0], row[10], "first-seen", row[3], None))
            if row[13] is not None:
                history.append((row[0], row[12], row[13], row[14], row[15]))
            if len(batch) >= 50_000:
                flush()
        flush()
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.perf_counter() - started


def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def show(label: str, times: list[float], target: float | None = None) -> None:
    median = statistics.median(times)
    verdict = ""
    if target is not None:
        verdict = f"  (target < {target:.1f} s: {'met' if median < target else 'MISSED'})"
    runs = ", ".join(f"{t:.3f}" for t in times)
    print(f"{label:<44} median {median:7.3f} s   runs: {runs}{verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each timing")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home")
    parser.add_argument(
        "--rollout",
        action="store_true",
        help=f"with a GroupSeries rollout to {ROLLOUT_VERSION} running in its 10%% wave",
    )
    args = parser.parse_args()

    from dynupdate.core.endpoints import list_endpoints, overview
    from dynupdate.core.fleet import load_fleet_state
    from dynupdate.core.home import open_home

    workdir = Path(tempfile.mkdtemp(prefix="dynupdate-overview-"))
    home = workdir / "home"
    try:
        print(
            f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, "
            f"{os.cpu_count()} cpus"
        )
        set_up_policies(home, workdir)
        if args.rollout:
            start_rollout(home, workdir)
        seconds = fill_endpoints(home / "dynupdate.db", args.endpoints)
        size = (home / "dynupdate.db").stat().st_size / 2**20
        print(f"filled {args.endpoints:,} endpoints in {seconds:.1f} s (database {size:.0f} MiB)")
        if args.rollout:
            attempts = fill_attempts(home / "dynupdate.db")
            print(f"rollout of GroupSeries {ROLLOUT_VERSION} in wave 2 (10%): {attempts:,} devices"
                  " with attempts, 20 trial devices")  # fmt: skip

        opened = open_home(home)
        try:
            fleet = load_fleet_state(opened.db)
            rows = overview(opened.db, fleet)
            for row in rows:
                counts = ", ".join(f"{k} {v:,}" for k, v in row["counts"].items() if v)
                print(f"  {row['type']:<12} {row['endpoints']:>9,}  {counts}")
            show(
                "core overview(db, load_fleet_state(db))",
                timed(lambda: overview(opened.db, load_fleet_state(opened.db)), args.repeat),
                1.0,
            )
            failed = []
            show(
                "core list_endpoints(status='failed')",
                timed(
                    lambda: failed.append(
                        len(list_endpoints(opened.db, load_fleet_state(opened.db), status="failed"))
                    ),
                    max(1, args.repeat // 2),
                ),
            )
            print(f"  {failed[0]:,} failed endpoints")
        finally:
            opened.close()

        command = [sys.executable, "-m", "dynupdate", "--home", str(home)]
        print("commands:")
        print("  " + " ".join([*command, "overview", "--json"]))
        print("  " + " ".join([*command, "endpoint", "list", "--status", "failed", "--json"]))
        print("  " + " ".join([*command, "--help"]) + "   (interpreter and import time)")
        show(
            "CLI --help (start-up only)",
            timed(lambda: dynupdate(home, "--help", capture=True), args.repeat),
        )
        show(
            "CLI overview --json",
            timed(
                lambda: json.loads(dynupdate(home, "overview", "--json", capture=True)), args.repeat
            ),
            1.0,
        )
        show(
            "CLI endpoint list --status failed --json",
            timed(
                lambda: json.loads(
                    dynupdate(
                        home, "endpoint", "list", "--status", "failed", "--json", capture=True
                    )
                ),
                max(1, args.repeat // 2),
            ),
        )
    finally:
        if args.keep:
            print(f"home kept: {home}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
