"""The device types a home knows, and the closest one to a misspelt name.

A type is known once a package, a policy or a device has it. A typo in
``package add --type`` would otherwise start a new type that no device ever
asks for, and ``endpoint list --type`` would answer an empty list as if the
fleet had none of them.
"""

from __future__ import annotations

import difflib

import sqlite_utils

from dynupdate.core.devices import type_key

__all__ = ["closest_type", "has_devices", "is_known_type", "known_types"]


def known_types(db: sqlite_utils.Database) -> list[str]:
    """Every type of a package, a policy or a device, in the spelling first seen, sorted."""
    names: dict[str, str] = {}
    for table in ("packages", "policies"):
        for key, name in db.execute(f"SELECT type_key, min(type) FROM {table} GROUP BY type_key"):
            names.setdefault(key, name)
    # The keys from the status index alone; one row read per type for its spelling.
    for (key,) in db.execute("SELECT DISTINCT type_key FROM endpoints").fetchall():
        if key not in names:
            row = db.execute("SELECT type FROM endpoints WHERE type_key = ? LIMIT 1", (key,))
            names[key] = row.fetchone()[0]
    return sorted(names.values(), key=type_key)


def is_known_type(db: sqlite_utils.Database, type_: str) -> bool:
    """Whether a package, a policy or a device has this type (in any case)."""
    key = type_key(type_)
    return any(
        db.execute(f"SELECT 1 FROM {table} WHERE type_key = ? LIMIT 1", (key,)).fetchone()
        for table in ("packages", "policies", "endpoints")
    )


def has_devices(db: sqlite_utils.Database, type_: str) -> bool:
    """Whether any device of this type (in any case) has polled."""
    row = db.execute("SELECT 1 FROM endpoints WHERE type_key = ? LIMIT 1", (type_key(type_),))
    return row.fetchone() is not None


def closest_type(name: str, known: list[str]) -> str | None:
    """The known type closest to ``name`` (case ignored), or None when none is close.

    >>> closest_type("GroupSeris", ["GroupSeries", "Trio", "EagleEyeIV"])
    'GroupSeries'
    >>> closest_type("trio8", ["GroupSeries", "Trio"]), closest_type("VVX", ["Trio"])
    ('Trio', None)
    """
    by_key = {type_key(k): k for k in known}
    found = difflib.get_close_matches(type_key(name), list(by_key), n=1, cutoff=0.6)
    return by_key[found[0]] if found else None
