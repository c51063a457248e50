"""Importing 100,000 activation keys, and what the keys cost a poll.

Writes a CSV of N keys (default 100,000; serials S0000000…, two versions),
then times, each the median of repeated runs into a fresh home:

- ``dynupdate --home H key import FILE`` as a command (start-up included),
- ``import_keys(db, path)`` in core: reading and checking the file, then one
  transaction (its split printed),
- importing the same file again into the full table (every key unchanged),

and, in process with no socket (``PollApp.handle`` on a built request), the
time of a poll answered with an update, with 0 and with N keys loaded, for a
device with a key and one without: the key lookup is one indexed read, made
only when an update is offered.

    .venv/bin/python bench/keys_import.py
    .venv/bin/python bench/keys_import.py --keys 1000000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dynupdate.core.home import open_home  # noqa: E402
from dynupdate.core.keys import import_keys, key_for, read_keys_csv  # noqa: E402
from dynupdate.core.packages import add_package  # noqa: E402
from dynupdate.core.policies import set_policy  # noqa: E402
from dynupdate.serve import PollApp, ServeOptions  # noqa: E402
from dynupdate.server.messages import Request  # noqa: E402

VERSIONS = ("6.2.2.0-100", "6.3.0")


def write_keys(path: Path, count: int) -> None:
    with open(path, "w", encoding="utf-8") as out:
        out.write("serial,version,key\n")
        for i in range(count):
            version = VERSIONS[i % len(VERSIONS)]
            out.write(f"S{i // 2:07d},{version},KEY-{i:08d}-4f1c9a7e2b\n")


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def show(label: str, times: list[float], unit: str = "s", scale: float = 1.0) -> None:
    runs = ", ".join(f"{t * scale:.3f}" for t in times)
    median = statistics.median(times) * scale
    print(f"{label:<52} median {median:9.3f} {unit}   runs: {runs}")


def poll_cost(home: Path, serial: str, polls: int) -> float:
    """Seconds per poll answered with an update, through PollApp without a socket."""
    app = PollApp(open_home(home), ServeOptions())
    body = (
        f'<poll protocol="1"><endpoint serial="{serial}" type="GroupSeries"'
        ' version="6.2.1"/></poll>'
    ).encode()
    request = Request("POST", "/poll", "", {"host": "h:8443"}, body, ("127.0.0.1", 1), None)
    app.start()
    try:

        async def run() -> float:
            answer = await app.handle(request)
            assert b"<update " in answer.body, answer.body
            started = time.perf_counter()
            for _ in range(polls):
                await app.handle(request)
            return (time.perf_counter() - started) / polls

        return asyncio.run(run())
    finally:
        app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--polls", type=int, default=20_000)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="dynupdate-keys-"))
    try:
        keys = workdir / "keys.csv"
        write_keys(keys, args.keys)
        print(f"{args.keys:,} keys, {keys.stat().st_size / 2**20:.1f} MiB of CSV")
        homes = iter(range(1000))

        def fresh() -> Path:
            home = workdir / f"home{next(homes)}"
            open_home(home).close()
            return home

        def command() -> None:
            home = fresh()
            argv = [sys.executable, "-m", "dynupdate", "--home", str(home), "key", "import"]
            done = subprocess.run([*argv, str(keys)], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(done.stderr)

        print("command: " + " ".join([sys.executable, "-m", "dynupdate", "key", "import", "FILE"]))
        show("CLI key import (fresh home)", timed(command, args.repeat))
        show("core read_keys_csv (read and check only)",
             timed(lambda: read_keys_csv(keys), args.repeat))  # fmt: skip

        def core() -> None:
            opened = open_home(fresh())
            try:
                import_keys(opened.db, keys)
            finally:
                opened.close()

        show("core import_keys (fresh home)", timed(core, args.repeat))
        home = fresh()
        opened = open_home(home)
        try:
            import_keys(opened.db, keys)
            show("core import_keys again (all unchanged)",
                 timed(lambda: import_keys(opened.db, keys), args.repeat))  # fmt: skip
            package = workdir / "gs.pup"
            package.write_bytes(b"GroupSeries 6.2.2.0-100\n" * 64)
            add_package(opened.db, opened.store, package, "GroupSeries", "6.2.2.0-100")
            set_policy(opened.db, "GroupSeries", "6.2.2.0-100")
        finally:
            opened.close()
        size = (home / "dynupdate.db").stat().st_size / 2**20
        print(f"database with {args.keys:,} keys: {size:.1f} MiB")
        bare = fresh()
        opened = open_home(bare)
        try:
            add_package(opened.db, opened.store, package, "GroupSeries", "6.2.2.0-100")
            set_policy(opened.db, "GroupSeries", "6.2.2.0-100")
        finally:
            opened.close()
        cases = [
            ("poll with an update, no keys loaded", bare, "S0000001"),
            (f"poll with an update, {args.keys:,} keys, device has one", home, "S0000001"),
            (f"poll with an update, {args.keys:,} keys, device has none", home, "X0000001"),
        ]
        for label, where, serial in cases:
            runs = [poll_cost(where, serial, args.polls) for _ in range(args.repeat)]
            show(label, runs, "µs", 1e6)
        opened = open_home(home)
        try:

            def lookups() -> None:
                for _ in range(args.polls):
                    key_for(opened.db, "S0000001", "6.2.2.0-100")

            runs = [t / args.polls for t in timed(lookups, args.repeat)]
            show("key_for alone, device has one", runs, "µs", 1e6)
        finally:
            opened.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
