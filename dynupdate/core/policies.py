"""Dynamic software update policies: one per device type."""

from __future__ import annotations

import sqlite_utils

from dynupdate.core import audit
from dynupdate.core.db import write
from dynupdate.core.devices import type_key
from dynupdate.core.errors import NotFound
from dynupdate.core.fleet import PolicyView, load_fleet_state, load_policies
from dynupdate.core.packages import require_package
from dynupdate.core.rollout_records import refuse_during_rollout
from dynupdate.core.times import format_utc, utc_now

__all__ = ["disable_policy", "get_policy", "list_policies", "set_policy"]


def _views(db: sqlite_utils.Database) -> dict[str, PolicyView]:
    fleet = load_fleet_state(db)
    return {key: PolicyView.of(fleet.types[key]) for key in sorted(fleet.types)}


def list_policies(db: sqlite_utils.Database) -> list[PolicyView]:
    """One row per known device type (with packages or a policy)."""
    return list(_views(db).values())


def get_policy(db: sqlite_utils.Database, type_: str) -> PolicyView:
    view = _views(db).get(type_key(type_))
    if view is None:
        raise NotFound(f"No device type {type_}: it has no packages. See: dynupdate package list")
    return view


def set_policy(
    db: sqlite_utils.Database,
    type_: str,
    version: str,
    allow_newer: bool | None = None,
    *,
    actor: str | None = None,
) -> PolicyView:
    """Set the version to use (an uploaded package of the type) and, if given, allow-newer.

    ``allow_newer=None`` keeps the current flag (off for a new policy). Setting
    what is already set changes nothing and appends nothing to the audit log.
    """
    with write(db):
        package = require_package(db, type_, version)
        refuse_during_rollout(db, package.type, "the policy is frozen until it ends")
        current = load_policies(db).get(type_key(type_))
        if allow_newer is None:
            allow_newer = current.allow_newer if current else False
        if package.blocked:  # naming a blocked version in a policy unblocks it
            db.execute("UPDATE packages SET blocked = 0 WHERE type_key = ? AND version = ?",
                       (type_key(package.type), package.version))  # fmt: skip
        db.execute(
            "INSERT INTO policies (type_key, type, version_to_use, allow_newer, updated)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (type_key) DO UPDATE SET"
            " version_to_use = excluded.version_to_use, allow_newer = excluded.allow_newer,"
            " updated = excluded.updated",
            (
                type_key(type_),
                package.type,
                package.version,
                int(allow_newer),
                format_utc(utc_now()),
            ),
        )
        before = (current.version_to_use, current.allow_newer) if current else (None, None)
        if package.blocked or before != (package.version, allow_newer):
            detail = {
                "version_to_use": package.version,
                "allow_newer": allow_newer,
                "previous_version_to_use": before[0],
                "previous_allow_newer": before[1],
                "unblocked": package.blocked,
            }
            audit.append(db, actor, audit.Action.POLICY_SET, package.type, detail)
    return get_policy(db, type_)


def disable_policy(
    db: sqlite_utils.Database, type_: str, *, actor: str | None = None
) -> PolicyView:
    """Unset the version to use: the update is not activated (allow-newer is kept)."""
    with write(db):
        view = get_policy(db, type_)
        refuse_during_rollout(db, view.type, "the policy is frozen until it ends")
        changed = db.execute(
            "UPDATE policies SET version_to_use = NULL, updated = ? WHERE type_key = ?"
            " AND version_to_use IS NOT NULL",
            (format_utc(utc_now()), type_key(type_)),
        ).rowcount
        if changed:
            detail = {"previous_version_to_use": view.version_to_use}
            audit.append(db, actor, audit.Action.POLICY_DISABLE, view.type, detail)
    return PolicyView(view.type, None, view.allow_newer, None, view.packages)
