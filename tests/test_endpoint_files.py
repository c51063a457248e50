"""The reference endpoint's files: no other local user can redirect or swap a download.

By default the work directory is a fresh ``mkdtemp`` (0700), no longer the
predictable ``/tmp/dynupdate-endpoint/<serial>``. Downloads run against the
real server over HTTPS on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import stat
import tempfile
from pathlib import Path

import pytest
from conftest import ServerProcess
from typer.testing import CliRunner

from dynupdate.cli import app
from dynupdate.endpoint import Endpoint, EndpointClient

CONTENT = os.urandom(200_000)
SHA = hashlib.sha256(CONTENT).hexdigest()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("endpoint-files") / "home"
    running = ServerProcess(home, "--poll-interval", "60", "--no-access-log")
    package = tmp_path_factory.mktemp("package") / "files-2.0.pup"
    package.write_bytes(CONTENT)
    for args in (
        ["package", "add", package, "--type", "Files", "--version", "2.0"],
        ["policy", "set", "Files", "--version", "2.0"],
    ):
        result = CliRunner().invoke(app, ["--home", str(home), *map(str, args)])
        assert result.exit_code == 0, result.output
    yield running
    running.stop()


class Installer:
    """Records what the installer was given, as it was when install began."""

    def __init__(self) -> None:
        self.path: Path | None = None

    async def __call__(self, device, offer, path) -> None:
        self.path = path
        self.mode = stat.S_IMODE(path.lstat().st_mode)
        self.directory_mode = stat.S_IMODE(path.parent.stat().st_mode)
        self.links = path.lstat().st_nlink
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()


def update(server: ServerProcess, serial: str, **options) -> tuple[Endpoint, Installer]:
    installer = Installer()
    endpoint = Endpoint(serial, "Files", "1.0", installer=installer, max_attempts=1, **options)
    client = EndpointClient(f"https://127.0.0.1:{server.port}", cafile=server.cafile)
    asyncio.run(asyncio.wait_for(endpoint.poll_once(client), 30))
    return endpoint, installer


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_default_work_directory_is_private_unpredictable_and_removed(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first, second = Endpoint("AB-1", "T", "1"), Endpoint("AB-1", "T", "1")
    one, two = first._directory(), second._directory()
    assert one != two, "two endpoints, even of one serial, never share a directory"
    assert one.parent == two.parent == tmp_path
    assert "AB-1" not in one.name
    assert mode(one) == 0o700 and one.stat().st_uid == os.geteuid()
    del first
    gc.collect()
    assert not one.exists() and two.exists(), "it goes with its endpoint"


def test_a_symlink_planted_at_the_old_predictable_path_is_not_followed(
    server, monkeypatch, tmp_path
):
    """Another user prepares /tmp/dynupdate-endpoint/<serial>: the device never looks there."""
    shared = tmp_path / "tmp"
    target = tmp_path / "attacker"
    shared.mkdir()
    target.mkdir()
    (shared / "dynupdate-endpoint").mkdir()
    (shared / "dynupdate-endpoint" / "PLANT-1").symlink_to(target)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    endpoint, installer = update(server, "PLANT-1")
    assert (endpoint.device.status, endpoint.device.version) == ("up-to-date", "2.0")
    assert installer.sha256 == SHA
    assert installer.path.parent.parent == shared
    assert installer.path.parent.name.startswith("dynupdate-endpoint-")
    assert list(target.iterdir()) == [], "nothing was written through the planted link"
