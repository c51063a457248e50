"""The content-addressed store: atomic, deduplicated, cleaned after a crash."""

from __future__ import annotations

import fcntl
import os
import threading

import pytest

from dynupdate.core.errors import Conflict, InvalidInput
from dynupdate.core.home import open_home
from dynupdate.core.packages import add_package, find_package, list_packages, remove_package
from dynupdate.core.store import PackageStore


def test_temp_files_of_killed_imports_are_cleaned(home):
    stale = home.store.temp_dir / "dead.part"
    stale.write_bytes(b"half")
    live = home.store.temp_dir / "live.part"
    live.write_bytes(b"in progress")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert home.store.clean_temp() == 1
        assert not stale.exists() and live.exists()
    finally:
        os.close(fd)


def test_no_temp_file_left_after_import(home, make_file):
    add_package(home.db, home.store, make_file(b"abc"), "Trio", "1.0")
    assert list(home.store.temp_dir.iterdir()) == []


def test_refused_import_keeps_nothing(home, make_file):
    add_package(home.db, home.store, make_file(b"abc"), "Trio", "1.0")
    with pytest.raises(Conflict):
        add_package(home.db, home.store, make_file(b"xyz"), "Trio", "1.0")
    files = [p for p in home.store.root.rglob("*") if p.is_file()]
    assert len(files) == 1


def test_removal_racing_an_import_of_same_bytes_keeps_the_file(home, home_dir, make_file):
    f = make_file(b"same bytes")
    add_package(home.db, home.store, f, "Trio", "1.0")
    other = open_home(home_dir)  # another admin's command, on its own connection
    removed = []

    def remove_before_the_row(statement: str) -> None:
        # The import has linked its file and now takes the write lock for its row:
        # the moment a removal of the only other row using these bytes deletes them.
        if statement.startswith("BEGIN IMMEDIATE") and not removed:
            removed.append(remove_package(other.db, other.store, "Trio", "1.0"))

    home.db.conn.set_trace_callback(remove_before_the_row)
    try:
        package, new = add_package(home.db, home.store, f, "Camera", "1.0")
    finally:
        home.db.conn.set_trace_callback(None)
        other.close()
    assert removed and new, "the removal ran inside the import"
    assert find_package(home.db, "Trio", "1.0") is None
    assert home.store.path_for(package.sha256).read_bytes() == b"same bytes"


def test_a_start_during_an_import_leaves_its_temp_file_alone(home, home_dir, make_file):
    left = []

    def start_another_command(done: int) -> None:
        if not left:  # a command starting mid-copy cleans the temp files of dead imports
            start = open_home(home_dir)
            left.append(len(list(start.store.temp_dir.iterdir())))
            start.close()

    content = os.urandom(100_000)
    package, _ = add_package(
        home.db, home.store, make_file(content), "Trio", "1.0", progress=start_another_command
    )
    assert left == [1], "the live import's temp file survived the start"
    assert home.store.path_for(package.sha256).read_bytes() == content


def test_imports_racing_starts_all_land(home, home_dir, make_file):
    """Imports in threads while other commands start (and clean temp files) in a loop."""
    files = {(n, i): make_file(os.urandom(20_000)) for n in range(3) for i in range(8)}
    errors = []
    importing = threading.Barrier(4)
    done = threading.Event()

    def importer(n: int) -> None:
        importing.wait()
        try:
            mine = open_home(home_dir)
            for i in range(8):
                add_package(mine.db, mine.store, files[n, i], f"Type{n}", f"1.{i}")
            mine.close()
        except Exception as e:  # reported below
            errors.append(e)

    def starter() -> None:
        importing.wait()
        while not done.is_set():
            open_home(home_dir).close()

    threads = [threading.Thread(target=importer, args=(n,)) for n in range(3)]
    starts = threading.Thread(target=starter)
    for t in [*threads, starts]:
        t.start()
    for t in threads:
        t.join()
    done.set()
    starts.join()

    assert errors == []
    packages = list_packages(home.db)
    assert len(packages) == len(files)
    for package in packages:
        n, i = int(package.type[-1]), int(package.version[2:])
        assert home.store.path_for(package.sha256).read_bytes() == files[n, i].read_bytes()
    assert list(home.store.temp_dir.iterdir()) == []


def test_path_for_refuses_anything_but_a_sha256(tmp_path):
    store = PackageStore(tmp_path)
    for bad in ("../etc/passwd", "A" * 64, "a" * 63, "a" * 65, "g" * 64, ""):
        with pytest.raises(InvalidInput):
            store.path_for(bad)


def test_two_spellings_are_one_version(home, make_file):
    add_package(home.db, home.store, make_file(b"v"), "Trio", "6.2")
    assert find_package(home.db, "trio", "6.2.0").version == "6.2"
