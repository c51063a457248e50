"""A snapshot of everything the update decision reads, cheap to keep and to refresh.

The poll server keeps one :class:`FleetState` and reloads it only when the
``config_generation`` counter moves (triggers bump it on any change to
packages, policies or the window), so a CLI change is seen by the next poll
without a query per poll for the policy.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from dynupdate.core.db import reading
from dynupdate.core.decision import (
    Decision,
    DeviceState,
    Policy,
    RolloutView,
    Standing,
    admitted,
    decide_for_target,
    rollout_status,
    status_for_target,
    target_package,
)
from dynupdate.core.devices import type_key
from dynupdate.core.maintenance import load_window
from dynupdate.core.packages import Package, list_packages
from dynupdate.core.rollout_records import ACTIVE_SQL, COLUMNS, Rollout, rollout_from_row
from dynupdate.core.trial import trial_serials
from dynupdate.core.vocabulary import Status
from dynupdate.core.waves import BUCKETS
from dynupdate.core.windows import Window

__all__ = [
    "STATUSES",
    "ActiveRollout",
    "FleetCache",
    "FleetState",
    "PolicyView",
    "TypeState",
    "current_generation",
    "load_fleet_state",
    "load_policies",
]

# Every status, in the order tables show them; counts are keyed by these values.
STATUSES = tuple(status.value for status in Status)


@dataclass(frozen=True)
class ActiveRollout:
    """What polls need of a type's running, paused or halted rollout."""

    id: int
    view: RolloutView
    max_attempts: int
    limited: bool  # --max-in-flight or --max-per-hour: offers reserve a slot first
    record: Rollout | None = None  # as stored: its waves and wave number, for the views


@dataclass(frozen=True)
class TypeState:
    policy: Policy | None
    packages: tuple[Package, ...]
    target: Package | None
    rollout: ActiveRollout | None = None


_NO_TYPE = TypeState(None, (), None)


@dataclass(frozen=True)
class FleetState:
    generation: int
    types: dict[str, TypeState]
    window: Window | None
    trial: frozenset[str] = frozenset()  # trial devices' serials (section 6)
    keys: bool = False  # whether any activation key exists: offers look one up only then
    # Keys looked up by offers under this state (see keys.remembered_key): a key import or
    # removal moves the generation, and a new state starts with none remembered.
    key_memo: dict[tuple[str, str], str | None] = field(
        default_factory=dict, compare=False, repr=False
    )

    def of(self, type_: str) -> TypeState:
        return self.types.get(type_key(type_), _NO_TYPE)

    def decide(self, device: DeviceState, now: datetime) -> Decision:
        kind = self.of(device.type)
        return decide_for_target(kind.policy, kind.target, self.window, device, now)

    def status(
        self,
        type_: str,
        version: str,
        report_state: str | None,
        report_version: str | None,
        *,
        standing: Standing | None = None,
        attempted: bool = False,
    ) -> Status:
        """The update status, derived from the policy or rollout now and what the device last said.

        For a type with an active rollout it also depends on the device's
        ``standing`` (bucket, trial, held) and on ``attempted``, whether it has an
        attempt in the rollout; without a standing the device counts as one in
        the last bucket, not a trial device, not held.
        """
        kind = self.of(type_)
        if kind.rollout is None:
            return status_for_target(
                kind.policy, kind.target, version, report_state, report_version
            )
        return rollout_status(
            kind.rollout.view,
            standing or _OUTSIDE,
            version,
            report_state,
            report_version,
            attempted=attempted,
        )

    def possible_statuses(
        self, type_: str, version: str, report_state: str | None, report_version: str | None
    ) -> frozenset[Status]:
        """Every status a device of this (type, version, last report) can have, whatever
        its standing in a rollout: what a filter by status may skip without reading rows."""
        kind = self.of(type_)
        found = {self.status(type_, version, report_state, report_version)}
        if kind.rollout is not None:
            view = kind.rollout.view
            stable = status_for_target(
                view.stable_policy, view.stable, version, report_state, report_version
            )
            found.add(Status.WAITING if stable in _STAGED else stable)
            for standing in _STANDINGS:
                for attempted in (False, True):
                    found.add(rollout_status(view, standing, version, report_state,
                                             report_version, attempted=attempted))  # fmt: skip
        return frozenset(found)

    def admits(self, type_: str, standing: Standing) -> bool | None:
        """Whether the type's active rollout admits a device now; None without one."""
        kind = self.of(type_)
        return None if kind.rollout is None else admitted(kind.rollout.view, standing)

    def target_version(self, type_: str, *, towards_rollout: bool = False) -> str | None:
        """The version a device of the type is sent to: during a rollout its version for a
        device admitted or with an attempt (``towards_rollout``), else the stable one."""
        kind = self.of(type_)
        if kind.rollout is None:
            return kind.target.version if kind.target else None
        if towards_rollout:
            return kind.rollout.view.version
        stable = kind.rollout.view.stable
        return stable.version if stable else None


_OUTSIDE = Standing(bucket=BUCKETS - 1)
# One standing of each kind that rollout_status tells apart (admitted whenever it runs).
_STANDINGS = (_OUTSIDE, Standing(bucket=0, trial=True), Standing(bucket=0, held=True))
_STAGED = (Status.UP_TO_DATE, Status.NO_POLICY)


@dataclass(frozen=True)
class PolicyView:
    """A policy as admins see it, with what it currently means."""

    type: str
    version_to_use: str | None
    allow_newer: bool
    target_version: str | None
    packages: int

    @classmethod
    def of(cls, kind: TypeState, name: str = "") -> PolicyView:
        """The view of one type's state: the one place a policy is shown from.

        ``name``: the type's spelling when neither a policy nor a package gives one.
        """
        policy = kind.policy
        return cls(
            type=policy.type if policy else kind.packages[0].type if kind.packages else name,
            version_to_use=policy.version_to_use if policy else None,
            allow_newer=policy.allow_newer if policy else False,
            target_version=kind.target.version if kind.target else None,
            packages=len(kind.packages),
        )

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


def current_generation(db: sqlite_utils.Database) -> int:
    generation: int
    (generation,) = db.execute("SELECT generation FROM config_generation").fetchone()
    return generation


def load_fleet_state(db: sqlite_utils.Database) -> FleetState:
    """Read policies, packages and window in one read transaction (or the caller's)."""
    with reading(db):
        generation = current_generation(db)
        policies = load_policies(db)
        by_type: dict[str, list[Package]] = {}
        for package in list_packages(db):
            by_type.setdefault(type_key(package.type), []).append(package)
        window = load_window(db)
        active = [
            rollout_from_row(row)
            for row in db.execute(f"SELECT {COLUMNS} FROM rollouts WHERE {ACTIVE_SQL}")
        ]
        trial = trial_serials(db)
        keys = db.execute("SELECT EXISTS (SELECT 1 FROM activation_keys)").fetchone()[0] == 1
    rollouts = {type_key(r.type): r for r in active}
    types = {}
    for key in set(policies) | set(by_type) | set(rollouts):
        policy = policies.get(key)
        packages = tuple(by_type.get(key, ()))
        rollout = rollouts.get(key)
        running = None
        if rollout is not None:
            version = next(p for p in packages if p.version == rollout.version)
            stable = next((p for p in packages if p.version == rollout.stable_version), None)
            options = rollout.options
            running = ActiveRollout(
                rollout.id,
                rollout.view(version, stable),
                options.max_attempts,
                options.max_in_flight is not None or options.max_per_hour is not None,
                rollout,
            )
        types[key] = TypeState(policy, packages, target_package(policy, packages), running)
    return FleetState(generation, types, window, trial, keys)


class FleetCache:
    """The :class:`FleetState` of one database, reloaded only when its generation moved.

    Reading ``config_generation`` costs a read transaction, too much for every
    poll. Every commit, by any connection or process, rewrites the header of
    SQLite's WAL index (the ``-shm`` file, https://www.sqlite.org/walformat.html:
    its change counter goes up), so while that header stays the same nothing
    was committed and the cached state is still current; when it moved (endpoint
    writes move it too) the generation is read as before. The header is read
    from a read-only mapping of the file, as SQLite itself reads it: no system
    call. ``db`` must stay open while the cache is used: an open connection is
    what keeps SQLite from removing or resetting the ``-shm`` file; and the cache
    must be closed only after every connection of the process to that database
    (closing the file drops the process's locks on it). Without that
    file (another journal mode) every call reads the generation, and so does
    the first call after ``RECHECK`` seconds, whatever the header says.

    >>> cache = FleetCache(db, path_of_db)                  # doctest: +SKIP
    >>> cache.get().generation                              # doctest: +SKIP
    7
    """

    _HEADER = 48  # one copy of the WAL-index header; SQLite keeps two, back to back
    RECHECK = 1.0

    def __init__(self, db: sqlite_utils.Database, path: Path | str) -> None:
        self._db = db
        self._state: FleetState | None = None
        self._seen: bytes | None = None
        self._checked = 0.0
        self._map: mmap.mmap | None = None
        # Kept open until close(): closing any descriptor of the file drops every
        # POSIX lock this process holds on it, SQLite's own included (its lock
        # that tells other processes the file is in use and must not be reset).
        try:
            self._fd: int | None = os.open(f"{path}-shm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = None
            return
        try:
            if os.fstat(self._fd).st_size >= 2 * self._HEADER:
                self._map = mmap.mmap(self._fd, 2 * self._HEADER, prot=mmap.PROT_READ)
        except (OSError, ValueError):
            self._map = None

    def get(self) -> FleetState:
        """The current state: cached, or reloaded if anyone changed the configuration."""
        header = self._header()
        state = self._state
        if (
            header is not None
            and header == self._seen
            and state is not None
            and time.monotonic() - self._checked < self.RECHECK
        ):
            return state
        # The header was read before the generation, so a commit after that
        # read moves the header again and the next call looks again.
        generation = current_generation(self._db)
        if state is None or state.generation != generation:
            state = self._state = load_fleet_state(self._db)
        self._seen = header
        self._checked = time.monotonic()
        return state

    def close(self) -> None:
        """Unmap and close the ``-shm`` file: only once every connection of this process
        to the database is closed (see ``__init__``)."""
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _header(self) -> bytes | None:
        if self._map is None:
            return None
        data = self._map[: 2 * self._HEADER]
        # Both copies equal (SQLite writes one, then the other) and initialised:
        # anything else is a header being written, or none, so look in the database.
        first = data[: self._HEADER]
        if first != data[self._HEADER :] or first[12] != 1:
            return None
        return first
