"""Warnings about device types that nobody has: a typo reads as an empty fleet otherwise."""

from __future__ import annotations

import sqlite_utils

from dynupdate.cli._output import say
from dynupdate.core.type_names import closest_type, has_devices, is_known_type, known_types

__all__ = ["new_type_notice", "warn_if_no_devices"]


def warn_if_no_devices(db: sqlite_utils.Database, type_: str) -> None:
    """On stderr, when no device of ``type_`` has polled: a filter by it shows nothing."""
    if has_devices(db, type_):
        return
    if is_known_type(db, type_):
        say(f"Warning: no device of type {type_} has polled yet.")
        return
    known = known_types(db)
    closest = closest_type(type_, known)
    if closest:
        hint = f"; did you mean {closest}?"
    else:
        hint = "." + (f" Known types: {', '.join(known)}." if known else "")
    say(f"Warning: no package, policy or device has the type {type_}{hint}")


def new_type_notice(db: sqlite_utils.Database, type_: str) -> tuple[str, bool] | None:
    """What to say when ``type_`` would be a new device type, and whether it is a warning.

    None when a package, a policy or a device has the type already; a warning
    when another known type is close to it (a typo starts a type no device asks for).
    """
    if is_known_type(db, type_):
        return None
    closest = closest_type(type_, known_types(db))
    if closest is not None:
        return f"New device type {type_} — did you mean {closest}?", True
    return f"New device type {type_}.", False
