from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from helpers import ServerProcess
from hypothesis import HealthCheck, settings
from typer.testing import CliRunner

from dynupdate.cli import app
from dynupdate.core.home import open_home

# Temp files go to RAM when the machine has room for them (and nobody chose a
# place): every committed transaction of a temp home fsyncs, which costs
# milliseconds on a disk and nothing on tmpfs. A test of 300 polls, one
# transaction each: 0.27 s on this machine's idle disk, 4 s while other work
# shared it, 0.09 s in RAM either way. The code under test still calls fsync;
# only a power cut could tell, and no test makes one.
MEMORY_TEMP = Path("/dev/shm")
MEMORY_TEMP_FREE = 2 << 30  # the suite keeps well under 1 GiB at once


# No clock in a property: an example is judged by what it returns, never by the
# 200 ms it may take on a busy machine (the suite runs on every core at once),
# where hypothesis's default deadline and slow-data check would fail it at random.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")


def pytest_configure(config: pytest.Config) -> None:
    chosen = config.option.basetemp or {"TMPDIR", "PYTEST_DEBUG_TEMPROOT"} & set(os.environ)
    if chosen or not os.access(MEMORY_TEMP, os.W_OK | os.X_OK):
        return
    free = os.statvfs(MEMORY_TEMP)
    if free.f_bavail * free.f_frsize < MEMORY_TEMP_FREE:
        return
    # Before any temp path exists: pytest's base, the servers and CLIs the
    # tests start (and the xdist workers) all read it.
    os.environ["TMPDIR"] = str(MEMORY_TEMP)
    tempfile.tempdir = None  # gettempdir() caches; read TMPDIR again


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that take seconds run first, the longest first; the others keep their order.

    `make test` spreads the suite over xdist workers: a test of 20 s handed out
    last would leave the other workers idle until it ends.
    """
    items.sort(key=_expected_length)


def _expected_length(item: pytest.Item) -> int:
    """0: marked slow (5 s or more); 1: starts a server process (a second or more); 2: others."""
    if item.get_closest_marker("slow") is not None:
        return 0
    return 1 if "start_server" in getattr(item, "fixturenames", ()) else 2


@pytest.fixture(autouse=True)
def home_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own home, as DYNUPDATE_HOME."""
    home = tmp_path / "home"
    monkeypatch.setenv("DYNUPDATE_HOME", str(home))
    monkeypatch.delenv("DYNUPDATE_DEBUG", raising=False)
    return home


@pytest.fixture
def home(home_dir: Path):
    opened = open_home(home_dir)
    yield opened
    opened.close()


class Cli:
    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str, code: int = 0):
        result = self.runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == code, (
            f"exit {result.exit_code} != {code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        )
        return result

    def json(self, *args: str):
        return json.loads(self(*args, "--json").stdout)


@pytest.fixture
def cli() -> Cli:
    return Cli()


@pytest.fixture
def make_file(tmp_path: Path):
    """Write a package file with the given content; returns its path."""
    counter = iter(range(10_000))

    def make(content: bytes | str = b"package", name: str | None = None) -> Path:
        if isinstance(content, str):
            content = content.encode()
        path = tmp_path / "files" / (name or f"pkg-{next(counter)}.bin")
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        return path

    return make


@pytest.fixture
def start_server():
    servers: list[ServerProcess] = []

    def start(home: Path, *args: str, cafile: Path | None = None) -> ServerProcess:
        server = ServerProcess(home, *args, cafile=cafile)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
