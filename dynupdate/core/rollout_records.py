"""Rollouts as stored: the record, its options, its counts and what its views show.

The lifecycle is :mod:`dynupdate.core.rollouts`; per-device attempts are
:mod:`dynupdate.core.attempts`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

import sqlite_utils

from dynupdate.core.db import reading
from dynupdate.core.decision import Policy, RolloutView
from dynupdate.core.devices import type_key
from dynupdate.core.errors import Conflict, NotFound
from dynupdate.core.gates import (
    LIVE_WINDOW,
    Gate,
    RolloutOptions,
    WaveEvidence,
    wave_gate,
)
from dynupdate.core.packages import Package
from dynupdate.core.times import format_utc, parse_utc, utc_now
from dynupdate.core.versions import version_key
from dynupdate.core.vocabulary import RolloutState
from dynupdate.core.waves import Wave, format_percent, parse_waves

__all__ = [
    "ACTIVE_SQL",
    "COLUMNS",
    "TRIAL_OF",
    "Counts",
    "Rollout",
    "RolloutSummary",
    "active_rollout",
    "failures",
    "in_flight_sql",
    "latest_options",
    "list_rollouts",
    "load_rollout",
    "options_from_json",
    "options_json",
    "options_to_dict",
    "refuse_during_rollout",
    "require_active",
    "rollout_from_row",
    "rollout_views",
    "wave_evidence",
    "wave_progress",
]


ACTIVE_SQL = "state IN ('running', 'paused', 'halted')"
# An endpoint row (alias e) is a trial device: its serial or its endpoint's is named.
TRIAL_OF = "EXISTS (SELECT 1 FROM trial_devices t WHERE t.serial IN (e.serial, e.parent_serial))"


@dataclass(frozen=True)
class Rollout:
    """One rollout as stored (counts and gate come with :func:`rollout_views`)."""

    id: int
    type: str
    version: str
    stable_version: str | None
    policy: Policy | None  # the type's policy as it stood at the start
    state: RolloutState
    waves: tuple[Wave, ...]
    wave: int  # 1-based index of the highest open wave
    wave_opened_at: datetime
    options: RolloutOptions
    halt_reason: str | None
    resumed_at: datetime | None
    stopped_at: datetime | None  # paused or halted since
    stopped_seconds: float  # paused or halted before, in all
    started_at: datetime
    finished_at: datetime | None

    @property
    def current_wave(self) -> Wave:
        return self.waves[self.wave - 1]

    @property
    def last_wave(self) -> bool:
        return self.wave == len(self.waves)

    def stopped_total(self, now: datetime) -> float:
        """Seconds spent paused or halted so far (install timeouts do not count them)."""
        extra = (now - self.stopped_at).total_seconds() if self.stopped_at else 0.0
        return self.stopped_seconds + max(0.0, extra)

    def next_wave_at(self) -> datetime | None:
        if self.state != RolloutState.RUNNING or self.options.manual:
            return None
        return self.wave_opened_at + self.options.soak

    def view(self, package: Package, stable: Package | None) -> RolloutView:
        return RolloutView(self.state, package, self.policy, stable, self.current_wave)


# Options as stored: JSON with durations in seconds and shares in basis points.


_DURATIONS = frozenset({"soak", "install_timeout"})  # stored as seconds


def options_json(options: RolloutOptions) -> str:
    """Every option but the waves (stored apart, as the admin gave them)."""
    data: dict[str, Any] = {}
    for f in fields(options):
        value = getattr(options, f.name)
        if f.name != "waves":
            data[f.name] = value.total_seconds() if f.name in _DURATIONS else value
    return json.dumps(data, sort_keys=True)


def options_from_json(text: str, waves: tuple[Wave, ...]) -> RolloutOptions:
    data: dict[str, Any] = json.loads(text)
    for name in _DURATIONS:
        data[name] = timedelta(seconds=data[name])
    return RolloutOptions(waves=waves, **data)


def options_to_dict(options: RolloutOptions) -> dict[str, Any]:
    """The options as an admin types them (``rollout status --json``, the audit log)."""
    return {
        "waves": [wave.label for wave in options.waves],
        "soak": int(options.soak.total_seconds()),
        "min_devices": options.min_devices,
        "min_success": format_percent(options.min_success),
        "max_failures": options.max_failures,
        "max_failure_rate": format_percent(options.max_failure_rate),
        "max_in_flight": options.max_in_flight,
        "max_per_hour": options.max_per_hour,
        "max_attempts": options.max_attempts,
        "install_timeout": int(options.install_timeout.total_seconds()),
        "manual": options.manual,
    }


COLUMNS = (
    "id, type, version, stable_version, policy_version, policy_allow_newer, state, waves, wave,"
    " wave_opened_at, options, halt_reason, resumed_at, stopped_at, stopped_seconds,"
    " started_at, finished_at"
)


def rollout_from_row(row: Sequence[Any]) -> Rollout:
    id_, type_, version, stable, policy_version, allow_newer, state, waves_json = row[:8]
    wave, opened, options, reason, resumed, stopped, stopped_seconds, started, finished = row[8:]
    waves = parse_waves(json.loads(waves_json))
    policy = None if allow_newer is None else Policy(type_, policy_version, bool(allow_newer))
    return Rollout(
        id=id_,
        type=type_,
        version=version,
        stable_version=stable,
        policy=policy,
        state=RolloutState(state),
        waves=waves,
        wave=wave,
        wave_opened_at=parse_utc(opened),
        options=options_from_json(options, waves),
        halt_reason=reason,
        resumed_at=parse_utc(resumed),
        stopped_at=parse_utc(stopped),
        stopped_seconds=stopped_seconds,
        started_at=parse_utc(started),
        finished_at=parse_utc(finished),
    )


def active_rollout(db: sqlite_utils.Database, type_: str) -> Rollout | None:
    """The type's rollout that is running, paused or halted, if any."""
    row = db.execute(
        f"SELECT {COLUMNS} FROM rollouts WHERE type_key = ? AND {ACTIVE_SQL}",
        (type_key(type_),),
    ).fetchone()
    return rollout_from_row(row) if row else None


def require_active(db: sqlite_utils.Database, type_: str) -> Rollout:
    rollout = active_rollout(db, type_)
    if rollout is None:
        latest = db.execute(
            "SELECT state FROM rollouts WHERE type_key = ? ORDER BY id DESC LIMIT 1",
            (type_key(type_),),
        ).fetchone()
        after = f" (the latest is {latest[0]})" if latest else ""
        raise NotFound(
            f"No active rollout of {type_}{after}. See: dynupdate rollout list --type {type_}"
        )
    return rollout


def refuse_during_rollout(db: sqlite_utils.Database, type_: str, why: str) -> None:
    """Refuse a change while a rollout of ``type_`` is active, saying ``why`` and the fix."""
    rollout = active_rollout(db, type_)
    if rollout is not None:
        raise Conflict(
            f"A rollout of {rollout.type} is {rollout.state} (wave {rollout.wave} of "
            f"{len(rollout.waves)}): {why}; dynupdate rollout abort {rollout.type} first."
        )


def load_rollout(db: sqlite_utils.Database, rollout_id: int) -> Rollout:
    row = db.execute(f"SELECT {COLUMNS} FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
    return rollout_from_row(row)


# Counts and views ----------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    offered: int = 0
    in_flight: int = 0
    succeeded: int = 0
    failed: int = 0
    held: int = 0


def _counts(db: sqlite_utils.Database, rollout: Rollout, now: datetime) -> Counts:
    deadline = in_flight_sql(rollout, now)
    row = db.execute(
        "SELECT count(offered_at),"
        f" sum(open_at IS NOT NULL AND {deadline}),"
        " count(succeeded_at),"
        " sum(failures > 0 AND succeeded_at IS NULL),"
        " sum(failures >= ? AND open_at IS NULL AND succeeded_at IS NULL)"
        " FROM rollout_devices WHERE rollout_id = ?",
        (rollout.options.max_attempts, rollout.id),
    ).fetchone()
    return Counts(*(value or 0 for value in row))


def in_flight_sql(rollout: Rollout, now: datetime) -> str:
    """SQL true for an open attempt that has not timed out (pauses do not count)."""
    limit = rollout.options.install_timeout.total_seconds()
    stopped = rollout.stopped_total(now)
    # elapsed = now - open_at - (stopped now - stopped at open), in seconds
    return (
        f"(julianday('{format_utc(now)}') - julianday(open_at)) * 86400.0"
        f" - ({stopped!r} - open_stopped) < {limit!r}"
    )


def _wave_bounds(rollout: Rollout, index: int) -> tuple[int, int] | None:
    """The buckets ``[low, high)`` a wave covers that no earlier one did; None: trial only."""
    wave = rollout.waves[index - 1]
    if wave.share is None:
        return None
    earlier = [w.share for w in rollout.waves[: index - 1] if w.share is not None]
    return (earlier[-1] if earlier else 0), wave.share


def _own_sql(rollout: Rollout, index: int) -> tuple[str, tuple[Any, ...]]:
    """SQL over rollout_devices (alias d) for the wave's own devices."""
    bounds = _wave_bounds(rollout, index)
    if bounds is None:
        return "d.trial = 1", ()
    low, high = bounds
    trial = " OR d.trial = 1" if index == 1 else ""  # the first wave covers them too
    return f"((d.trial = 0 AND d.bucket >= ? AND d.bucket < ?){trial})", (low, high)


def wave_evidence(db: sqlite_utils.Database, rollout: Rollout, now: datetime) -> WaveEvidence:
    own, params = _own_sql(rollout, rollout.wave)
    deadline = in_flight_sql(rollout, now)
    outcomes, succeeded, in_flight = db.execute(
        "SELECT sum(succeeded_at IS NOT NULL OR failures > 0), count(succeeded_at),"
        f" sum(open_at IS NOT NULL AND {deadline})"
        f" FROM rollout_devices d WHERE d.rollout_id = ? AND {own}",
        (rollout.id, *params),
    ).fetchone()
    return WaveEvidence(outcomes or 0, succeeded or 0, in_flight or 0, _live(db, rollout, now))


def _live(db: sqlite_utils.Database, rollout: Rollout, now: datetime) -> int:
    """K: the wave's own devices on a version older than V heard from within 7 days.

    Counted only up to ``--min-devices``: the gate needs min(--min-devices, K), and
    stopping there reads a handful of rows, not half a million (the last wave of
    a large type), whose liveness is in the rows, not in an index.
    """
    enough = rollout.options.min_devices
    target = version_key(rollout.version)
    # The type's versions older than V. A skip-scan of the covering index on
    # (type_key, version, …): one seek per distinct version. SELECT DISTINCT reads
    # every entry of the type, ~30 ms for a million devices, in every worker at every
    # gate evaluation.
    older = [
        version
        for (version,) in db.execute(
            "WITH RECURSIVE v(version) AS ("
            " SELECT min(version) FROM endpoints WHERE type_key = :type"
            " UNION ALL SELECT (SELECT min(version) FROM endpoints"
            " WHERE type_key = :type AND version > v.version) FROM v"
            " WHERE v.version IS NOT NULL)"
            " SELECT version FROM v WHERE version IS NOT NULL",
            {"type": type_key(rollout.type)},
        )
        if version_key(version) < target
    ]
    if not older:
        return 0
    cutoff = format_utc(now - LIVE_WINDOW)
    bounds = _wave_bounds(rollout, rollout.wave)
    params: tuple[int, ...] = ()
    if bounds is None:
        where = TRIAL_OF
    else:
        where, params = f"(e.bucket >= ? AND e.bucket < ? AND NOT {TRIAL_OF})", bounds
        if rollout.wave == 1:
            where = f"({where} OR {TRIAL_OF})"
    count: int
    (count,) = db.execute(
        "SELECT count(*) FROM (SELECT 1 FROM endpoints e WHERE e.type_key = ?"
        " AND e.version IN (SELECT value FROM json_each(?))"
        " AND (e.last_poll >= ? OR e.last_report >= ?)"
        f" AND {where} LIMIT ?)",
        (type_key(rollout.type), json.dumps(older), cutoff, cutoff, *params, enough),
    ).fetchone()
    return count


@dataclass(frozen=True)
class RolloutSummary:
    """A rollout with its counts and gate: one row of ``rollout status``/``list``."""

    rollout: Rollout
    counts: Counts
    gate: Gate | None

    def to_dict(self) -> dict[str, Any]:
        r, c = self.rollout, self.counts
        return {
            "id": r.id,
            "type": r.type,
            "version": r.version,
            "stable_version": r.stable_version,
            "state": str(r.state),
            "waves": [wave.label for wave in r.waves],
            "wave": r.wave,
            "wave_opened_at": format_utc(r.wave_opened_at),
            "next_wave_at": format_utc(r.next_wave_at()),
            "offered": c.offered,
            "in_flight": c.in_flight,
            "succeeded": c.succeeded,
            "failed": c.failed,
            "held": c.held,
            "halt_reason": r.halt_reason,
            "started_at": format_utc(r.started_at),
            "finished_at": format_utc(r.finished_at),
            "gate": self.gate.to_dict() if self.gate else None,
            "options": options_to_dict(r.options),
        }


def _summary(db: sqlite_utils.Database, rollout: Rollout, now: datetime) -> RolloutSummary:
    gate = None
    if rollout.state.active:
        gate = wave_gate(
            rollout.options,
            wave_evidence(db, rollout, now),
            opened_at=rollout.wave_opened_at,
            now=now,
        )
        if rollout.state != RolloutState.RUNNING:
            reason = rollout.halt_reason if rollout.state == RolloutState.HALTED else None
            blocked = f"{rollout.state}" + (f": {reason}" if reason else "")
            gate = Gate(gate.outcomes, gate.needed, gate.succeeded, gate.in_flight, blocked)
        elif rollout.options.manual:
            blocked = "manual: waiting for dynupdate rollout advance"
            gate = Gate(gate.outcomes, gate.needed, gate.succeeded, gate.in_flight, blocked)
    return RolloutSummary(rollout, _counts(db, rollout, now), gate)


def rollout_views(
    db: sqlite_utils.Database, type_: str | None = None, *, now: datetime | None = None
) -> list[RolloutSummary]:
    """Active rollouts and the latest of each type (``rollout status``), by type."""
    summaries = _summaries(db, type_, now, every=False)
    return sorted(summaries, key=lambda s: (type_key(s.rollout.type), -s.rollout.id))


def list_rollouts(
    db: sqlite_utils.Database, type_: str | None = None, *, now: datetime | None = None
) -> list[RolloutSummary]:
    """Every rollout, newest first."""
    return _summaries(db, type_, now, every=True)


def _summaries(
    db: sqlite_utils.Database, type_: str | None, now: datetime | None, *, every: bool
) -> list[RolloutSummary]:
    """Rollouts newest first, counted in one read transaction: all, or the active ones
    and the latest of every other type."""
    now = now or utc_now()
    where, params = ("WHERE type_key = ?", (type_key(type_),)) if type_ else ("", ())
    with reading(db):
        rows = db.execute(
            f"SELECT {COLUMNS} FROM rollouts {where} ORDER BY id DESC", params
        ).fetchall()
        seen: set[str] = set()
        chosen = []
        for row in rows:
            rollout = rollout_from_row(row)
            key = type_key(rollout.type)
            if every or rollout.state.active or key not in seen:
                chosen.append(rollout)
            seen.add(key)
        return [_summary(db, rollout, now) for rollout in chosen]


# package add --rollout -------------------------------------------------------------------


def latest_options(db: sqlite_utils.Database, type_: str) -> RolloutOptions:
    """The options of the type's latest rollout, or the defaults: what ``--rollout`` starts from."""
    row = db.execute(
        "SELECT options, waves FROM rollouts WHERE type_key = ? ORDER BY id DESC LIMIT 1",
        (type_key(type_),),
    ).fetchone()
    return options_from_json(row[0], parse_waves(json.loads(row[1]))) if row else RolloutOptions()


# What the live view shows ----------------------------------------------------------------


def wave_progress(db: sqlite_utils.Database, rollout: Rollout) -> list[dict[str, Any]]:
    """Per wave, its own known devices and how many of them succeeded.

    Devices are counted per bucket range on the (type_key, bucket) index, then
    the few trial devices moved to the wave they belong to: no row of a large
    fleet is read (a million endpoints: 1.3 s counted row by row in Python).
    """
    key = type_key(rollout.type)
    # From the few trial serials to their rows: named devices, then the peripherals
    # of named endpoints not named themselves. CROSS JOIN keeps that order, and the
    # unary + keeps SQLite from scanning the type's index instead of the parent's.
    trial = [
        b
        for (b,) in db.execute(
            "SELECT e.bucket FROM trial_devices t CROSS JOIN endpoints e"
            " ON e.serial = t.serial WHERE +e.type_key = ?"
            " UNION ALL SELECT e.bucket FROM trial_devices t CROSS JOIN endpoints e"
            " ON e.parent_serial = t.serial WHERE +e.type_key = ?"
            " AND e.serial NOT IN (SELECT serial FROM trial_devices)",
            (key, key),
        )
    ]
    done = db.execute(
        "SELECT bucket, trial FROM rollout_devices WHERE rollout_id = ?"
        " AND succeeded_at IS NOT NULL",
        (rollout.id,),
    ).fetchall()
    rows = []
    for index, wave in enumerate(rollout.waves, 1):
        own = _own_of(rollout, index)
        bounds = _wave_bounds(rollout, index)
        devices = len(trial) if index == 1 else 0
        if bounds is not None:
            low, high = bounds
            (in_range,) = db.execute(
                "SELECT count(*) FROM endpoints WHERE type_key = ? AND bucket >= ? AND bucket < ?",
                (key, low, high),
            ).fetchone()
            devices += in_range - sum(1 for b in trial if low <= b < high)
        rows.append(
            {
                "wave": wave.label,
                "open": index <= rollout.wave,
                "devices": devices,
                "succeeded": sum(1 for b, t in done if own(b, bool(t))),
            }
        )
    return rows


def _own_of(rollout: Rollout, index: int) -> Callable[[int, bool], bool]:
    """The test :func:`_own_sql` makes, for rows already read."""
    bounds = _wave_bounds(rollout, index)
    if bounds is None:
        return lambda _b, trial: trial
    low, high = bounds
    return lambda b, trial: (trial and index == 1) or (not trial and low <= b < high)


def failures(db: sqlite_utils.Database, rollout: Rollout, limit: int = 10) -> list[dict[str, Any]]:
    """The latest failed devices with their details (newest first)."""
    return [
        {"serial": serial, "failed_at": failed_at, "detail": detail, "attempts": attempts}
        for serial, failed_at, detail, attempts in db.execute(
            "SELECT serial, failed_at, detail, attempts FROM rollout_devices WHERE rollout_id = ?"
            " AND failures > 0 AND succeeded_at IS NULL ORDER BY failed_at DESC LIMIT ?",
            (rollout.id, limit),
        )
    ]
