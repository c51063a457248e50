"""Activation keys: issued for one device serial and one software version.

A poll's ``update`` carries the key of the polling device's serial for the
offered version (any spelling of it: ``6.2`` finds a key for ``6.2.0``).
Keys are secrets: they are shown by ``key list`` and sent to their device,
and nowhere else (not in the audit log, not in the access log).
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from dynupdate.core import audit
from dynupdate.core.db import write
from dynupdate.core.errors import InvalidInput, NotFound
from dynupdate.core.times import format_utc, utc_now
from dynupdate.core.versions import same_version, validate_version, version_key

__all__ = [
    "ActivationKey",
    "ImportResult",
    "import_keys",
    "key_for",
    "list_keys",
    "read_keys_csv",
    "remembered_key",
    "remove_key",
]

HEADER = ["serial", "version", "key"]
MAX_SERIAL = 64  # as the protocol's serial
MAX_KEY = 1024


@dataclass(frozen=True)
class ActivationKey:
    serial: str
    version: str
    key: str
    imported: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ImportResult:
    added: int
    replaced: int
    unchanged: int


def _field_problem(name: str, value: str) -> str | None:
    if value == "":
        return f"the {name} is empty"
    if name == "version":
        try:
            validate_version(value)
        except InvalidInput as e:
            return str(e).rstrip(".")
        return None
    limit = MAX_SERIAL if name == "serial" else MAX_KEY
    if len(value) > limit:
        return f"the {name} is longer than {limit} characters"
    if not value.isprintable():
        return f"the {name} contains control or invisible characters"
    if value != value.strip() or (name == "serial" and " " in value):
        # Kept exactly as given, never repaired: as the protocol keeps serials.
        spaces = "spaces" if name == "serial" else "surrounding spaces"
        return f"the {name} {value[:64]!r} contains {spaces}"
    return None


def read_keys_csv(path: Path) -> list[tuple[str, str, str]]:
    """The (serial, version, key) rows of a key file; any bad line refuses the whole file.

    UTF-8 (a BOM is fine), header ``serial,version,key`` on line 1; blank lines
    are skipped. The same serial and version twice is fine with the same key
    and refused with two different keys.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"No file '{path}'.") from None
    except IsADirectoryError:
        raise InvalidInput(f"'{path}' is a directory, not a key file.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InvalidInput(f"{path}: line {line}: not UTF-8; nothing imported.") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[str, str, str]] = []
    seen: dict[tuple[str, Any], tuple[int, str]] = {}

    def refuse(why: str) -> InvalidInput:
        return InvalidInput(f"{path}: line {reader.line_num}: {why}; nothing imported.")

    try:
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header] != HEADER:
            raise InvalidInput(
                f"{path}: line 1: the header must be 'serial,version,key'; nothing imported."
            )
        for fields in reader:
            if not fields or fields == [""]:
                continue
            if len(fields) != 3:
                missing = "a missing field" if len(fields) < 3 else "more than 3 fields"
                raise refuse(f"{len(fields)} fields ({missing}), expected serial,version,key")
            for name, value in zip(HEADER, fields, strict=True):
                if (why := _field_problem(name, value)) is not None:
                    raise refuse(why)
            serial, version, key = fields
            pair = (serial, version_key(version))
            earlier = seen.get(pair)
            if earlier is not None:
                if earlier[1] != key:
                    raise refuse(f"{serial} {version} has another key than on line {earlier[0]}")
                continue
            seen[pair] = (reader.line_num, key)
            rows.append((serial, version, key))
    except csv.Error as e:
        raise refuse(f"not valid CSV ({e})") from None
    return rows


def import_keys(db: sqlite_utils.Database, path: Path, *, actor: str | None = None) -> ImportResult:
    """Add or replace the keys of a CSV file, all in one transaction (or none of them)."""
    rows = read_keys_csv(path)
    now = format_utc(utc_now())
    with write(db):
        existing: dict[tuple[str, Any], tuple[str, str]] = {
            (serial, version_key(version)): (version, key)
            for serial, version, key in db.execute(
                "SELECT serial, version, key FROM activation_keys"
            )
        }
        added: list[list[str]] = []
        replaced: list[list[str]] = []
        unchanged = 0
        stale: list[tuple[str, str]] = []
        fresh: list[tuple[str, str, str, str | None]] = []
        for serial, version, key in rows:
            old = existing.get((serial, version_key(version)))
            if old is None:
                added.append([serial, version])
            elif old == (version, key):
                unchanged += 1
                continue
            else:
                replaced.append([serial, version])
                if old[0] != version:  # another spelling of the same version
                    stale.append((serial, old[0]))
            fresh.append((serial, version, key, now))
        db.conn.executemany("DELETE FROM activation_keys WHERE serial = ? AND version = ?", stale)
        db.conn.executemany(
            "INSERT OR REPLACE INTO activation_keys (serial, version, key, imported)"
            " VALUES (?, ?, ?, ?)",
            fresh,
        )
        if fresh:
            # Which device got a key for which version; never the key itself.
            detail = {
                "file": path.name,
                "added": added,
                "replaced": replaced,
                "unchanged": unchanged,
            }
            audit.append(db, actor, audit.Action.KEY_IMPORT, None, detail)
    return ImportResult(len(added), len(replaced), unchanged)


def list_keys(db: sqlite_utils.Database, serial: str | None = None) -> list[ActivationKey]:
    """Every key (of one serial), by serial then version order."""
    sql = "SELECT serial, version, key, imported FROM activation_keys"
    params: tuple[str, ...] = ()
    if serial is not None:
        sql += " WHERE serial = ?"
        params = (serial,)
    keys = [ActivationKey(*row) for row in db.execute(sql, params)]
    return sorted(keys, key=lambda k: (k.serial, version_key(k.version)))


def remove_key(
    db: sqlite_utils.Database, serial: str, version: str, *, actor: str | None = None
) -> ActivationKey:
    """Remove the key of ``serial`` for ``version`` (any spelling of it)."""
    with write(db):
        found = [k for k in list_keys(db, serial) if same_version(k.version, version)]
        if not found:
            raise NotFound(
                f"No activation key for {serial!r} {version!r}. "
                f"See: dynupdate key list --serial {serial}"
            )
        key = found[0]
        db.execute(
            "DELETE FROM activation_keys WHERE serial = ? AND version = ?",
            (key.serial, key.version),
        )
        audit.append(
            db, actor, audit.Action.KEY_REMOVE, None, {"serial": key.serial, "version": key.version}
        )
    return key


# A pending device is offered the same version at every poll until it installs it: its
# key is read once and remembered, up to this many (then forgotten all at once: a bound,
# not an LRU's bookkeeping on every poll).
KEYS_REMEMBERED = 100_000


def remembered_key(
    memo: dict[tuple[str, str], str | None], db: sqlite_utils.Database, serial: str, version: str
) -> str | None:
    """:func:`key_for`, answered from ``memo`` when this pair was asked before.

    ``memo`` must be dropped whenever keys change: the server keeps it in the fleet
    state, which the configuration generation (moved by every import and removal)
    replaces.
    """
    pair = (serial, version)
    try:
        return memo[pair]
    except KeyError:
        pass
    if len(memo) >= KEYS_REMEMBERED:
        memo.clear()
    key = memo[pair] = key_for(db, serial, version)
    return key


def key_for(db: sqlite_utils.Database, serial: str, version: str) -> str | None:
    """The key of ``serial`` for ``version``, or None: one indexed read (the poll path)."""
    # The connection itself, not sqlite-utils' wrapper: this is on the poll path.
    rows = db.conn.execute(
        "SELECT version, key FROM activation_keys WHERE serial = ?", (serial,)
    ).fetchall()
    stored: str
    key: str
    for stored, key in rows:
        if stored == version:
            return key
    for stored, key in rows:
        if same_version(stored, version):
            return key
    return None
