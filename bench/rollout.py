"""A whole rollout through one server: 10,000 simulated endpoints, and the server's CPU per poll.

Starts ``dynupdate serve --workers 1`` in a temporary home on 127.0.0.1 (port
0), uploads a small package, sets the policy, then runs the fleet simulator
(the reference endpoints of ``dynupdate simulate``, in this process) with
``--download head`` until every endpoint has reported ``installed``. The
server's CPU time is read from ``/proc/<pid>/stat`` (utime + stime) before and
after. A second phase has every endpoint poll once more (all up to date now),
for the CPU of a plain poll on a new TLS connection.

Each update cycle is what a device does: a new TLS connection for the poll,
then on that connection the ``downloading`` report, the HEAD of the package,
the ``installing`` and ``installed`` reports (each committed before its answer).

    .venv/bin/python bench/rollout.py                      # 10,000 endpoints
    .venv/bin/python bench/rollout.py --endpoints 2000 --concurrency 200 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from _server import Serve, admin, cpu_seconds, two_cores  # noqa: E402

from dynupdate.endpoint import EndpointClient  # noqa: E402
from dynupdate.endpoint.simulation import Simulation, build_fleet, parse_fleet  # noqa: E402


async def rollout(args: argparse.Namespace, server: Serve) -> dict:
    client = EndpointClient(
        server.url,
        pin=server.pin,
        max_connections=args.concurrency,
        timeout=60,
    )
    fleet, _ = build_fleet(
        args.endpoints, parse_fleet("GroupSeries=6.2.1"), download="head", seed=1
    )
    simulation = Simulation(client, fleet, seed=1)
    pids = server.pids()
    cpu0, own0 = cpu_seconds(pids), time.process_time()
    summary = await simulation.run(until_done=True, duration=args.max_time)
    cpu1, own1 = cpu_seconds(pids), time.process_time()
    result = {
        "endpoints": args.endpoints,
        "concurrency": args.concurrency,
        "rollout_seconds": summary["elapsed_seconds"],
        "done": summary["done"],
        "time_to_50_percent": summary["time_to_50_percent"],
        "time_to_90_percent": summary["time_to_90_percent"],
        "time_to_100_percent": summary["time_to_100_percent"],
        "polls": summary["polls"],
        "polls_per_second": summary["polls_per_second"],
        "requests": summary["requests"],
        "requests_per_second": round(summary["requests"] / summary["elapsed_seconds"], 1),
        "connections": summary["connections"],
        "errors": summary["errors"],
        "server_cpu_seconds": round(cpu1 - cpu0, 2),
        "server_cpu_ms_per_update_cycle": round(1000 * (cpu1 - cpu0) / summary["polls"], 2),
        "server_cpu_ms_per_request": round(1000 * (cpu1 - cpu0) / summary["requests"], 3),
        "simulator_cpu_seconds": round(own1 - own0, 2),
    }
    if args.poll_phase:
        # Every endpoint polls once more: all are up to date, so this is the
        # plain poll, each on a new TLS connection.
        polls0, cpu0, t0 = client.stats.polls, cpu_seconds(pids), time.monotonic()
        await asyncio.gather(*(endpoint.poll_once(client) for endpoint in fleet))
        cpu1, elapsed = cpu_seconds(pids), time.monotonic() - t0
        polls = client.stats.polls - polls0
        result |= {
            "plain_polls": polls,
            "plain_polls_per_second": round(polls / elapsed, 1),
            "server_cpu_ms_per_plain_poll": round(1000 * (cpu1 - cpu0) / polls, 3),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=500, help="connections at once")
    parser.add_argument("--poll-interval", type=int, default=600, help="the server's, seconds")
    parser.add_argument("--max-time", type=float, default=900, help="give up after, seconds")
    parser.add_argument("--no-poll-phase", dest="poll_phase", action="store_false")
    parser.add_argument(
        "--pin-cores", action="store_true", help="server on one core, fleet on another"
    )
    parser.add_argument("--uvloop", action="store_true", help="run the fleet on uvloop")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    server_core, client_core = two_cores() if args.pin_cores else (None, None)
    if client_core is not None:
        os.sched_setaffinity(0, {client_core})
    work = Path(tempfile.mkdtemp(prefix="dynupdate-rollout-"))
    home = work / "home"
    server = Serve(home, core=server_core, args=["--poll-interval", str(args.poll_interval)])
    try:
        package = work / "gs-6.2.2.pup"
        package.write_bytes(os.urandom(64 * 1024))
        admin(home, "package", "add", str(package), "--type", "GroupSeries", "--version", "6.2.2")
        admin(home, "policy", "set", "GroupSeries", "--version", "6.2.2")
        if args.uvloop:
            import uvloop

            result = uvloop.run(rollout(args, server))
        else:
            result = asyncio.run(rollout(args, server))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    result["cores"] = os.cpu_count()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{result['endpoints']} endpoints, {result['concurrency']} connections at once, "
        f"one server worker, {result['cores']} cores"
    )
    print(
        f"rollout: {result['rollout_seconds']:.1f} s to 100 % installed "
        f"(50 % at {result['time_to_50_percent']} s, 90 % at {result['time_to_90_percent']} s); "
        f"done={result['done']}"
    )
    print(
        f"  {result['polls']} polls ({result['polls_per_second']}/s), "
        f"{result['requests']} requests ({result['requests_per_second']}/s) "
        f"on {result['connections']} TLS connections; errors {result['errors'] or 'none'}"
    )
    print(
        f"  server CPU {result['server_cpu_seconds']} s: "
        f"{result['server_cpu_ms_per_update_cycle']} ms per update cycle "
        f"(poll + 3 reports + HEAD), {result['server_cpu_ms_per_request']} ms per request; "
        f"the simulator used {result['simulator_cpu_seconds']} s"
    )
    if "plain_polls" in result:
        print(
            f"plain polls: {result['plain_polls']} at {result['plain_polls_per_second']}/s, "
            f"server CPU {result['server_cpu_ms_per_plain_poll']} ms per poll (new TLS each)"
        )


if __name__ == "__main__":
    main()
