"""What a million audit-log entries cost: size, `log --limit 50`, `log --verify`.

Fills a temporary home with N entries (default 1,000,000) of the actions
admins make most (package add, policy set, window set, key import), chained
exactly as :func:`dynupdate.core.audit.append` chains them, inserted with
sqlite3 ``executemany`` in one transaction (a real append is a transaction of
its own: minutes of fsyncs for a million). Then it prints the database size
and times, each the median of repeated runs:

- ``list_entries(db, limit=50)`` in core, and with ``type_=`` (index on type),
- ``dynupdate --home H log --limit 50`` as a command (interpreter start-up
  included), table and ``--json``, and ``--help`` for the start-up alone,
- ``verify(db)`` in core and ``dynupdate log --verify`` as a command,
- one :func:`append` in its own write transaction at N entries.

    .venv/bin/python bench/audit_log.py                   # 1,000,000 entries
    .venv/bin/python bench/audit_log.py --entries 100000 --repeat 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dynupdate.core import audit  # noqa: E402
from dynupdate.core.db import write  # noqa: E402
from dynupdate.core.home import open_home  # noqa: E402

TYPES = ["GroupSeries", "Trio", "EagleEyeIV", "VVX"]


def _detail(i: int) -> tuple[str, str | None, dict[str, Any]]:
    """A plausible entry: (action, type, detail), cycling over the common changes."""
    type_ = TYPES[i % len(TYPES)]
    version = f"6.{i % 7}.{i % 13}.0-{i % 1000}"
    match i % 4:
        case 0:
            sha = hashlib.sha256(str(i).encode()).hexdigest()
            return "package.add", type_, {
                "version": version, "sha256": sha, "size": 700_000_000 + i, "name": f"pkg-{i}.pup",
            }  # fmt: skip
        case 1:
            return "policy.set", type_, {
                "version_to_use": version, "allow_newer": bool(i % 2),
                "previous_version_to_use": "6.2.1.1-600021", "previous_allow_newer": False,
            }  # fmt: skip
        case 2:
            return "window.set", None, {
                "days": ["mon", "tue", "wed", "thu", "fri"], "start": "22:00",
                "duration_minutes": 240, "tz": "Europe/Berlin", "previous": None,
            }  # fmt: skip
        case _:
            return "key.import", None, {
                "file": f"keys-{i}.csv", "added": [[f"SER{i:08d}", version]], "replaced": [],
                "unchanged": 0,
            }  # fmt: skip


def entries(count: int) -> Iterator[tuple[Any, ...]]:
    """Rows of ``audit_log``, chained as ``audit.append`` chains them, a minute apart."""
    prev = audit.ZERO
    start = datetime.now(UTC) - timedelta(minutes=count)
    for i in range(count):
        id_ = i + 1
        action, type_, detail = _detail(i)
        time_ = (start + timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
        detail = json.loads(json.dumps(detail))
        sha = hashlib.sha256(
            audit.canonical(id_, time_, "admin", action, type_, detail, prev)
        ).hexdigest()
        text = json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        yield (id_, time_, "admin", action, type_, text, prev, sha)
        prev = sha


def fill(db_path: Path, count: int) -> float:
    started = time.perf_counter()
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        batch: list[tuple[Any, ...]] = []
        for row in entries(count):
            batch.append(row)
            if len(batch) >= 50_000:
                conn.executemany("INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?)", batch)
                batch.clear()
        conn.executemany("INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?)", batch)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.perf_counter() - started


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def show(label: str, times: list[float]) -> None:
    runs = ", ".join(f"{t * 1000:.2f}" for t in times)
    print(f"{label:<50} median {statistics.median(times) * 1000:9.2f} ms   runs: {runs}")


def command(home: Path, *args: str) -> Callable[[], str]:
    argv = [sys.executable, "-m", "dynupdate", "--home", str(home), *args]

    def run() -> str:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")
        return done.stdout

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the temporary home")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="dynupdate-audit-"))
    home = workdir / "home"
    try:
        print(f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, "
              f"{os.cpu_count()} cpus")  # fmt: skip
        open_home(home).close()
        db_path = home / "dynupdate.db"
        empty = db_path.stat().st_size
        seconds = fill(db_path, args.entries)
        size = db_path.stat().st_size - empty
        print(
            f"filled {args.entries:,} entries in {seconds:.1f} s: database +{size / 2**20:.0f} MiB"
            f" ({size / args.entries:.0f} bytes an entry, index included)"
        )
        opened = open_home(home)
        try:
            db = opened.db
            show("core list_entries(limit=50)", timed(lambda: audit.list_entries(db, limit=50),
                                                      args.repeat))  # fmt: skip
            show(
                "core list_entries(type_='trio', limit=50)",
                timed(lambda: audit.list_entries(db, type_="trio", limit=50), args.repeat),
            )
            verified: list[audit.Verification] = []
            show("core verify(db)", timed(lambda: verified.append(audit.verify(db)), 1))
            print(f"  intact {verified[0].intact}, {verified[0].entries:,} entries")

            def one_append() -> None:
                with write(db):
                    audit.append(db, "admin", audit.Action.WINDOW_CLEAR, None, {"previous": None})

            show(f"one append at {args.entries:,} entries (own transaction)",
                 timed(one_append, args.repeat))  # fmt: skip
        finally:
            opened.close()
        print("commands:")
        for line in (["--help"], ["log", "--limit", "50"], ["log", "--verify"]):
            print("  " + " ".join([sys.executable, "-m", "dynupdate", "--home", str(home), *line]))
        show("CLI --help (start-up only)", timed(command(home, "--help"), args.repeat))
        show("CLI log --limit 50", timed(command(home, "log", "--limit", "50"), args.repeat))
        show("CLI log --limit 50 --json",
             timed(command(home, "log", "--limit", "50", "--json"), args.repeat))  # fmt: skip
        show("CLI log --verify", timed(command(home, "log", "--verify"), 1))
    finally:
        if args.keep:
            print(f"home kept: {home}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
