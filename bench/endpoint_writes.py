"""CPU per poll of the endpoint writes alone, with 1,000 and with 1,000,000 endpoints.

What a poll costs the writer thread: ``record_polls`` on batches of 1,600
polls (200 ms of polls at 8,000/s), each batch one transaction, from a pool of
10,000 registered endpoints spread over the whole table, as the server's
grouped writes do. With a big table every poll's row sits on another page,
so the difference between the two sizes is what the fleet's size costs a poll.

    .venv/bin/python bench/endpoint_writes.py [--endpoints 1000,1000000] [--batches 30]
        [--reason outside-window]

``--reason R``: every poll was told R, as it was at the poll before (the
server's steady state; ``outside-window`` with a ``retryAt``, a row of the
partial index endpoints_window). Without it, polls carry no answer, as
before the server recorded answers.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dynupdate.core.db import connect
from dynupdate.core.home import open_home
from dynupdate.core.registry import Sighting, record_polls

BATCH = 1600
POOL = 10_000


def fill(home: Path, count: int, reason: str | None = None) -> None:
    open_home(home).close()
    db = sqlite3.connect(home / "dynupdate.db")
    at = "2026-12-01T00:00:00Z"
    # As the poll before left it: a retryAt of the same length as the next one's.
    retry = "2026-12-02T21:00:00Z" if reason == "outside-window" else None
    rows = (
        (f"SN{i:07d}", "GroupSeries", "groupseries", "6.1.0", at, at, reason, retry)
        for i in range(count)
    )
    db.executemany(
        "INSERT INTO endpoints (serial, type, type_key, version, first_seen, last_poll, in_call,"
        " last_reason, retry_at) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
        rows,
    )
    db.commit()
    db.close()


def measure(home: Path, count: int, batches: int, reason: str | None = None) -> float:
    """Seconds of this thread's CPU per poll written."""
    retry = datetime(2026, 12, 2, 21, tzinfo=UTC) if reason == "outside-window" else None
    rng = random.Random(1)
    pool = [f"SN{rng.randrange(count):07d}" for _ in range(POOL)]
    db = connect(home / "dynupdate.db")
    try:
        work = []
        started_at = datetime.now(UTC).replace(microsecond=0)
        for k in range(batches + 1):
            # A second apart, as a device's polls are: a row written again with the
            # same content leaves its page clean, which real polls never do.
            now = started_at + timedelta(seconds=k)
            work.append(
                [
                    (
                        Sighting(
                            pool[(k * BATCH + j) % POOL], "GroupSeries", "6.1.0", "Group 500",
                            "00:11:22:33:44:55", None, False, "127.0.0.1", reason=reason,
                            # the same for a device from poll to poll, as the server's
                            retry_at=retry and retry + timedelta(seconds=(k * BATCH + j) % POOL),
                        ),
                        now,
                    )
                    for j in range(BATCH)
                ]
            )  # fmt: skip
        record_polls(db, work[0])  # warm the cache
        started = time.thread_time()
        for batch in work[1:]:
            record_polls(db, batch)
        return (time.thread_time() - started) / (batches * BATCH)
    finally:
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", default="1000,1000000", help="fleet sizes, comma-separated")
    parser.add_argument("--batches", type=int, default=30, help="batches of 1,600 polls")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--reason", default=None, help="the reason every poll was told")
    args = parser.parse_args()
    sizes = [int(n) for n in args.endpoints.split(",")]
    work = Path(tempfile.mkdtemp(prefix="dynupdate-writes-"))
    try:
        figures = {}
        for count in sizes:
            home = work / f"home-{count}"
            started = time.perf_counter()
            fill(home, count, args.reason)
            filled = time.perf_counter() - started
            runs = sorted(
                measure(home, count, args.batches, args.reason) for _ in range(args.repeat)
            )
            figures[count] = runs[len(runs) // 2]
            shown = ", ".join(f"{r * 1e6:.1f}" for r in runs)
            print(
                f"{count:>9,} endpoints (filled in {filled:.1f} s): "
                f"{figures[count] * 1e6:6.1f} µs CPU per poll written   runs: {shown}"
            )
        if len(sizes) > 1:
            first, last = sizes[0], sizes[-1]
            print(f"{last:,} vs {first:,}: x {figures[last] / figures[first]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
