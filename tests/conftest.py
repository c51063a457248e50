from __future__ import annotations

import http.client
import json
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
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


class ServerProcess:
    """``dynupdate serve`` as a real subprocess on 127.0.0.1, port chosen by the kernel."""

    def __init__(self, home: Path, *args: str, cafile: Path | None = None) -> None:
        """``cafile``: what clients trust (default: the self-signed certificate made in home)."""
        self.home = home
        command = [sys.executable, "-m", "dynupdate", "--home", str(home), "serve",
                   "--host", "127.0.0.1", "--port", "0", "--workers", "1", *args]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self.port = self._wait_ready(deadline=time.monotonic() + 30)
        self.cafile = cafile or home / "tls" / "server.crt"
        self.context = ssl.create_default_context(cafile=str(self.cafile))
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _wait_ready(self, deadline: float) -> int:
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                raise RuntimeError(f"server exited: {''.join(self.log)}")
            self.log.append(line)
            if match := re.search(r"Serving https://127\.0\.0\.1:(\d+)", line):
                return int(match.group(1))
        raise RuntimeError("server did not start in time")

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)

    def connection(self, timeout: float = 10) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context,
                                           timeout=timeout)

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict | None = None):
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def assert_alive(self) -> None:
        assert self.process.poll() is None, "the server died:\n" + "".join(self.log[-30:])

    def assert_no_traceback(self) -> None:
        """Nothing the server wrote on stderr was a Python traceback."""
        assert not any("Traceback" in line for line in self.log), "".join(self.log)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)
        self.process.stderr.close()


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
