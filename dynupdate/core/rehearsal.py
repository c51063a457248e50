"""Dry runs: what a policy or window change would do to the fleet, without making it.

The proposed :class:`~dynupdate.core.fleet.FleetState` is the current one
with the change applied (``dataclasses.replace``, nothing written), and every
known device is put through the update decision as of its last poll: its
version, its in-call flag and its clock. A device the change would update is
offered the package *now*, *at the next opening* of the window (it is outside
it now), or not while it is *in a call*.

    rehearsal = rehearse_window(db, make_window(None, "22:00", "4h", "UTC"))
    rehearsal.totals()  # {'devices': 300, 'offered_now': 0, 'offered_at_next_opening': 280, …}
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

import sqlite_utils

from dynupdate.core.decision import Policy, is_satisfied, target_package
from dynupdate.core.devices import type_key
from dynupdate.core.fleet import FleetState, TypeState, load_fleet_state
from dynupdate.core.packages import require_package
from dynupdate.core.times import format_utc, utc_now
from dynupdate.core.versions import version_key
from dynupdate.core.windows import Window, is_open, next_opening

__all__ = ["OfferGroup", "Rehearsal", "rehearse", "rehearse_policy", "rehearse_window"]


@dataclass(frozen=True)
class OfferGroup:
    """The devices of one type on one version, and what the change would do to them."""

    type: str
    version: str  # what they run now
    devices: int
    offered_version: str | None  # what the change sends them to; None: nothing
    offered_version_before: str | None  # what the current settings send them to
    offered_now: int
    offered_at_next_opening: int  # outside the window now
    in_call: int  # would be offered, but were in a call at their last poll
    up_to_date: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Rehearsal:
    """What a change would do: per (type, version) groups and fleet totals.

    Only types the change leaves with an active policy have groups; devices
    of other types are counted in ``no_policy``. ``changed`` counts devices
    whose next poll would be answered otherwise than today: another version,
    or an offer instead of none (or the reverse), e.g. a window closing on them.
    """

    change: dict[str, Any]
    at: datetime
    window: Window | None
    next_opening: datetime | None  # the first opening a device outside the window waits for
    groups: tuple[OfferGroup, ...]
    no_policy: int
    changed: int

    def totals(self) -> dict[str, Any]:
        return {
            "devices": sum(g.devices for g in self.groups) + self.no_policy,
            "offered_now": sum(g.offered_now for g in self.groups),
            "offered_at_next_opening": sum(g.offered_at_next_opening for g in self.groups),
            "in_call": sum(g.in_call for g in self.groups),
            "up_to_date": sum(g.up_to_date for g in self.groups),
            "no_policy": self.no_policy,
            "changed": self.changed,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": True,
            "change": self.change,
            "at": format_utc(self.at),
            "window": self.window.to_dict() if self.window else None,
            "next_opening": format_utc(self.next_opening),
            "totals": self.totals(),
            "groups": [g.to_dict() for g in self.groups],
        }


def rehearse_policy(
    db: sqlite_utils.Database,
    type_: str,
    version: str,
    allow_newer: bool | None = None,
    *,
    now: datetime | None = None,
) -> Rehearsal:
    """What ``policy set TYPE --version V`` would do; refused as ``set_policy`` refuses.

    ``allow_newer=None`` keeps the current flag (exact for a new policy).
    """
    package = require_package(db, type_, version)
    current = load_fleet_state(db)
    kind = current.of(type_)
    if allow_newer is None:
        allow_newer = kind.policy.allow_newer if kind.policy else False
    policy = Policy(package.type, package.version, allow_newer)
    target = target_package(policy, kind.packages)
    types = dict(current.types) | {type_key(type_): TypeState(policy, kind.packages, target)}
    proposed = replace(current, types=types)
    change = {
        "kind": "policy",
        "type": package.type,
        "version_to_use": package.version,
        "allow_newer": allow_newer,
        "target_version": target.version if target else None,
    }
    return rehearse(db, current, proposed, change, only_type=type_, now=now)


def rehearse_window(
    db: sqlite_utils.Database, window: Window | None, *, now: datetime | None = None
) -> Rehearsal:
    """What ``window set`` (``window=None``: ``window clear``) would do."""
    current = load_fleet_state(db)
    proposed = replace(current, window=window)
    change = {"kind": "window", "window": window.to_dict() if window else None}
    return rehearse(db, current, proposed, change, now=now)


def rehearse(
    db: sqlite_utils.Database,
    current: FleetState,
    proposed: FleetState,
    change: dict[str, Any],
    *,
    only_type: str | None = None,
    now: datetime | None = None,
) -> Rehearsal:
    """Every known device (of ``only_type``) through the proposed state, as of ``now``."""
    now = now or utc_now()
    sql = "SELECT type, type_key, version, in_call, tz FROM endpoints"
    params: tuple[Any, ...] = ()
    if only_type is not None:
        sql += " WHERE type_key = ?"
        params = (type_key(only_type),)
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    names: dict[str, str] = {}
    no_policy = changed = 0
    first_opening: datetime | None = None
    openings: dict[tuple[int, str | None], tuple[bool, datetime | None]] = {}

    def opening(window: Window | None, tz: str | None) -> tuple[bool, datetime | None]:
        """Whether the window is open now for a device on ``tz``, else its next opening."""
        zone = tz if window is not None and window.tz == "endpoint" else None
        key = (id(window), zone)
        if key not in openings:
            openings[key] = _opening(window, now, zone)
        return openings[key]

    def answer(state: FleetState, offered: str | None, in_call: bool, tz: str | None) -> str | None:
        """The version the next poll would be offered under ``state``, or None."""
        if offered is None or in_call or not opening(state.window, tz)[0]:
            return None
        return offered

    for type_, key, version, in_call, tz in db.execute(sql, params):
        kind = proposed.of(type_)
        before = _offered(current.of(type_), version)
        offered = _offered(kind, version)
        changed += answer(current, before, in_call, tz) != answer(proposed, offered, in_call, tz)
        if kind.target is None:
            no_policy += 1
            continue
        names.setdefault(key, type_)
        group = groups.get((key, version))
        if group is None:
            group = groups[(key, version)] = defaultdict(int, offered=offered, before=before)
        group["devices"] += 1
        if offered is None:
            group["up_to_date"] += 1
        elif in_call:
            group["in_call"] += 1
        else:
            open_now, upcoming = opening(proposed.window, tz)
            if open_now:
                group["now"] += 1
            else:
                group["later"] += 1
                # Never None here: a closed window opens again.
                if upcoming is not None and (first_opening is None or upcoming < first_opening):
                    first_opening = upcoming
    rows = [
        OfferGroup(
            type=names[key],
            version=version,
            devices=g["devices"],
            offered_version=g["offered"],
            offered_version_before=g["before"],
            offered_now=g["now"],
            offered_at_next_opening=g["later"],
            in_call=g["in_call"],
            up_to_date=g["up_to_date"],
        )
        for (key, version), g in groups.items()
    ]
    rows.sort(key=lambda g: (type_key(g.type), version_key(g.version)))
    return Rehearsal(change, now, proposed.window, first_opening, tuple(rows), no_policy, changed)


def _offered(kind: TypeState, version: str) -> str | None:
    """The version a device on ``version`` is sent to (window and calls aside)."""
    if (
        kind.target is None
        or kind.policy is None
        or is_satisfied(version, kind.target, kind.policy.allow_newer)
    ):
        return None
    return kind.target.version


def _opening(window: Window | None, now: datetime, tz: str | None) -> tuple[bool, datetime | None]:
    if window is None or is_open(window, now, tz):
        return True, None
    return False, next_opening(window, now, tz)[0]
