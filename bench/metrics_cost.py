"""CPU per request of ``serve --metrics``: the instrument calls one request makes, timed.

Each figure is the best of ``--repeat`` timeit runs of ``--number`` requests,
in multiprocess mode (a lock and a write into a memory-mapped file per count),
as a worker makes them:

- poll, new connection: opened, answered (status, route, duration), polled
  (one device), closed: what a poll costs when every poll opens a connection
  (endpoints poll once an interval, each on a fresh TLS connection);
- poll, keep-alive: answered and polled only; with 4 devices: an endpoint and
  3 peripherals;
- report: answered and reported (one device);
- without --metrics: the ``meter is not None`` checks a request still makes.

Then the cost of one scrape (every counter file of 2 workers read and the text
rendered; the fleet's read is cached, see ``overview_1m.py`` for its cost).

    .venv/bin/python bench/metrics_cost.py [--number 200000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        folder = home / "prometheus"
        folder.mkdir(parents=True)
        # Before prometheus_client is imported: it picks multiprocess mode then.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        from dynupdate.core.home import open_home
        from dynupdate.core.vocabulary import Reason
        from dynupdate.metrics.exporter import Exporter
        from dynupdate.protocol import DeviceReport, NoOffer

        open_home(home).close()
        meter = Exporter(home, folder, "127.0.0.1", 0)
        meter.start()
        one = [NoOffer("SN1", "GroupSeries", Reason.UP_TO_DATE)]
        four = one + [NoOffer(f"P{i}", "EagleEye", Reason.NO_POLICY) for i in range(3)]
        reported = [DeviceReport("SN1", "GroupSeries", "6.2", "installed")]
        nothing = None

        def new_connection_poll() -> None:
            meter.opened()
            meter.answered("/poll", 200, 0.0004)
            meter.polled(one)
            meter.closed()

        def keepalive_poll() -> None:
            meter.answered("/poll", 200, 0.0004)
            meter.polled(one)

        def keepalive_poll_4() -> None:
            meter.answered("/poll", 200, 0.0004)
            meter.polled(four)

        def report() -> None:
            meter.answered("/report", 200, 0.004)
            meter.reported(reported)

        def without_metrics() -> None:
            # PollApp's checks on a poll and the writer's per batch; the transport has none.
            if nothing is not None:
                raise AssertionError
            if nothing is not None:
                raise AssertionError

        def best(call) -> float:
            runs = timeit.repeat(call, number=args.number, repeat=args.repeat)
            return min(runs) / args.number * 1e6

        empty = best(lambda: None)  # the call of the timed function itself
        print(f"per request, best of {args.repeat} x {args.number:,} (µs, call overhead removed)")
        for name, call in (
            ("poll, new connection", new_connection_poll),
            ("poll, keep-alive", keepalive_poll),
            ("poll, keep-alive, 4 devices", keepalive_poll_4),
            ("report", report),
            ("without --metrics", without_metrics),
        ):
            print(f"  {name:30} {max(0.0, best(call) - empty):6.2f}")

        # A second worker's files, as a scrape finds them.
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry, path=str(folder))
        for file in list(folder.glob("*.db")):
            (folder / file.name.replace(f"_{os.getpid()}.", "_1.")).write_bytes(file.read_bytes())
        scrape = timeit.repeat(lambda: generate_latest(registry), number=200, repeat=args.repeat)
        size = len(generate_latest(registry))
        print(f"one scrape of 2 workers' files: {min(scrape) / 200 * 1e3:.2f} ms, {size:,} bytes")


if __name__ == "__main__":
    main()
