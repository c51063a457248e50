"""Run the benchmarks one after another with short settings, printing each one's figures.

``make bench`` runs this. Each benchmark is its own script in bench/, run as a
subprocess with this interpreter, its output shown as it comes; a summary of
times and exit statuses ends the run, which exits 1 if any benchmark failed
(the soak fails on an error or RSS growth). The benchmarks that need Debian
packages (poll_server.py: wrk, ab, nginx) run only when those are installed.
With the settings below the whole run takes about 10 minutes.

    .venv/bin/python bench/run_all.py                       # every benchmark that can run here
    .venv/bin/python bench/run_all.py --only soak,rollout   # some of them
    .venv/bin/python bench/run_all.py --skip overview_1m --soak-minutes 10
    .venv/bin/python bench/run_all.py --list
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bench:
    name: str
    args: tuple[str, ...]  # the short settings used here
    about: str
    tools: tuple[str, ...] = ()  # programs from Debian packages it needs


BENCHES = (
    Bench("package_import", ("--size", "256M"), "package add vs sha256sum on one file"),
    Bench("http_transport", (), "the HTTP/TLS transport alone, trivial app"),
    Bench("overview_1m", ("--repeat", "3"), "fleet views with 1,000,000 endpoints"),
    Bench("endpoint_writes", (), "a poll's row update, 1,000 vs 1,000,000 endpoints"),
    Bench("rollout", ("--pin-cores",), "a 10,000-endpoint rollout through one server"),
    Bench("soak", ("--minutes", "1"), "polls and reports at half the peak; errors, RSS"),
    Bench("metrics_cost", ("--repeat", "10"), "serve --metrics: instrument calls per request"),
    Bench(
        "poll_server",
        ("--seconds", "5", "--repeat", "1"),
        "server CPU per poll next to nginx",
        tools=("wrk", "ab", "nginx"),
    ),
)
INSTALL = "apt-get update && apt-get install -y wrk apache2-utils nginx-light"


def pick(names: str | None, option: str) -> set[str]:
    if names is None:
        return set()
    chosen = {n.strip().removesuffix(".py") for n in names.split(",") if n.strip()}
    unknown = chosen - {b.name for b in BENCHES}
    if unknown:
        known = ", ".join(b.name for b in BENCHES)
        raise SystemExit(f"Unknown benchmark in {option}: {', '.join(sorted(unknown))}. "
                         f"Known: {known}.")  # fmt: skip
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated benchmarks to run (default: all)")
    parser.add_argument("--skip", help="comma-separated benchmarks not to run")
    parser.add_argument("--soak-minutes", type=float, default=1, help="length of the soak")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args()
    only, skip = pick(args.only, "--only"), pick(args.skip, "--skip")
    if args.list:
        for b in BENCHES:
            needs = f"  (needs {', '.join(b.tools)})" if b.tools else ""
            print(f"{b.name:<16}{b.about}{needs}\n{'':<16}bench/{b.name}.py {shlex.join(b.args)}")
        return 0

    results: list[tuple[str, str, float]] = []
    for b in BENCHES:
        if (only and b.name not in only) or b.name in skip:
            continue
        missing = [tool for tool in b.tools if shutil.which(tool) is None]
        if missing:
            print(f"\n== {b.name}: skipped, {', '.join(missing)} missing. To run it: {INSTALL}"
                  " (see bench/README.md)", flush=True)  # fmt: skip
            results.append((b.name, "skipped", 0.0))
            continue
        bench_args = list(b.args)
        if b.name == "soak":
            bench_args = ["--minutes", f"{args.soak_minutes:g}"]
        command = [sys.executable, str(BENCH / f"{b.name}.py"), *bench_args]
        print(f"\n== {b.name}: {b.about}\n   {shlex.join(command)}", flush=True)
        started = time.monotonic()
        try:
            code = subprocess.run(command, cwd=BENCH.parent, timeout=30 * 60).returncode
        except subprocess.TimeoutExpired:
            code = "timed out after 30 min"
        took = time.monotonic() - started
        results.append((b.name, "ok" if code == 0 else f"FAILED ({code})", took))

    print("\n== summary")
    for name, outcome, took in results:
        print(f"{name:<16}{outcome:<24}{took:7.0f} s")
    print(f"{'total':<40}{sum(t for _, _, t in results):7.0f} s")
    return 1 if any(o.startswith("FAILED") for _, o, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
