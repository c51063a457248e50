"""The test suite's own server harness: it gives up on a server that never gets ready."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trustme
from helpers import ServerProcess


class Scripted(ServerProcess):
    """A stand-in "server": a Python child running ``script`` instead of ``dynupdate serve``."""

    started: list[Scripted]

    def __init__(self, script: str, timeout: float, cafile: Path | None = None) -> None:
        self.script = script
        Scripted.started.append(self)
        super().__init__(Path("unused"), timeout=timeout, cafile=cafile)

    def command(self, home: Path, args: tuple[str, ...]) -> list[str]:
        return [sys.executable, "-c", self.script]


@pytest.fixture(autouse=True)
def started():
    Scripted.started = []
    yield Scripted.started
    for server in Scripted.started:
        assert server.process.poll() is not None, "the harness left its child running"


def test_a_silent_server_is_given_up_on_at_the_deadline():
    # Without select on the pipe, readline waits for the child's first line (or
    # its exit, 30 s away) and fails with "server exited" instead.
    with pytest.raises(RuntimeError, match="did not start in time"):
        Scripted("import time; time.sleep(30)", timeout=0.5)


def test_half_a_line_is_not_waited_for_either():
    script = (
        "import sys, time; sys.stderr.write('Serving https'); sys.stderr.flush(); time.sleep(30)"
    )
    with pytest.raises(RuntimeError, match="did not start in time"):
        Scripted(script, timeout=0.5)


def test_a_server_that_exits_is_reported_with_its_output():
    with pytest.raises(RuntimeError, match="server exited: no home here"):
        Scripted("import sys; sys.exit('no home here')", timeout=30)


def test_the_port_comes_from_the_ready_line_even_split_across_writes(tmp_path):
    script = (
        "import sys, time\n"
        "sys.stderr.write('Certificate fingerprint: ab\\nServing https://127.0.0.1:'); "
        "sys.stderr.flush(); time.sleep(0.05)\n"
        "sys.stderr.write('4431 (1 worker)\\n'); sys.stderr.flush(); time.sleep(30)\n"
    )
    cafile = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(cafile))
    server = Scripted(script, timeout=30, cafile=cafile)
    assert server.port == 4431
    assert server.log == [
        "Certificate fingerprint: ab\n",
        "Serving https://127.0.0.1:4431 (1 worker)\n",
    ]
    server.stop()
