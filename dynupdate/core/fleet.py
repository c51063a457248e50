"""A snapshot of everything the update decision reads, cheap to keep and to refresh.

The poll server keeps one :class:`FleetState` and reloads it only when the
``config_generation`` counter moves (triggers bump it on any change to
packages, policies or the window), so a CLI change is seen by the next poll
without a query per poll for the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlite_utils

from dynupdate.core.decision import (
    Decision,
    DeviceState,
    Policy,
    decide,
    is_satisfied,
    target_package,
)
from dynupdate.core.devices import type_key
from dynupdate.core.maintenance import load_window
from dynupdate.core.packages import Package, list_packages
from dynupdate.core.policies import load_policies
from dynupdate.core.versions import same_version
from dynupdate.core.windows import Window

__all__ = ["STATUSES", "FleetState", "TypeState", "current_generation", "load_fleet_state"]

STATUSES = ("no-policy", "up-to-date", "pending", "in-progress", "failed")
_IN_PROGRESS = frozenset({"downloading", "installing"})


@dataclass(frozen=True)
class TypeState:
    policy: Policy | None
    packages: tuple[Package, ...]
    target: Package | None


_NO_TYPE = TypeState(None, (), None)


@dataclass(frozen=True)
class FleetState:
    generation: int
    types: dict[str, TypeState]
    window: Window | None

    def of(self, type_: str) -> TypeState:
        return self.types.get(type_key(type_), _NO_TYPE)

    def decide(self, device: DeviceState, now: datetime) -> Decision:
        kind = self.of(device.type)
        return decide(kind.policy, kind.packages, self.window, device, now)

    def status(
        self, type_: str, version: str, report_state: str | None, report_version: str | None
    ) -> str:
        """The update status, derived from the policy now and what the device last said."""
        kind = self.of(type_)
        if kind.target is None:
            return "no-policy"
        if is_satisfied(version, kind.target, kind.policy.allow_newer):
            return "up-to-date"
        if report_version is not None and same_version(report_version, kind.target.version):
            if report_state in _IN_PROGRESS:
                return "in-progress"
            if report_state == "failed":
                return "failed"
        return "pending"


def current_generation(db: sqlite_utils.Database) -> int:
    return db.execute("SELECT generation FROM config_generation").fetchone()[0]


def load_fleet_state(db: sqlite_utils.Database) -> FleetState:
    """Read policies, packages and window in one read transaction."""
    db.conn.execute("BEGIN")
    try:
        generation = current_generation(db)
        policies = load_policies(db)
        by_type: dict[str, list[Package]] = {}
        for package in list_packages(db):
            by_type.setdefault(type_key(package.type), []).append(package)
        window = load_window(db)
    finally:
        db.conn.execute("COMMIT")
    types = {}
    for key in set(policies) | set(by_type):
        policy = policies.get(key)
        packages = tuple(by_type.get(key, ()))
        types[key] = TypeState(policy, packages, target_package(policy, packages))
    return FleetState(generation, types, window)
