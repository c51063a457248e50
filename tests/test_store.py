"""The content-addressed store: atomic, deduplicated, cleaned after a crash."""

from __future__ import annotations

import fcntl
import os

import pytest

from dynupdate.core.errors import Conflict, InvalidInput
from dynupdate.core.packages import add_package, find_package, remove_package
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


def test_removal_racing_an_import_of_same_bytes_keeps_the_file(home, make_file):
    f = make_file(b"same bytes")
    add_package(home.db, home.store, f, "Trio", "1.0")
    staged_path = None
    with home.store.stage(f) as staged:
        # A removal of the only row referencing the bytes happens mid-import.
        remove_package(home.db, home.store, "Trio", "1.0")
        staged_path = home.store.path_for(staged.sha256)
        assert not staged_path.exists()
        home.store.relink(staged)
    assert staged_path.read_bytes() == b"same bytes"


def test_path_for_refuses_anything_but_a_sha256(tmp_path):
    store = PackageStore(tmp_path)
    for bad in ("../etc/passwd", "A" * 64, "a" * 63, "a" * 65, "g" * 64, ""):
        with pytest.raises(InvalidInput):
            store.path_for(bad)


def test_two_spellings_are_one_version(home, make_file):
    add_package(home.db, home.store, make_file(b"v"), "Trio", "6.2")
    assert find_package(home.db, "trio", "6.2.0").version == "6.2"
