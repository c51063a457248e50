"""Trial devices: named by serial, in every wave of every rollout (SPEC section 6)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlite_utils

from dynupdate.core import audit
from dynupdate.core.audit import Action
from dynupdate.core.db import write
from dynupdate.core.errors import InvalidInput, NotFound
from dynupdate.core.times import format_utc, utc_now

# Trial devices -------------------------------------------------------------------------


__all__ = [
    "add_trial",
    "list_trial",
    "remove_trial",
    "trial_serials",
]


def add_trial(
    db: sqlite_utils.Database, serials: Iterable[str], *, actor: str | None = None
) -> list[str]:
    """Name trial devices (known or not yet known); returns those newly added."""
    wanted = _serials(serials)
    stamp = format_utc(utc_now())
    with write(db):
        added = [
            s
            for s in wanted
            if db.execute(
                "INSERT INTO trial_devices (serial, added_at) VALUES (?, ?)"
                " ON CONFLICT (serial) DO NOTHING",
                (s, stamp),
            ).rowcount
        ]
        if added:
            audit.append(db, actor, Action.TRIAL_ADD, None, {"serials": added})
    return added


def remove_trial(
    db: sqlite_utils.Database, serials: Iterable[str], *, actor: str | None = None
) -> list[str]:
    """Remove trial devices; an unknown serial refuses the whole command."""
    wanted = _serials(serials)
    with write(db):
        present = {
            row[0]
            for row in db.execute(
                f"SELECT serial FROM trial_devices WHERE serial IN ({','.join('?' * len(wanted))})",
                wanted,
            )
        }
        missing = [s for s in wanted if s not in present]
        if missing:
            raise NotFound(f"{missing[0]!r} is not a trial device. See: dynupdate trial list")
        for s in wanted:
            db.execute("DELETE FROM trial_devices WHERE serial = ?", (s,))
        audit.append(db, actor, Action.TRIAL_REMOVE, None, {"serials": wanted})
    return wanted


def list_trial(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Trial devices with their type (null until the serial has polled)."""
    return [
        {"serial": serial, "type": type_, "added_at": added}
        for serial, type_, added in db.execute(
            "SELECT t.serial, e.type, t.added_at FROM trial_devices t"
            " LEFT JOIN endpoints e ON e.serial = t.serial ORDER BY t.serial"
        )
    ]


def _serials(serials: Iterable[str]) -> list[str]:
    wanted = list(dict.fromkeys(serials))
    if not wanted:
        raise InvalidInput("Name at least one serial.")
    for serial in wanted:
        if not serial or len(serial) > 64 or not serial.isprintable() or " " in serial:
            raise InvalidInput(
                f"Invalid serial {serial[:64]!r}: 1-64 printable characters without spaces."
            )
    return wanted


def trial_serials(db: sqlite_utils.Database) -> frozenset[str]:
    return frozenset(row[0] for row in db.execute("SELECT serial FROM trial_devices"))
