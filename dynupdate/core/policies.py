"""Dynamic software update policies: one per device type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlite_utils

from dynupdate.core import audit
from dynupdate.core.db import write
from dynupdate.core.decision import Policy, target_package
from dynupdate.core.devices import type_key
from dynupdate.core.errors import NotFound
from dynupdate.core.packages import Package, list_packages, require_package
from dynupdate.core.rollout_records import refuse_during_rollout
from dynupdate.core.times import format_utc, utc_now

__all__ = [
    "PolicyView",
    "disable_policy",
    "get_policy",
    "list_policies",
    "load_policies",
    "set_policy",
]


@dataclass(frozen=True)
class PolicyView:
    """A policy as admins see it, with what it currently means."""

    type: str
    version_to_use: str | None
    allow_newer: bool
    target_version: str | None
    packages: int

    @property
    def active(self) -> bool:
        return self.version_to_use is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "version_to_use": self.version_to_use,
            "allow_newer": self.allow_newer,
            "active": self.active,
            "target_version": self.target_version,
            "packages": self.packages,
        }


def load_policies(db: sqlite_utils.Database) -> dict[str, Policy]:
    """Every stored policy by type key."""
    return {
        key: Policy(type=type_, version_to_use=vtu, allow_newer=bool(allow))
        for key, type_, vtu, allow in db.execute(
            "SELECT type_key, type, version_to_use, allow_newer FROM policies"
        )
    }


def _views(db: sqlite_utils.Database) -> dict[str, PolicyView]:
    policies = load_policies(db)
    by_type: dict[str, list[Package]] = {}
    for package in list_packages(db):
        by_type.setdefault(type_key(package.type), []).append(package)
    views = {}
    for key in sorted(set(policies) | set(by_type)):
        packages = by_type.get(key, [])
        policy = policies.get(key)
        target = target_package(policy, packages)
        views[key] = PolicyView(
            type=policy.type if policy else packages[0].type,
            version_to_use=policy.version_to_use if policy else None,
            allow_newer=policy.allow_newer if policy else False,
            target_version=target.version if target else None,
            packages=len(packages),
        )
    return views


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
