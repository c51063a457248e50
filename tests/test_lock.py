"""One home, one server: a second serve, or a restore, is refused while one runs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynupdate.core.db import DB_NAME
from dynupdate.core.home import LOCK_NAME


def serve(home: Path, *args: str) -> subprocess.CompletedProcess:
    """A second ``serve`` that is expected to refuse: it returns instead of serving."""
    command = [sys.executable, "-m", "dynupdate", "--home", str(home), "serve", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def wait_unlocked(home: Path, deadline: float = 10) -> None:
    """Poll the home's lock until no process holds it."""
    fd = os.open(home / LOCK_NAME, os.O_RDONLY)
    try:
        poll_until(lambda: _lock_free(fd), deadline, "the lock of a killed server stays held")
    finally:
        os.close(fd)


def _lock_free(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def wait_gone(pid: int, deadline: float = 10) -> None:
    """Poll until the process (a worker, reaped by init once orphaned) has exited."""

    def gone() -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        return stat.rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped

    poll_until(gone, deadline, f"the worker {pid} outlived its supervisor")


def poll_until(condition, deadline: float, failure: str) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, failure
        time.sleep(0.05)


def test_second_serve_on_the_same_home_names_the_supervisor(start_server, home_dir):
    first = start_server(home_dir, "--workers", "2")
    result = serve(home_dir, "--host", "127.0.0.1", "--port", "0", "--workers", "2")
    assert result.returncode == 1, result.stderr
    assert f"in use by dynupdate serve (PID {first.process.pid})" in result.stderr
    assert "Serving" not in result.stderr and "Traceback" not in result.stderr
    status, _, _ = first.request("GET", "/")
    assert status == 404, "the first server still answers"
    first.assert_alive()


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_second_serve_on_the_same_port_names_address_and_port(
    start_server, home_dir, tmp_path, host, workers
):
    """Another home on the port of a running server: a wildcard address overlaps it too."""
    first = start_server(home_dir, "--workers", "2")
    result = serve(tmp_path / "other", "--host", host, "--port", str(first.port),
                   "--workers", workers)
    assert result.returncode == 1, result.stderr
    assert f"already listens on {host} port {first.port}" in result.stderr
    assert "Serving" not in result.stderr and "Traceback" not in result.stderr
    first.assert_alive()


def test_kill_9_of_the_server_releases_the_home(start_server, home_dir):
    """The kernel drops the lock: the workers stop with the supervisor, nothing stale remains."""
    first = start_server(home_dir, "--workers", "2")
    pid = first.process.pid
    workers = [int(w) for w in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    assert len(workers) == 2
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    try:
        for worker in workers:
            wait_gone(worker)
    finally:
        for worker in workers:  # orphans of a failed run must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
    wait_unlocked(home_dir)
    # The same port: no orphaned worker listens there any more.
    second = start_server(home_dir, "--workers", "2", "--port", str(first.port))
    assert second.port == first.port
    status, _, _ = second.request("GET", "/")
    assert status == 404


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_restore_is_refused_while_serving(cli, start_server, home_dir, tmp_path, make_file, force):
    cli("package", "add", make_file(b"pkg"), "--type", "Trio", "--version", "1.0")
    cli("backup", tmp_path / "backup")
    cli("policy", "set", "Trio", "--version", "1.0")
    server = start_server(home_dir)
    before = (home_dir / DB_NAME).read_bytes()
    error = cli("restore", tmp_path / "backup", *force, code=1).stderr
    assert f"in use by dynupdate serve (PID {server.process.pid})" in error
    assert "--force does not override" in error
    assert (home_dir / DB_NAME).read_bytes() == before
    assert not (home_dir / (DB_NAME + ".restoring")).exists()
    assert cli.json("policy", "show", "Trio")["version_to_use"] == "1.0"
    server.assert_alive()
