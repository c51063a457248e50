"""Server CPU per poll of ``dynupdate serve``, next to nginx serving a static file, on one core.

What it does, in order:

1. makes a temporary home through the CLI (``python -m dynupdate --home H …``):
   two GroupSeries packages and an exact policy (plus the other types of
   bench/overview_1m.py), then pre-fills N endpoints with sqlite3
   ``executemany`` in the schema the server writes (``--endpoints``; several
   values compare fleet sizes);
2. starts ``dynupdate serve --workers 1 --no-access-log`` pinned to CPU 0 and
   reads its port from the "Serving https://127.0.0.1:PORT" line; starts
   nginx (1 worker, CPU 0) serving a static 500-byte file over TLS with the
   same ECDSA P-256 certificate (the one ``serve`` made in the home);
3. runs the load clients pinned to CPU 1:
   - keep-alive: ``wrk`` with bench/poll.lua, each poll from another endpoint
     of a pool of 10,000 (real endpoint writes: update offers and up-to-date
     answers, half each);
   - new TLS connection per poll: ``ab`` without ``-k`` (a full handshake per
     request: ab never resumes sessions), one poll body;
   - the same two loads against nginx (``POST`` answered with the file, via
     ``error_page 405 =200``);
   - at half the peak poll rate, for latency: wrk with an exponential think
     time per connection (bench/poll.lua ``POLL_DELAY_MS``) for keep-alive, and
     ab in closed loop with the fewest connections that reach half the peak for
     new connections (a client handshake costs ab ~1 ms of CPU, so no client on
     one core paces new connections well in open loop); nginx gets the same
     loads, which shows the client's share of the latency;
4. reads the servers' CPU time (utime+stime+cutime+cstime, all threads, from
   ``/proc/<pid>/stat``; nginx: master and worker) before and after each run
   and prints requests/s, µs of server CPU per request, the ratio to nginx in
   the same mode, and p50/p99 latency. Each run is repeated; medians are shown.

It installs nothing: see bench/README.md for the Debian packages.

    .venv/bin/python bench/poll_server.py                              # 1,000 endpoints
    .venv/bin/python bench/poll_server.py --endpoints 1000,1000000 --seconds 10
    .venv/bin/python bench/poll_server.py --keys 100000     # every update offer carries a key
    .venv/bin/python bench/poll_server.py --rollout          # a rollout runs on the polled type

With ``--rollout``, a rollout of GroupSeries to a newer package (``ROLLOUT``)
runs while the server is measured: waves 1%,100%, the first open for the whole
run (a 30-day soak, halt rules that never trip). Of the pooled endpoints, one
in ten polls on that version (up-to-date), the others on the stable and the
older version as without it: ~99 % of them are staged or offered the stable
version, ~1 % are admitted and offered the new one (the first offer of each
reserves its attempt, the next ones read it). Pre-filled rows get their bucket
(the gate evaluations every few seconds read it).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from _server import Serve, children, cpu_seconds, cpu_times, interference, taskset  # noqa: E402
from overview_1m import fill_endpoints, set_up_policies  # noqa: E402

TARGET, OLD = "6.2.2.0-100", "6.2.1.1-600021"
ROLLOUT = "6.3.0"  # --rollout: GroupSeries to this version, newer than TARGET
POOL = 10_000
POLL = (
    '<poll protocol="1"><endpoint serial="{serial}" type="GroupSeries" version="{version}"'
    ' model="RealPresence Group 500" in-call="false"/></poll>'
)


# -- processes and CPU time ------------------------------------------------------------


def settle(pids: list[int], limit: float = 3.0) -> float:
    """CPU time once the server has gone quiet (queued endpoint writes flushed)."""
    deadline = time.monotonic() + limit
    last = cpu_seconds(pids)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = cpu_seconds(pids)
        if now == last:
            break
        last = now
    return last


def wait_port(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/xml;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {dir}/www;
        # the static module answers POST with 405: serve the file to it too
        location / {{ error_page 405 =200 $uri; }}
    }}
}}
"""


class Nginx:
    """nginx, one worker, serving a static 500-byte file over TLS."""

    def __init__(self, workdir: Path, cert: Path, key: Path, core: int | None) -> None:
        self.dir = workdir / "nginx"
        (self.dir / "www").mkdir(parents=True)
        body = b'<?xml version="1.0" encoding="UTF-8"?>\n<pollResponse protocol="1">'
        body += b" " * (500 - len(body) - len(b"</pollResponse>\n")) + b"</pollResponse>\n"
        (self.dir / "www" / "poll").write_bytes(body)
        self.port = free_port()
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.dir, port=self.port, cert=cert, key=key))
        self.command = [*taskset(core), "nginx", "-p", str(self.dir), "-c", str(conf),
                        "-e", str(self.dir / "error.log")]  # fmt: skip
        self.process = subprocess.Popen(self.command)
        try:
            wait_port(self.port, self.process)
        except BaseException:
            self.stop()
            raise

    def pids(self) -> list[int]:
        return [self.process.pid, *children(self.process.pid)]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- load clients ------------------------------------------------------------------------


def run_tool(command: list[str], env: dict | None = None, timeout: float = 600) -> str:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(out: str) -> dict:
    requests = int(re.search(r"(\d+) requests in", out)[1])
    percent = {
        p: _ms(v, u) for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    }
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests": requests,
        "rate": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),
        "p50": percent.get("50"),
        "p99": percent.get("99"),
        "bad": int(bad[1]) if bad else 0,
        "errors": errors[1] if errors else "",
    }


def parse_ab(out: str) -> dict:
    percent = dict(re.findall(r"^\s+(\d+)%\s+(\d+)", out, re.M))
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    tls = re.search(r"SSL/TLS Protocol:\s+(\S+)", out)
    key = re.search(r"Server Temp Key:\s+(.+)", out)
    return {
        "requests": int(re.search(r"Complete requests:\s+(\d+)", out)[1]),
        "rate": float(re.search(r"Requests per second:\s+([\d.]+)", out)[1]),
        "p50": float(percent["50"]) if "50" in percent else None,
        "p99": float(percent["99"]) if "99" in percent else None,
        "bad": int(re.search(r"Failed requests:\s+(\d+)", out)[1])
        + (int(non2xx[1]) if non2xx else 0),
        "errors": "",
        "tls": f"{tls[1]} {key[1].strip()}" if tls and key else "",
    }


def wrk_command(port: int, path: str, seconds: float, connections: int, script: bool, core):
    command = [*taskset(core), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script:
        command += ["-s", str(BENCH / "poll.lua")]
    return [*command, f"https://127.0.0.1:{port}{path}"]


def ab_command(port: int, path: str, seconds: float, concurrency: int, body: Path, core):
    return [*taskset(core), "ab", "-q", "-t", str(seconds), "-n", "100000000",
            "-c", str(concurrency), "-p", str(body), "-T", "application/xml",
            f"https://127.0.0.1:{port}{path}"]  # fmt: skip


def measure(server, command: list[str], parse, env: dict | None = None, core=None) -> dict:
    """One load run; adds µs of server CPU per request and how busy the server's CPU was."""
    pids = server.pids()
    settle(pids)
    before = cpu_seconds(pids)
    stat0 = cpu_times(core)
    result = parse(run_tool(command, env))
    stat1 = cpu_times(core)
    used = settle(pids) - before
    result["cpu_us"] = used / max(1, result["requests"]) * 1e6
    # Interference: time the server's CPU spent on other processes, and time the
    # hypervisor took from it (steal), as shares of the run.
    result["others"], result["steal"] = interference(stat0, stat1, used)
    return result


# -- the bench --------------------------------------------------------------------------


def versions() -> list[str]:
    def first_line(command: list[str]) -> str:
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except OSError as e:
            return f"{command[0]}: {e}"
        return (result.stdout + result.stderr).strip().splitlines()[0]

    return [
        f"python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, sqlite {sqlite3.sqlite_version}",
        first_line(["wrk", "-v"]),
        first_line(["ab", "-V"]),
        first_line(["nginx", "-v"]),
        f"{os.cpu_count()} cpus: {_cpu_model()}",
    ]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def median_of(runs: list[dict]) -> dict:
    out = {}
    for key in ("requests", "rate", "cpu_us", "p50", "p99", "bad", "others", "steal"):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["runs"] = runs
    out["notes"] = "; ".join(sorted({r["errors"] for r in runs if r.get("errors")}))
    out["tls"] = next((r["tls"] for r in runs if r.get("tls")), "")
    return out


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--endpoints", default="1000", help="endpoints pre-filled; a list (1000,1000000) compares"
    )
    parser.add_argument("--seconds", type=int, default=10, help="length of each run")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each load (median shown)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections at full rate")
    parser.add_argument("--concurrency", type=int, default=16, help="ab concurrency")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx reference")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--keys",
        type=int,
        default=0,
        help="activation keys imported first (serials EP00000000…, the offered version)",
    )
    parser.add_argument(
        "--rollout", action="store_true", help=f"a rollout of GroupSeries to {ROLLOUT} runs"
    )
    args = parser.parse_args()
    sizes = [int(n.replace("_", "")) for n in args.endpoints.split(",")]
    for tool in ("wrk", "ab", *(() if args.no_nginx else ("nginx",))):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: see bench/README.md (apt-get install …)")
    cores = sorted(os.sched_getaffinity(0))
    if shutil.which("taskset") and len(cores) >= 2:
        server_core, client_core = cores[0], cores[1]
    else:
        server_core = client_core = None
        print("note: taskset or a second core is missing; nothing is pinned")
    args.server_core = server_core

    print("\n".join(versions()))
    print(f"server on CPU {server_core}, load clients on CPU {client_core}; "
          f"{args.seconds} s per run, {args.repeat} runs each, medians shown")  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="dynupdate-pollbench-"))
    results: dict[tuple, dict] = {}
    commands: list[str] = []
    nginx = None
    try:
        body = workdir / "poll.xml"
        body.write_text(POLL.format(serial="EP00000001", version=OLD))
        for size in sizes:
            home = workdir / f"home-{size}"
            set_up_policies(home, workdir)
            took = fill_endpoints(home / "dynupdate.db", size)
            if args.keys:
                import_keys(home, workdir, args.keys)
            if args.rollout:
                start_rollout(home, workdir)
            stride = max(1, size // POOL)
            env = {"POLL_POOL": str(POOL), "POLL_STRIDE": str(stride)}
            if args.rollout:
                env["POLL_NEW"] = ROLLOUT
            print(f"\n== {size:,} endpoints in the database (filled in {took:.1f} s); "
                  f"wrk polls from a pool of {POOL:,} serials, stride {stride}")  # fmt: skip
            server = Serve(home, core=server_core)
            commands.append(server.shown)
            try:
                if nginx is None and not args.no_nginx:
                    cert, key = home / "tls" / "server.crt", home / "tls" / "server.key"
                    nginx = Nginx(workdir, cert, key, server_core)
                    commands.append(" ".join(nginx.command))
                bench_size(args, size, server, nginx, body, env, client_core, results, commands)
                print(f"   endpoint rows written by polls: {_recorded(home):,}")
            finally:
                server.stop()
            if any("Traceback" in line for line in server.log):
                print("   server log:\n" + "".join(list(server.log)[-20:]))
            shutil.rmtree(home, ignore_errors=True)
        report(args, sizes, results, commands, nginx is not None)
    finally:
        if nginx is not None:
            nginx.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def import_keys(home: Path, workdir: Path, count: int) -> None:
    """Keys for the first ``count`` serials at the offered version: every offer carries one."""
    path = workdir / "keys.csv"
    rows = "".join(f"EP{i:08d},{TARGET},KEY-{i:08d}-4f1c9a7e2b\n" for i in range(count))
    path.write_text("serial,version,key\n" + rows)
    command = [sys.executable, "-m", "dynupdate", "--home", str(home), "key", "import", str(path)]
    subprocess.run(command, check=True, capture_output=True)
    print(f"{count:,} activation keys imported")


def start_rollout(home: Path, workdir: Path) -> None:
    """Buckets for the pre-filled rows, then a rollout of GroupSeries to ROLLOUT (see --rollout)."""
    sys.path.insert(0, str(BENCH.parent))
    from dynupdate.core.waves import bucket

    conn = sqlite3.connect(home / "dynupdate.db", isolation_level=None)
    try:
        conn.create_function("bucket", 1, bucket, deterministic=True)
        conn.execute("UPDATE endpoints SET bucket = bucket(coalesce(parent_serial, serial))")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    path = workdir / f"gs-{ROLLOUT}.pup"
    path.write_bytes(f"GroupSeries {ROLLOUT}\n".encode() * 64)
    dynupdate = [sys.executable, "-m", "dynupdate", "--home", str(home)]
    for args in (
        ["package", "add", str(path), "--type", "GroupSeries", "--version", ROLLOUT],
        ["rollout", "start", "GroupSeries", "--version", ROLLOUT, "--waves", "1%,100%",
         "--soak", "30d", "--max-failures", "1000000", "--max-failure-rate", "100%"],
    ):  # fmt: skip
        subprocess.run([*dynupdate, *args], check=True, capture_output=True)
    print(f"rollout of GroupSeries {ROLLOUT} running (waves 1%,100%: the first open)")


def _recorded(home: Path) -> int:
    """Endpoint rows the server wrote: pre-filled rows have 10.x addresses, polls 127.0.0.1."""
    conn = sqlite3.connect(home / "dynupdate.db")
    try:
        query = "SELECT count(*) FROM endpoints WHERE address = '127.0.0.1'"
        return conn.execute(query).fetchone()[0]
    finally:
        conn.close()


def bench_size(args, size, server, nginx, body, env, core, results, commands) -> None:
    seconds = args.seconds
    server_core = args.server_core
    wrk_full = wrk_command(server.port, "/poll", seconds, args.connections, True, core)
    ab_full = ab_command(server.port, "/poll", seconds, args.concurrency, body, core)
    # Warm-up: every pooled endpoint polls once (first sightings are inserts and
    # history rows), the page cache holds the database, the server's caches fill.
    warm = wrk_command(server.port, "/poll", max(5, seconds // 2), args.connections, True, core)
    run_tool(warm, env)
    env_text = " ".join(f"{k}={v}" for k, v in env.items())
    commands.append(f"{env_text} {' '.join(wrk_full)}")
    commands.append(" ".join(ab_full))
    loads = [("keep-alive", "dynupdate", server, wrk_full, parse_wrk, env)]
    loads.append(("new-tls", "dynupdate", server, ab_full, parse_ab, None))
    if nginx is not None and (None, "keep-alive", "nginx") not in results:
        wrk_nginx = wrk_command(nginx.port, "/poll", seconds, args.connections, True, core)
        ab_nginx = ab_command(nginx.port, "/poll", seconds, args.concurrency, body, core)
        commands.append(f"{env_text} {' '.join(wrk_nginx)}")
        commands.append(" ".join(ab_nginx))
        loads.append(("keep-alive", "nginx", nginx, wrk_nginx, parse_wrk, env))
        loads.append(("new-tls", "nginx", nginx, ab_nginx, parse_ab, None))
    runs: dict[tuple, list] = {}
    for _ in range(args.repeat):
        for mode, name, target, command, parse, run_env in loads:
            result = measure(target, command, parse, run_env, server_core)
            runs.setdefault((mode, name), []).append(result)
    for (mode, name), found in runs.items():
        key = (size, mode, name) if name == "dynupdate" else (None, mode, name)
        results[key] = median_of(found)
        print_row(mode, name, results[key])

    # Latency at half the peak rate. Keep-alive: wrk connections that wait an
    # exponential think time between polls; a short first run measures what a
    # cycle costs besides the think time, to aim the rate better.
    half = results[(size, "keep-alive", "dynupdate")]["rate"] / 2
    connections = max(4, round(half * 0.02))  # ~20 ms between one connection's polls
    period = connections / half * 1000  # ms per poll and connection at the target rate
    delay = max(1.0, period - 1.0)
    probe = wrk_command(server.port, "/poll", max(3, seconds // 3), connections, True, core)
    probed = parse_wrk(run_tool(probe, {**env, "POLL_DELAY_MS": f"{delay:.2f}"}))
    overhead = connections / max(probed["rate"], 1) * 1000 - delay
    delay = max(1.0, period - max(0.0, overhead))
    paced_env = {**env, "POLL_DELAY_MS": f"{delay:.2f}"}
    targets = [(server, "dynupdate", size)]
    if nginx is not None and (None, "keep-alive ½", "nginx") not in results:
        targets.append((nginx, "nginx", None))
    for target, name, key in targets:
        command = wrk_command(target.port, "/poll", seconds, connections, True, core)
        commands.append(f"{' '.join(f'{k}={v}' for k, v in paced_env.items())} {' '.join(command)}")
        found = [
            measure(target, command, parse_wrk, paced_env, server_core) for _ in range(args.repeat)
        ]
        results[(key, "keep-alive ½", name)] = median_of(found)
        results[(key, "keep-alive ½", name)]["target"] = half
        print_row("keep-alive ½", name, results[(key, "keep-alive ½", name)])

    # New connections: a client handshake costs ab about 1 ms of CPU (OpenSSL 3.0),
    # so no client on one core paces these well in open loop: ab in closed loop
    # with the fewest connections that reach half the peak rate instead.
    half_tls = results[(size, "new-tls", "dynupdate")]["rate"] / 2
    concurrency = 1
    for concurrency in range(1, args.concurrency + 1):
        command = ab_command(server.port, "/poll", max(3, seconds // 3), concurrency, body, core)
        if parse_ab(run_tool(command))["rate"] >= half_tls * 0.95:
            break
    targets = [(server, "dynupdate", size)]
    if nginx is not None and (None, "new-tls ½", "nginx") not in results:
        targets.append((nginx, "nginx", None))
    for target, name, key in targets:
        command = ab_command(target.port, "/poll", seconds, concurrency, body, core)
        commands.append(" ".join(command))
        found = [measure(target, command, parse_ab, None, server_core) for _ in range(args.repeat)]
        results[(key, "new-tls ½", name)] = median_of(found)
        results[(key, "new-tls ½", name)]["target"] = half_tls
        print_row("new-tls ½", name, results[(key, "new-tls ½", name)])


def print_row(mode: str, name: str, r: dict) -> None:
    rates = ", ".join(f"{x['rate']:.0f}" for x in r["runs"])
    cpus = ", ".join(f"{x['cpu_us']:.0f}" for x in r["runs"])
    print(f"   {mode:<13}{name:<10} {r['rate']:8.0f}/s  {r['cpu_us']:7.0f} µs CPU/req"
          f"   p50 {fmt(r['p50'], '.2f')} ms  p99 {fmt(r['p99'], '.2f')} ms"
          f"   [runs: {rates} /s; {cpus} µs; CPU {r['others'] * 100:.0f}% others,"
          f" {r['steal'] * 100:.0f}% steal]"
          + (f"  bad answers {r['bad']:.0f}" if r["bad"] else "")
          + (f"  ({r['notes']})" if r["notes"] else ""))  # fmt: skip


def report(args, sizes, results, commands, with_nginx: bool) -> None:
    print("\n== Summary (medians)")
    header = (f"{'endpoints':>10}  {'mode':<13}{'server':<10}{'polls/s':>9}{'µs CPU':>9}"
              f"{'x nginx':>9}{'p50 ms':>9}{'p99 ms':>9}{'others':>8}{'steal':>7}")  # fmt: skip
    print(header)
    for size in sizes:
        for mode in ("keep-alive", "new-tls", "keep-alive ½", "new-tls ½"):
            r = results.get((size, mode, "dynupdate"))
            if r is None:
                continue
            ref = results.get((None, mode, "nginx"))
            ratio = r["cpu_us"] / ref["cpu_us"] if ref and ref["cpu_us"] else None
            print(f"{size:>10,}  {mode:<13}{'dynupdate':<10}{r['rate']:9.0f}{r['cpu_us']:9.0f}"
                  f"{fmt(ratio, '9.2f') if ratio else '        —'}"
                  f"{fmt(r['p50'], '9.2f')}{fmt(r['p99'], '9.2f')}"
                  f"{r['others'] * 100:7.0f}%{r['steal'] * 100:6.0f}%")  # fmt: skip
    if with_nginx:
        for mode in ("keep-alive", "new-tls", "keep-alive ½", "new-tls ½"):
            r = results[(None, mode, "nginx")]
            print(f"{'':>10}  {mode:<13}{'nginx':<10}{r['rate']:9.0f}{r['cpu_us']:9.0f}"
                  f"{'1.00':>9}{fmt(r['p50'], '9.2f')}{fmt(r['p99'], '9.2f')}"
                  f"{r['others'] * 100:7.0f}%{r['steal'] * 100:6.0f}%")  # fmt: skip
        tls = results[(None, "new-tls", "nginx")].get("tls")
        if tls:
            print(f"TLS (ab): nginx {tls}; dynupdate "
                  f"{results[(sizes[0], 'new-tls', 'dynupdate')].get('tls')}")  # fmt: skip
    if len(sizes) > 1:
        base = sizes[0]
        for size in sizes[1:]:
            for mode in ("keep-alive", "new-tls"):
                a = results[(base, mode, "dynupdate")]
                b = results[(size, mode, "dynupdate")]
                print(f"{mode}: {size:,} vs {base:,} endpoints: rate x {b['rate'] / a['rate']:.3f},"
                      f" CPU per poll x {b['cpu_us'] / a['cpu_us']:.3f}")  # fmt: skip
    print("others/steal: share of the server CPU's time used by other processes, and taken"
          " by the hypervisor, during the runs (noise; 0% on a quiet machine)")  # fmt: skip
    print("\nhalf rate (½): keep-alive = wrk, each connection waiting an exponential think time"
          " (POLL_DELAY_MS) between polls; new-tls = ab in closed loop with the fewest"
          " connections reaching half the peak; nginx gets the very same load, so its"
          " latency shows the client's and the loopback's share")  # fmt: skip
    for size in sizes:
        for mode in ("keep-alive ½", "new-tls ½"):
            r = results.get((size, mode, "dynupdate"))
            if r:
                print(f"  {size:,} endpoints, {mode}: target {r['target']:.0f}/s, "
                      f"achieved {r['rate']:.0f}/s")  # fmt: skip
    print("\ncommands:")
    for command in commands:
        print("  " + command)


if __name__ == "__main__":
    main()
