"""The stored maintenance window (one for the whole fleet, or none)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import sqlite_utils

from dynupdate.core import audit
from dynupdate.core.db import write
from dynupdate.core.times import format_utc, utc_now
from dynupdate.core.windows import Window, current_opening, next_opening

__all__ = ["clear_window", "load_window", "save_window", "window_view"]


def window_view(window: Window | None, now: datetime) -> dict[str, Any]:
    """The window as ``window show`` gives it: its fields, whether it is open, its openings.

    On endpoint clocks (``tz`` endpoint) each device has its own openings;
    these are those of an endpoint on UTC, the clock of one that sends no zone.

    >>> from datetime import UTC
    >>> from dynupdate.core.windows import make_window
    >>> view = window_view(make_window("mon-fri", "22:00", "4h", "Europe/Berlin"),
    ...                    datetime(2026, 12, 2, 12, 0, tzinfo=UTC))
    >>> view["open_now"], view["next_opening"]
    (False, {'start': '2026-12-02T21:00:00Z', 'end': '2026-12-03T01:00:00Z'})
    """
    data: dict[str, Any] = {
        "set": window is not None,
        "days": None,
        "start": None,
        "duration_minutes": None,
        "tz": None,
        "open_now": None,
        "current_opening": None,
        "next_opening": None,
    }
    if window is None:
        return data
    data |= window.to_dict()
    current = current_opening(window, now)
    start, end = next_opening(window, now)
    data["open_now"] = current is not None
    data["current_opening"] = (
        {"start": format_utc(current[0]), "end": format_utc(current[1])} if current else None
    )
    data["next_opening"] = {"start": format_utc(start), "end": format_utc(end)}
    return data


def load_window(db: sqlite_utils.Database) -> Window | None:
    row = db.execute(
        "SELECT days, start, duration_minutes, tz FROM maintenance_window WHERE id = 1"
    ).fetchone()
    if row is None:
        return None
    days, start, minutes, tz = row
    return Window.from_dict(
        {"days": json.loads(days), "start": start, "duration_minutes": minutes, "tz": tz}
    )


def save_window(db: sqlite_utils.Database, window: Window, *, actor: str | None = None) -> Window:
    """Store the window; the same window again appends nothing to the audit log."""
    data = window.to_dict()
    with write(db):
        before = load_window(db)
        db.execute(
            "INSERT INTO maintenance_window (id, days, start, duration_minutes, tz, updated)"
            " VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET days = excluded.days,"
            " start = excluded.start, duration_minutes = excluded.duration_minutes,"
            " tz = excluded.tz, updated = excluded.updated",
            (
                json.dumps(data["days"]),
                data["start"],
                data["duration_minutes"],
                data["tz"],
                format_utc(utc_now()),
            ),
        )
        previous = before.to_dict() if before is not None else None
        if previous != data:
            detail = {**data, "previous": previous}
            audit.append(db, actor, audit.Action.WINDOW_SET, None, detail)
    return window


def clear_window(db: sqlite_utils.Database, *, actor: str | None = None) -> bool:
    """Remove the window; returns whether there was one."""
    with write(db):
        before = load_window(db)
        if before is None:
            return False
        db.execute("DELETE FROM maintenance_window WHERE id = 1")
        detail = {"previous": before.to_dict()}
        audit.append(db, actor, audit.Action.WINDOW_CLEAR, None, detail)
        return True
