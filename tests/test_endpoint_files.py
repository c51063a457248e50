"""The reference endpoint's files: no other local user can redirect or swap a download.

The work directory is private (0700; by default a fresh ``mkdtemp``, no longer
the predictable ``/tmp/dynupdate-endpoint/<serial>``), every file is created
``O_EXCL|O_NOFOLLOW`` and reopened ``O_NOFOLLOW``, so a symlink or hard link
planted at a file's name is replaced, never written through, and the installer
gets the very file that was hashed, read-only. Downloads run against the real
server over HTTPS on 127.0.0.1.
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
from dynupdate.endpoint import Endpoint, EndpointClient, EndpointError
from dynupdate.endpoint.files import FileReceiver
from dynupdate.endpoint.transport import ClientStats

CONTENT = os.urandom(200_000)
SHA = hashlib.sha256(CONTENT).hexdigest()
VICTIM = b"the device user's own file\n"


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


def victim(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(VICTIM)
    return path


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


def test_symlinks_at_the_file_names_are_replaced_never_written_through(server, tmp_path):
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    victims = tmp_path / "victims"
    victims.mkdir()
    for name in (f"{SHA}.part", f"{SHA}.etag", SHA):
        (work / name).symlink_to(victim(victims, name))
    endpoint, installer = update(server, "LINK-1", workdir=work)
    assert (endpoint.device.status, endpoint.device.version) == ("up-to-date", "2.0")
    assert installer.path == work / SHA and installer.sha256 == SHA
    for path in victims.iterdir():
        assert path.read_bytes() == VICTIM, f"{path.name} was written through a symlink"
    assert list(work.iterdir()) == [], "the links were replaced, and the package removed"


def test_a_hard_link_at_the_partial_name_is_not_resumed_into(server, tmp_path):
    """A ``.part`` with another name (and an ETag to resume it) is the user's own file."""
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    own = victim(tmp_path, "profile")
    os.link(own, work / f"{SHA}.part")
    (work / f"{SHA}.etag").write_text(f'"{SHA}"')
    endpoint, installer = update(server, "HARD-1", workdir=work)
    assert own.read_bytes() == VICTIM, "the download was appended to a hard-linked file"
    assert endpoint.device.version == "2.0" and installer.sha256 == SHA


def test_a_symlink_planted_between_unlink_and_create_is_refused(monkeypatch, tmp_path):
    """O_EXCL|O_NOFOLLOW: the race that unlinking first leaves open ends in an error."""
    part, tag = tmp_path / "p.part", tmp_path / "p.etag"
    target = victim(tmp_path, "victim")
    unlink = Path.unlink

    def unlink_then_plant(path: Path, missing_ok: bool = False) -> None:
        unlink(path, missing_ok=missing_ok)
        if path == part:
            path.symlink_to(target)

    monkeypatch.setattr(Path, "unlink", unlink_then_plant)
    receiver = FileReceiver(part, tag, 0, 10, ClientStats())
    with pytest.raises(EndpointError) as refused:
        receiver.begin(200, {"content-length": "10"})
    assert refused.value.kind == "storage"
    assert target.read_bytes() == VICTIM


def test_the_installer_gets_the_hashed_file_read_only_in_a_private_directory(server, tmp_path):
    work = tmp_path / "work"
    work.mkdir(mode=0o755)
    os.chmod(work, 0o777)  # a loose directory is made private before anything is written
    endpoint, installer = update(server, "SEAL-1", workdir=work)
    assert endpoint.device.version == "2.0"
    assert (installer.sha256, installer.mode, installer.links) == (SHA, 0o400, 1)
    assert installer.directory_mode == 0o700 and mode(work) == 0o700
    created = tmp_path / "new" / "work"
    update(server, "SEAL-2", workdir=created)
    assert mode(created) == 0o700


def test_a_file_swapped_after_it_was_hashed_is_never_installed(server, tmp_path, monkeypatch):
    work = tmp_path / "work"
    file_digest = hashlib.file_digest

    def digest_then_swap(file, name):
        digest = file_digest(file, name)
        swapped = work / "swapped"
        swapped.write_bytes(b"not the package")
        os.replace(swapped, work / f"{SHA}.part")
        return digest

    monkeypatch.setattr(hashlib, "file_digest", digest_then_swap)
    endpoint, installer = update(server, "SWAP-1", workdir=work)
    assert installer.path is None, "the installer was given the swapped file"
    assert endpoint.device.status == "failed"
    assert "replaced on disk" in endpoint.device.detail
    assert list(work.iterdir()) == []


def test_a_work_directory_of_another_user_is_refused(server, tmp_path):
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o777)
        os.chown(theirs, 65534, 65534)
    else:
        theirs = Path("/")
    endpoint, installer = update(server, "OTHER-1", workdir=theirs)
    assert installer.path is None and endpoint.device.status == "failed"
    assert "belongs to another user" in endpoint.device.detail


def test_a_file_that_cannot_be_created_is_a_storage_failure_not_a_crash(server, tmp_path):
    """An error of the disk inside the HTTP parser's callbacks is reported, not raised."""
    work = tmp_path / "work"
    (work / f"{SHA}.part").mkdir(parents=True)  # neither removable by unlink nor openable
    endpoint, installer = update(server, "DISK-1", workdir=work)
    assert installer.path is None and endpoint.device.status == "failed"
    assert endpoint.device.detail.startswith("Cannot store the package at ")
