"""A rollout's status and one gate evaluation with 1,000,000 endpoints (target < 0.5 s each).

What it does, in order:

1. makes a temporary home through the CLI with the packages and policies of
   bench/overview_1m.py, plus GroupSeries 6.3.0 to roll out, and starts a
   rollout of it (waves 1%,10%,50%,100%; a soak of 1 h and halt rules wide
   enough that the timed evaluations change nothing, so every run measures
   the same work);
2. fills N endpoints (``--endpoints``) with sqlite3 ``executemany``, as
   overview_1m.py does, each with its bucket (its endpoint's for a
   peripheral); names 20 trial devices; gives the rollout ``--tracked``
   rollout_devices rows among the first two waves' devices (succeeded,
   failed, open attempts) and their rollout_attempts;
3. for each of ``--waves`` (the rollout's current wave set directly: the
   gate reads the current wave's own devices, so the last wave, half the
   type, is the largest), times in this process ``rollout_views`` (what
   ``rollout status`` shows) and ``evaluate`` (timeouts, halt rules and the
   next-wave gate in one write transaction, what the server runs every few
   seconds) and ``wave_progress`` (the per-wave bars of ``rollout status
   --watch``), then ``dynupdate rollout status --json`` as a command.

    .venv/bin/python bench/rollout_gate.py                          # 1,000,000 endpoints
    .venv/bin/python bench/rollout_gate.py --endpoints 100000 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from overview_1m import dynupdate, endpoint_rows, set_up_policies, show, timed  # noqa: E402

from dynupdate.core.waves import bucket  # noqa: E402

TYPE, VERSION = "GroupSeries", "6.3.0"
TARGET = 0.5  # seconds


def fill(db_path: Path, count: int) -> float:
    """``count`` endpoints with their buckets, in one transaction; returns the seconds taken."""
    started = time.perf_counter()
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 15000")
        conn.execute("BEGIN IMMEDIATE")
        batch: list[tuple] = []

        def flush() -> None:
            conn.executemany(
                "INSERT INTO endpoints (serial, type, type_key, version, model, mac, tz,"
                " in_call, address, parent_serial, first_seen, last_poll, last_report,"
                " report_state, report_version, report_detail, bucket)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                batch,
            )
            batch.clear()

        for row in endpoint_rows(count):
            batch.append((*row, bucket(row[9] or row[0])))
            if len(batch) >= 50_000:
                flush()
        flush()
        conn.execute("COMMIT")
    finally:
        conn.close()
    return time.perf_counter() - started


def track(db_path: Path, tracked: int, now: datetime) -> tuple[int, int]:
    """Give the rollout ``tracked`` devices of its first two waves; (rollout id, rows made)."""
    rng = random.Random(7)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        (rollout_id,) = conn.execute("SELECT id FROM rollouts").fetchone()
        serials = conn.execute(
            "SELECT serial, bucket FROM endpoints WHERE type_key = ? AND bucket < 1000"
            " ORDER BY bucket LIMIT ?",
            (TYPE.casefold(), tracked),
        ).fetchall()
        trial = [s for s, _ in serials[:20]]
        conn.executemany(
            "INSERT INTO trial_devices (serial, added_at) VALUES (?, ?)",
            [(s, stamp) for s in trial],
        )
        devices, attempts = [], []
        for serial, lead in serials:
            outcome = rng.choices(["succeeded", "failed", "open"], [80, 5, 15])[0]
            devices.append(
                (
                    rollout_id,
                    serial,
                    lead,
                    int(serial in trial),
                    stamp,
                    1,
                    int(outcome == "failed"),
                    stamp if outcome == "open" else None,
                    0.0 if outcome == "open" else None,
                    stamp if outcome == "succeeded" else None,
                    stamp if outcome == "failed" else None,
                    "flash error" if outcome == "failed" else None,
                )
            )
            attempts.append(
                (rollout_id, serial, stamp, None if outcome == "open" else stamp,
                 None if outcome == "open" else outcome)
            )  # fmt: skip
        conn.executemany(
            "INSERT INTO rollout_devices (rollout_id, serial, bucket, trial, offered_at,"
            " attempts, failures, open_at, open_stopped, succeeded_at, failed_at, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            devices,
        )
        conn.executemany(
            "INSERT INTO rollout_attempts (rollout_id, serial, opened_at, ended_at, outcome)"
            " VALUES (?, ?, ?, ?, ?)",
            attempts,
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return rollout_id, len(devices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=1_000_000)
    parser.add_argument("--tracked", type=int, default=5_000, help="rollout_devices rows")
    parser.add_argument("--waves", default="2,4", help="current waves to time (of 4)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each timing")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home")
    args = parser.parse_args()

    from dynupdate.core.home import open_home
    from dynupdate.core.rollout_records import rollout_views, wave_progress
    from dynupdate.core.rollouts import evaluate

    workdir = Path(tempfile.mkdtemp(prefix="dynupdate-rollout-gate-"))
    home = workdir / "home"
    db_path = home / "dynupdate.db"
    try:
        print(
            f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, "
            f"{os.cpu_count()} cpus"
        )
        set_up_policies(home, workdir)
        seconds = fill(db_path, args.endpoints)
        package = workdir / "gs-6.3.0.pup"
        package.write_bytes(b"GroupSeries 6.3.0\n" * 64)
        dynupdate(home, "package", "add", str(package), "--type", TYPE, "--version", VERSION)
        started = time.perf_counter()
        dynupdate(home, "rollout", "start", TYPE, "--version", VERSION, "--soak", "1h",
                  "--max-failures", "100000", "--max-failure-rate", "100%")  # fmt: skip
        start_seconds = time.perf_counter() - started
        rollout_id, rows = track(db_path, args.tracked, datetime.now(UTC))
        size = db_path.stat().st_size / 2**20
        print(
            f"filled {args.endpoints:,} endpoints in {seconds:.1f} s (database {size:.0f} MiB);"
            f" rollout start (command) {start_seconds:.2f} s; {rows:,} rollout_devices rows"
        )
        opened = open_home(home)
        try:
            for wave in (int(w) for w in args.waves.split(",")):
                opened.db.execute("UPDATE rollouts SET wave = ? WHERE id = ?", (wave, rollout_id))
                opened.db.conn.commit()
                (summary,) = rollout_views(opened.db)
                print(f"wave {wave}: gate {json.dumps(summary.gate.to_dict())}")
                show(f"core rollout_views(db), wave {wave}",
                     timed(lambda: rollout_views(opened.db), args.repeat), TARGET)  # fmt: skip
                # A later "now" than any attempt: the timeout check runs, times out nothing.
                at = datetime.now(UTC) + timedelta(minutes=1)
                events: list[list[str]] = []
                show(f"core evaluate(db), wave {wave}",
                     timed(lambda at=at, e=events: e.append(evaluate(opened.db, now=at)),
                           args.repeat), TARGET)  # fmt: skip
                assert not any(events), events  # nothing changed: every run did the same work
                rollout = summary.rollout
                show(f"core wave_progress (status --watch), wave {wave}",
                     timed(lambda r=rollout: wave_progress(opened.db, r), args.repeat))  # fmt: skip
                show(
                    f"CLI rollout status --json, wave {wave}",
                    timed(
                        lambda: json.loads(
                            dynupdate(home, "rollout", "status", "--json", capture=True)
                        ),
                        args.repeat,
                    ),
                    TARGET,
                )
        finally:
            opened.close()
        print("  (the CLI figure includes the interpreter's start-up: see overview_1m.py --help)")
    finally:
        if args.keep:
            print(f"home kept: {home}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
