"""``dynupdate serve`` as the benchmarks run it: a subprocess on 127.0.0.1, port 0, one worker.

The port and the certificate fingerprint come from the lines ``serve`` prints
on stderr ("Serving https://127.0.0.1:PORT", "… (for --pin): HEX"); the rest
of stderr is drained in a thread and kept (the last lines, and every line after
start-up, which a server run with ``--no-access-log`` should not print).
CPU time and RSS are read from ``/proc`` for the process and its children.

    with Serve(home, core=0) as server:          # pinned to CPU 0 with sched_setaffinity
        print(server.url, server.pin, server.cpu_seconds(), server.rss_kib())
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Run as ``python -c PIN CORE COMMAND…``: pins itself, then becomes COMMAND (same pid),
# so every thread the command starts inherits the CPU; no taskset needed.
_PIN = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); os.execvp(sys.argv[2], sys.argv[2:])"  # noqa: E501
_SERVING = re.compile(r"Serving https://127\.0\.0\.1:(\d+)")
_PIN_LINE = re.compile(r"\(for --pin\): ([0-9a-f]{64})")


def two_cores() -> tuple[int | None, int | None]:
    """(server CPU, client CPU): two different CPUs this process may use, or (None, None)."""
    cores = sorted(os.sched_getaffinity(0))
    return (cores[0], cores[1]) if len(cores) >= 2 else (None, None)


def pinned(command: Sequence[str], core: int | None) -> list[str]:
    """``command`` started on CPU ``core`` (as is, for None)."""
    if core is None:
        return list(command)
    return [sys.executable, "-c", _PIN, str(core), *command]


def taskset(core: int | None) -> list[str]:
    """The ``taskset`` prefix that starts a command on CPU ``core`` (none for None).

    For tools (nginx, wrk, ab) whose printed command lines are meant to be rerun by hand.
    """
    return ["taskset", "-c", str(core)] if core is not None else []


def admin(home: Path, *args: str) -> str:
    """One ``python -m dynupdate --home H --quiet …`` command; its stdout. Exits if it fails."""
    command = [sys.executable, "-m", "dynupdate", "--home", str(home), "--quiet", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{result.stderr}")
    return result.stdout


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (a multi-worker server's workers)."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime+stime of each process (all its threads) plus its waited-for children."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += sum(int(v) for v in fields[11:15])  # fields 14-17: utime stime cutime cstime
    return total / CLK_TCK


def cpu_times(core: int | None) -> list[int]:
    """The /proc/stat line of one CPU (all CPUs for None): user nice system idle … steal."""
    name = "cpu" if core is None else f"cpu{core}"
    with open("/proc/stat") as f:
        for line in f:
            fields = line.split()
            if fields[0] == name:
                return [int(v) for v in fields[1:9]]
    return [0] * 8


def interference(before: list[int], after: list[int], used: float) -> tuple[float, float]:
    """(others, steal): shares of a CPU's time between two :func:`cpu_times` readings used
    by processes other than the measured ones (``used`` CPU seconds), and taken by the
    hypervisor. Both 0 on a quiet machine."""
    delta = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(delta) or 1
    busy = (delta[0] + delta[1] + delta[2] + delta[5] + delta[6]) / CLK_TCK
    return max(0.0, busy - used) / (total / CLK_TCK), delta[7] / total


def rss_parts(pids: Sequence[int]) -> dict[str, int]:
    """The sums of VmRSS and its parts (RssAnon: the heap; RssFile: mapped files, code;
    RssShmem: shared memory such as SQLite's ``-shm``) of the processes, in KiB."""
    total = dict.fromkeys(("VmRSS", "RssAnon", "RssFile", "RssShmem"), 0)
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in total:
                    total[key] += int(line.split()[1])
    return total


def open_fds(pids: Sequence[int]) -> int:
    """The number of open file descriptors of the processes (sockets included)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


class Serve:
    """``dynupdate --home HOME serve --host 127.0.0.1 --port 0 --workers N --no-access-log …``.

    ``core`` pins the server (and every worker and thread) to one CPU; ``args``
    are more ``serve`` options. Raises SystemExit when the server does not start.
    """

    def __init__(
        self,
        home: Path,
        *,
        core: int | None = None,
        workers: int = 1,
        args: Sequence[str] = (),
        timeout: float = 60,
    ) -> None:
        self.core = core
        self.command = [
            sys.executable, "-m", "dynupdate", "--home", str(home), "serve",
            "--host", "127.0.0.1", "--port", "0", "--workers", str(workers),
            "--no-access-log", *args,
        ]  # fmt: skip
        self.log: deque[str] = deque(maxlen=200)  # the last lines of stderr
        self.after_start: list[str] = []  # stderr lines printed once serving (capped)
        self.after_start_count = 0
        self.pin: str | None = None
        self.port = 0
        self.process = subprocess.Popen(
            pinned(self.command, core), stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        deadline = time.monotonic() + timeout
        try:
            while not self.port and time.monotonic() < deadline:
                line = self.process.stderr.readline()
                if not line:
                    raise SystemExit("dynupdate serve exited:\n" + "".join(self.log))
                self.log.append(line)
                if match := _PIN_LINE.search(line):
                    self.pin = match[1]
                if match := _SERVING.search(line):
                    self.port = int(match[1])
            if not self.port:
                raise SystemExit(f"dynupdate serve did not start in {timeout:g} s")
        except BaseException:
            self.stop()
            raise
        self.url = f"https://127.0.0.1:{self.port}"
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()

    def _read_log(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)
            self.after_start_count += 1
            if len(self.after_start) < 1000:
                self.after_start.append(line)

    @property
    def shown(self) -> str:
        """The command, as printed in a benchmark's figures."""
        where = f"   (on CPU {self.core})" if self.core is not None else ""
        return shlex.join(self.command) + where

    def pids(self) -> list[int]:
        return [self.process.pid, *children(self.process.pid)]

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids())

    def rss_kib(self) -> int:
        return rss_parts(self.pids())["VmRSS"]

    def rss_parts(self) -> dict[str, int]:
        return rss_parts(self.pids())

    def open_fds(self) -> int:
        return open_fds(self.pids())

    def stop(self) -> int:
        """SIGTERM, wait for a clean exit (SIGKILL after 30 s); the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> Serve:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
