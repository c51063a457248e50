from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ServerProcess
from typer.testing import CliRunner

from dynupdate.cli import app
from dynupdate.core.home import open_home


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
