"""A kill -9 or a full disk during ``package add`` never leaves a broken store.

SPEC: "A kill -9 at any moment leaves no row without its file and no visible
half-file; leftover temp files are cleaned at the next start." These tests run
the real command in a subprocess and check the home directly on disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from dynupdate.core.audit import verify
from dynupdate.core.db import DB_NAME
from dynupdate.core.home import open_home
from dynupdate.core.packages import add_package
from dynupdate.core.store import PackageStore

BIG_SIZE = 64 << 20
BLOCK = 8 << 20
STARTUP_TRIALS = 3
COPY_TRIALS = 16
LANES = 2


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNUPDATE_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _add_command(home: Path, source: Path, version: str) -> list[str]:
    add = [sys.executable, "-m", "dynupdate", "--home", str(home), "package", "add"]
    return [*add, str(source), "--type", "T", "--version", version]


def _write_random(path: Path, size: int) -> str:
    """Incompressible bytes (a few random blocks repeated); returns their SHA-256."""
    blocks = [os.urandom(BLOCK) for _ in range(min(4, size // BLOCK))]
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for i in range(size // BLOCK):
            out.write(blocks[i % len(blocks)])
            digest.update(blocks[i % len(blocks)])
    return digest.hexdigest()


def _sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _start_add(home: Path, source: Path, version: str) -> subprocess.Popen:
    return subprocess.Popen(
        _add_command(home, source, version),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_for_copy(proc: subprocess.Popen, home: Path, timeout: float = 30) -> bool:
    """Wait until the import's temp file exists (the copy has begun); False if it ended first.

    The start of a Python process varies far more than the copy, so kills
    aimed at the copy are timed from here rather than from the launch.
    """
    temp_dir = home / "packages" / ".tmp"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(FileNotFoundError):
            if any(temp_dir.iterdir()):
                return True
        time.sleep(0.001)
    raise AssertionError(f"no import started in {home} within {timeout}s")


@dataclass(frozen=True)
class Big:
    path: Path
    sha256: str
    startup: float  # seconds from launch to the start of the copy
    copy: float  # seconds from the start of the copy to the exit
    full: float  # seconds of one complete import into a fresh home


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Big:
    """A 64 MiB package, and how long the CLI takes to start and to import it."""
    root = tmp_path_factory.mktemp("crash")
    path = root / "big.bin"
    sha256 = _write_random(path, BIG_SIZE)
    home = root / "calibration"
    start = time.monotonic()
    proc = _start_add(home, path, "1.0")
    assert _wait_for_copy(proc, home)
    copying = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    end = time.monotonic()
    shutil.rmtree(home)
    return Big(path, sha256, copying - start, end - copying, end - start)


def _store_files(home: Path) -> list[Path]:
    """Every file in the package store outside its temp folder."""
    store = home / "packages"
    if not store.is_dir():
        return []
    return [p for p in store.rglob("*") if p.is_file() and p.parent.name != ".tmp"]


def _rows(home: Path) -> list[tuple[str, int]]:
    """(sha256, size) of every packages row; checks the database's integrity first."""
    path = home / DB_NAME
    if not path.exists():
        return []
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'packages'").fetchone():
            return []  # killed before the first migration committed
        return conn.execute("SELECT sha256, size FROM packages").fetchall()
    finally:
        conn.close()


def _check_store(home: Path, big: Big) -> str:
    """Assert the invariants after a kill; returns where the kill landed."""
    temps = list((home / "packages" / ".tmp").glob("*")) if home.exists() else []
    files = _store_files(home)
    # No visible half-file: the only name a file can have is the hash of its full content.
    for path in files:
        assert path.name == big.sha256 and path.parent.name == big.sha256[:2], path
        assert path.stat().st_size == BIG_SIZE, f"visible half-file {path}"
        assert _sha256_of(path) == big.sha256, f"visible file with wrong content {path}"
    rows = _rows(home)
    # No row without its file.
    for sha256, size in rows:
        path = home / "packages" / sha256[:2] / sha256
        assert path.is_file(), f"row without its file: {sha256}"
        assert path.stat().st_size == size == BIG_SIZE
    assert all(t.suffix == ".part" for t in temps), temps
    if home.exists():
        # The next start removes what the killed import left behind.
        opened = open_home(home)
        try:
            assert list(opened.store.temp_dir.iterdir()) == []
            assert _store_files(home) == files
        finally:
            opened.close()
    if rows:
        return "after commit"
    if files:
        return "file linked, no row"
    if temps:
        return "mid-copy"
    return "before import"


@pytest.mark.slow
def test_kill_9_during_package_add_leaves_no_broken_store(big: Big, tmp_path: Path):
    # A few kills timed from the launch, during the start (imports, creating
    # the database); then kills timed from the start of the copy, spread over
    # it and a little past its usual end; and one run left to complete.
    trials: list[tuple[bool, float]] = [
        (False, big.startup * k / STARTUP_TRIALS) for k in range(STARTUP_TRIALS)
    ]
    trials += [(True, big.copy * 1.2 * k / COPY_TRIALS) for k in range(COPY_TRIALS)]
    trials.append((False, 3 * big.full))

    def trial(i: int, from_copy: bool, delay: float) -> str:
        home = tmp_path / f"home{i}"
        proc = _start_add(home, big.path, f"1.{i}")
        try:
            if not from_copy or _wait_for_copy(proc, home):
                proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()
        where = _check_store(home, big)
        shutil.rmtree(home, ignore_errors=True)  # absent when killed at once
        if proc.returncode == 0:
            assert where == "after commit"
            return "completed"
        return f"killed {where}"

    # Two at a time: the start of each process, not the copy, is what takes long.
    with ThreadPoolExecutor(max_workers=LANES) as pool:
        outcomes = Counter(pool.map(trial, range(len(trials)), *zip(*trials, strict=True)))
    summary = f"{dict(outcomes)} (start {big.startup:.2f}s, copy to exit {big.copy:.2f}s)"
    print(summary)
    assert outcomes["completed"] >= 1, summary
    assert outcomes["killed mid-copy"] >= 1, summary


def _limit_file_size(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        # Ignored, the write past the limit fails with EFBIG instead of killing.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return preexec


def test_full_disk_fails_cleanly_and_keeps_nothing(tmp_path: Path):
    source = tmp_path / "pkg.bin"
    _write_random(source, 16 << 20)
    home = tmp_path / "home"
    open_home(home).close()  # an existing home: a new one is announced on a line of its own
    done = subprocess.run(
        _add_command(home, source, "1.0"),
        env=_env(),
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size(4 << 20),
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert re.search(r"pkg\.bin.*too large", lines[0], re.IGNORECASE), lines[0]
    # Nothing kept, checked before any other start could clean up.
    assert _rows(home) == []
    assert _store_files(home) == []
    assert list((home / "packages" / ".tmp").iterdir()) == []


_REMOVE_THEN_DIE = """
import os, signal, sys
from pathlib import Path
from dynupdate.core.home import open_home
from dynupdate.core.packages import remove_package

home = open_home(Path(sys.argv[1]))
unlink = home.store.delete

def delete_then_die(sha256):
    unlink(sha256)
    os.kill(os.getpid(), signal.SIGKILL)  # the kill lands before the COMMIT

home.store.delete = delete_then_die
remove_package(home.db, home.store, "T", "1.0")
"""


def test_kill_9_during_package_remove_leaves_no_row_without_its_file(tmp_path: Path):
    home = tmp_path / "home"
    source = tmp_path / "pkg.bin"
    source.write_bytes(b"package bytes")
    opened = open_home(home)
    try:
        add_package(opened.db, opened.store, source, "T", "1.0")
    finally:
        opened.close()
    done = subprocess.run(
        [sys.executable, "-c", _REMOVE_THEN_DIE, str(home)], env=_env(), capture_output=True
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    for sha256, _ in _rows(home):
        assert (home / "packages" / sha256[:2] / sha256).is_file(), "row without its file"


def test_a_start_racing_the_beginning_of_an_import_does_not_fail_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    opened = open_home(tmp_path / "home")
    source = tmp_path / "pkg.bin"
    source.write_bytes(b"package bytes")
    real_flock = fcntl.flock
    raced = []

    def flock_after_a_concurrent_start(fd, operation):
        if not raced:
            raced.append(True)
            # Another command starting now, between the importer's create and lock.
            PackageStore(opened.store.root).clean_temp()
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_concurrent_start)
    try:
        package, created = add_package(opened.db, opened.store, source, "T", "1.0")
    finally:
        opened.close()
    assert created and package.size == len(b"package bytes")


# Timed kills at moments spread over an import; the boundaries between its
# transactions are covered one by one by the test after this one.
CHANGE_TRIALS = 8
KEYS_PER_FILE = 30_000


def _import_command(home: Path, keys: Path) -> list[str]:
    return [sys.executable, "-m", "dynupdate", "--home", str(home), "key", "import", str(keys)]


def _keys_file(folder: Path, trial: int, keys: int = KEYS_PER_FILE) -> Path:
    """Keys for the same devices in every file, each file's own: every import replaces them all."""
    path = folder / f"keys-{trial}.csv"
    rows = "".join(f"S{n:05d},1.0,K{n}-{trial}\n" for n in range(keys))
    path.write_text("serial,version,key\n" + rows)
    return path


def _change_and_entry(home: Path, keys: int = KEYS_PER_FILE) -> tuple[int | None, int | None]:
    """(the trial whose keys the table holds, the trial the newest key.import entry names)."""
    conn = sqlite3.connect(home / DB_NAME)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        suffixes = {
            key.rsplit("-", 1)[1] for (key,) in conn.execute("SELECT key FROM activation_keys")
        }
        count = conn.execute("SELECT count(*) FROM activation_keys").fetchone()[0]
        entry = conn.execute(
            "SELECT detail FROM audit_log WHERE action = 'key.import' ORDER BY id DESC LIMIT 1"
        ).fetchone()
    finally:
        conn.close()
    assert len(suffixes) <= 1, f"keys of several imports at once: {suffixes}"
    assert count in (0, keys), f"a half import: {count} keys"
    held = int(suffixes.pop()) if suffixes else None
    named = None
    if entry is not None:
        named = int(re.fullmatch(r"keys-(\d+)\.csv", json.loads(entry[0])["file"]).group(1))
    return held, named


@pytest.mark.slow
def test_kill_9_during_a_change_keeps_the_change_and_its_audit_entry_together(tmp_path: Path):
    # Key imports of 30,000 keys: a transaction long enough for kills to land inside it.
    home = tmp_path / "home"
    open_home(home).close()
    files = [_keys_file(tmp_path, trial) for trial in range(CHANGE_TRIALS + 1)]
    start = time.monotonic()
    done = subprocess.run(_import_command(home, files[0]), env=_env(), capture_output=True)
    full = time.monotonic() - start
    assert done.returncode == 0, done.stderr.decode()
    assert _change_and_entry(home) == (0, 0)
    outcomes: Counter[str] = Counter()
    for trial in range(1, CHANGE_TRIALS + 1):
        before = _change_and_entry(home)
        proc = subprocess.Popen(
            _import_command(home, files[trial]), env=_env(), stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        # Spread over the run, mostly past the start-up, a little past its usual end;
        # the last is left to finish, so a slower machine than the calibrating run
        # still sees a committed change (it must come with its entry too).
        delay = None if trial == CHANGE_TRIALS else full * (0.4 + 0.8 * trial / CHANGE_TRIALS)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()
        held, named = _change_and_entry(home)
        # Both or neither: the keys held are those the newest entry names.
        assert held == named, f"trial {trial}: keys of import {held}, entry of import {named}"
        if proc.returncode == 0:
            assert held == trial
            outcomes["completed"] += 1
        elif (held, named) == before:
            outcomes["killed, neither"] += 1
        else:
            assert held == trial
            outcomes["killed, both"] += 1
        opened = open_home(home)
        try:
            assert verify(opened.db).intact
        finally:
            opened.close()
    summary = f"{dict(outcomes)} (one import {full:.2f}s)"
    print(summary)
    assert outcomes["killed, neither"] >= 1, summary
    assert outcomes["completed"] + outcomes["killed, both"] >= 1, summary
    verified = subprocess.run(
        [sys.executable, "-m", "dynupdate", "--home", str(home), "log", "--verify"],
        env=_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr


# `key import`, killed as the statement after its Nth COMMIT starts: the state
# between two of its transactions, whatever N, exactly as a kill -9 leaves it.
_IMPORT_KILLED_AFTER_COMMITS = """
import os, signal, sys
from dynupdate.core import db

home, keys, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
commits = 0
connect = db.connect

def connect_and_trace(path):
    opened = connect(path)

    def statement(sql):
        global commits
        if commits == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if sql.lstrip()[:6].upper() == "COMMIT":
            commits += 1

    opened.conn.set_trace_callback(statement)
    return opened

db.connect = connect_and_trace
sys.argv = ["dynupdate", "--home", home, "key", "import", keys]
from dynupdate.cli import main
main()
"""


def test_a_kill_after_any_commit_of_a_change_keeps_it_with_its_audit_entry(tmp_path: Path):
    """Killed after its 0th, 1st, 2nd... COMMIT until it completes: both or neither, every time.

    The timed kills above land at random moments; this one lands on every
    boundary between transactions, so a change committed apart from its entry
    (the keys in one transaction, the entry in the next) cannot slip through.
    """
    keys = 50  # what is committed together matters here, not how long it takes
    home = tmp_path / "home"
    open_home(home).close()
    outcomes = []
    for kill_after in range(20):
        trial = kill_after + 1
        before = _change_and_entry(home, keys)
        done = subprocess.run(
            [sys.executable, "-c", _IMPORT_KILLED_AFTER_COMMITS, str(home),
             str(_keys_file(tmp_path, trial, keys)), str(kill_after)],
            env=_env(), capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode in (0, -signal.SIGKILL), done.stderr
        held, named = _change_and_entry(home, keys)
        assert held == named, f"after {kill_after} commits: keys of import {held}, entry of {named}"
        assert (held, named) in (before, (trial, trial))
        opened = open_home(home)
        try:
            assert verify(opened.db).intact
        finally:
            opened.close()
        if done.returncode == 0:
            break
        outcomes.append("both" if held == trial else "neither")
    else:
        raise AssertionError("key import never completed")
    print(f"killed after 0..{len(outcomes) - 1} commits: {outcomes}; then completed")
    assert held == trial, "the completed import is kept"
    assert outcomes and outcomes[0] == "neither", outcomes
