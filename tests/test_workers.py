"""The supervisor: a worker that keeps exiting stops the server with one clear line."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from test_lock import poll_until


def _workers(pid: int) -> set[int]:
    try:
        return {int(w) for w in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except FileNotFoundError:
        return set()  # the supervisor has exited


def test_a_worker_that_keeps_exiting_stops_the_server_with_exit_1(start_server, home_dir):
    server = start_server(home_dir, "--workers", "2")
    pid = server.process.pid
    killed: set[int] = set()
    end = time.monotonic() + 60
    # Two workers may be restarted six times a minute; the seventh exit stops the server.
    while server.process.poll() is None:
        assert time.monotonic() < end, "the server kept restarting workers"
        fresh = _workers(pid) - killed
        for worker in fresh:
            killed.add(worker)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
        if not fresh:
            poll_until(lambda: _workers(pid) - killed or server.process.poll() is not None, 10,
                       "no worker was restarted")
    assert server.process.wait() == 1
    server._reader.join(timeout=5)
    log = "".join(server.log)
    assert "Error: The server stopped: workers keep exiting; see the errors above.\n" in log, log
    assert "unexpected" not in log and "Traceback" not in log, log
    assert len(killed) >= 7
