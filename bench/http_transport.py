"""Server CPU per request of dynupdate's HTTP/TLS transport, with a trivial app.

The server (dynupdate.server.workers.run, one process) is pinned to one core, the load
clients to another; the server's CPU time comes from /proc/<pid>/schedstat
(nanoseconds; /proc/<pid>/stat as a fallback). Two modes:

- keep-alive: each client sends its polls one after another on one connection;
- new-tls: each poll opens a new TLS connection (full handshake, no session
  resumption), as real endpoints do, and closes it.

The app answers every request with the same 200-byte XML document, so the
figures are the transport's cost (parsing, TLS, the event loop), not the
poll logic's.

    .venv/bin/python bench/http_transport.py                 # defaults below
    .venv/bin/python bench/http_transport.py --requests 50000 --connections 5000
    .venv/bin/python bench/http_transport.py --loop asyncio    # without uvloop
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _server import taskset  # noqa: E402

BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<pollResponse protocol="1" pollInterval="60" serverTime="2026-11-27T16:00:00Z">'
    b'<noUpdate serial="8211ABC" type="GroupSeries" reason="up-to-date"/></pollResponse>'
)
assert len(BODY) == 200, len(BODY)
POLL = (
    b'<poll protocol="1"><endpoint serial="8211ABC" type="GroupSeries" '
    b'version="6.2.1.1-600021" model="RealPresence Group 500" in-call="false"/></poll>'
)
REQUEST = (
    b"POST /poll HTTP/1.1\r\nHost: localhost:8443\r\nContent-Type: application/xml\r\n"
    b"User-Agent: endpoint/6.2\r\nContent-Length: %d\r\n" % len(POLL)
)


def serve(args: argparse.Namespace) -> None:
    """The server process: prints its port, serves until SIGTERM."""
    from dynupdate.server.messages import Response
    from dynupdate.server.tls import server_context
    from dynupdate.server.workers import run

    answer = Response(200, [("Content-Type", "application/xml")], BODY)

    async def app(request):
        return answer

    def ready(addresses):
        print(addresses[0][1], flush=True)

    ctx = None if args.plain else server_context(args.cert, args.key)
    run(lambda: app, "127.0.0.1", 0, ctx, ready=ready, loop=args.loop, max_connections=100_000)


def client(args: argparse.Namespace) -> None:
    """One load client: --count requests in --mode, then exit."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    address = ("127.0.0.1", args.port)

    def open_connection():
        sock = socket.create_connection(address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock if args.plain else ctx.wrap_socket(sock, server_hostname="localhost")

    keep = REQUEST + b"\r\n" + POLL
    close = REQUEST + b"Connection: close\r\n\r\n" + POLL
    if args.mode == "keep-alive":
        sock = open_connection()
        buffer = b""
        for _ in range(args.count):
            sock.sendall(keep)
            buffer = _read_response(sock, buffer)
        sock.close()
    else:
        for _ in range(args.count):
            sock = open_connection()
            sock.sendall(close)
            _read_response(sock, b"")
            sock.close()


def _read_response(sock, buffer: bytes) -> bytes:
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            at = buffer.find(b"Content-Length: ", 0, end)
            length = int(buffer[at + 16 : buffer.find(b"\r\n", at)])
            total = end + 4 + length
            if len(buffer) >= total:
                if not buffer.startswith(b"HTTP/1.1 200 "):
                    raise SystemExit(f"unexpected answer: {buffer[:100]!r}")
                return buffer[total:]
        data = sock.recv(65536)
        if not data:
            raise SystemExit("the server closed the connection")
        buffer += data


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(args, server_pid, port, mode, total, client_core) -> tuple[float, float]:
    per_client = max(1, total // args.concurrency)
    command = [sys.executable, __file__, "_client", "--port", str(port), "--mode", mode]
    command += ["--count", str(per_client)] + (["--plain"] if args.plain else [])
    cpu0, wall0 = cpu_seconds(server_pid), time.perf_counter()
    clients = [subprocess.Popen(taskset(client_core) + command) for _ in range(args.concurrency)]
    for process in clients:
        if process.wait() != 0:
            raise SystemExit("a load client failed")
    wall = time.perf_counter() - wall0
    cpu = cpu_seconds(server_pid) - cpu0
    return cpu / (per_client * args.concurrency), per_client * args.concurrency / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", nargs="?", default="bench", choices=["bench", "_server", "_client"])
    parser.add_argument("--requests", type=int, default=40_000, help="keep-alive requests")
    parser.add_argument("--connections", type=int, default=4_000, help="new-TLS requests")
    parser.add_argument("--concurrency", type=int, default=4, help="client processes")
    parser.add_argument(
        "--loop", default="auto", choices=["auto", "uvloop", "asyncio"], help="event loop"
    )
    parser.add_argument("--plain", action="store_true", help="plain HTTP (no TLS)")
    parser.add_argument("--port", type=int)
    parser.add_argument("--mode")
    parser.add_argument("--count", type=int)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    if args.role == "_server":
        serve(args)
        return
    if args.role == "_client":
        client(args)
        return

    from dynupdate.server.tls import ensure_self_signed

    cores = sorted(os.sched_getaffinity(0))
    if shutil.which("taskset") and len(cores) >= 2:
        server_core, client_core = cores[0], cores[1]
    else:
        server_core = client_core = None
        print("note: taskset or a second core is missing; server and clients are not pinned")
    home = Path(tempfile.mkdtemp(prefix="dynupdate-bench-"))
    try:
        cert, key = ensure_self_signed(home)  # ECDSA P-256, as served in production
        command = [sys.executable, __file__, "_server", "--cert", str(cert), "--key", str(key)]
        command += ["--loop", args.loop] + ["--plain"] * args.plain
        server = subprocess.Popen(taskset(server_core) + command, stdout=subprocess.PIPE, text=True)
        try:
            port = int(server.stdout.readline())
            from dynupdate.server.workers import loop_factory

            loop = "asyncio" if loop_factory(args.loop) is None else "uvloop"
            tls = "plain HTTP" if args.plain else "TLS, ECDSA P-256"
            print(f"server pid {server.pid} on core {server_core}, clients on core {client_core}")
            print(f"{loop}, {tls}, {args.concurrency} client processes, 200-byte answers")
            measure(args, server.pid, port, "keep-alive", 2000, client_core)  # warm-up
            runs = [("keep-alive", args.requests), ("new-tls", args.connections)]
            for mode, total in runs:
                if args.plain and mode == "new-tls":
                    mode = "new-tcp"
                per_request, rate = measure(
                    args, server.pid, port, mode.replace("tcp", "tls"), total, client_core
                )
                print(
                    f"{mode:>10}: {per_request * 1e6:8.1f} µs server CPU/request"
                    f"   {rate:8.0f} requests/s   ({total} requests)"
                )
            print(f"server RSS {rss_mib(server.pid):.1f} MiB")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
