"""Staged rollouts: one device type moved to a new version wave by wave (SPEC section 6).

A rollout freezes the type's policy as it stood at its start (the *stable*
target for every device it does not admit), opens its waves one after the
other when their gates pass, and halts by itself when the new version fails.
Every change is a ``BEGIN IMMEDIATE`` read-check-write with its audit-log
entry, so two evaluators (the CLI, several server workers) can never both make
one transition.

The admin side: :func:`start_rollout`, :func:`pause_rollout`,
:func:`resume_rollout`, :func:`advance_rollout`, :func:`abort_rollout`,
:func:`rollout_views`, :func:`list_rollouts`, the trial devices and
:func:`retry_device`. The server side: :func:`load_rollouts` (what the
decision reads), :func:`reserve_attempt` (an offer that opens an attempt),
:func:`record_sightings` and :func:`record_outcomes` (what polls and reports
say of attempts) and :func:`evaluate` (timeouts and gates, every few seconds).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlite_utils

from dynupdate.core import audit
from dynupdate.core.audit import Action
from dynupdate.core.db import write
from dynupdate.core.decision import Policy, RolloutView
from dynupdate.core.devices import type_key, validate_type
from dynupdate.core.errors import Conflict, InvalidInput, NotFound
from dynupdate.core.gates import (
    LIVE_WINDOW,
    Gate,
    RolloutOptions,
    WaveEvidence,
    halt_reason,
    wave_gate,
)
from dynupdate.core.packages import Package, add_package, find_package, list_packages
from dynupdate.core.store import PackageStore
from dynupdate.core.times import format_utc, parse_utc, utc_now
from dynupdate.core.versions import same_version, version_key
from dynupdate.core.vocabulary import RolloutState
from dynupdate.core.waves import Wave, bucket, covers, format_percent, parse_waves

__all__ = [
    "Rollout",
    "abort_rollout",
    "active_rollout",
    "add_trial",
    "advance_rollout",
    "list_rollouts",
    "list_trial",
    "pause_rollout",
    "refuse_during_rollout",
    "remove_trial",
    "resume_rollout",
    "rollout_views",
    "start_rollout",
]

_ACTIVE = tuple(state.value for state in RolloutState if state.active)
_ACTIVE_SQL = "state IN ('running', 'paused', 'halted')"
# An endpoint row (alias e) is a trial device: its serial or its endpoint's is named.
_TRIAL_OF = "EXISTS (SELECT 1 FROM trial_devices t WHERE t.serial IN (e.serial, e.parent_serial))"


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


def _options_json(options: RolloutOptions) -> str:
    data = {
        "soak": options.soak.total_seconds(),
        "min_devices": options.min_devices,
        "min_success": options.min_success,
        "max_failures": options.max_failures,
        "max_failure_rate": options.max_failure_rate,
        "max_in_flight": options.max_in_flight,
        "max_per_hour": options.max_per_hour,
        "max_attempts": options.max_attempts,
        "install_timeout": options.install_timeout.total_seconds(),
        "manual": options.manual,
    }
    return json.dumps(data, sort_keys=True)


def _options(text: str, waves: tuple[Wave, ...]) -> RolloutOptions:
    data = json.loads(text)
    return RolloutOptions(
        waves=waves,
        soak=timedelta(seconds=data["soak"]),
        min_devices=data["min_devices"],
        min_success=data["min_success"],
        max_failures=data["max_failures"],
        max_failure_rate=data["max_failure_rate"],
        max_in_flight=data["max_in_flight"],
        max_per_hour=data["max_per_hour"],
        max_attempts=data["max_attempts"],
        install_timeout=timedelta(seconds=data["install_timeout"]),
        manual=data["manual"],
    )


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


_COLUMNS = (
    "id, type, version, stable_version, policy_version, policy_allow_newer, state, waves, wave,"
    " wave_opened_at, options, halt_reason, resumed_at, stopped_at, stopped_seconds,"
    " started_at, finished_at"
)


def _rollout(row: Sequence[Any]) -> Rollout:
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
        wave_opened_at=_time(opened),
        options=_options(options, waves),
        halt_reason=reason,
        resumed_at=parse_utc(resumed),
        stopped_at=parse_utc(stopped),
        stopped_seconds=stopped_seconds,
        started_at=_time(started),
        finished_at=parse_utc(finished),
    )


def _time(text: str) -> datetime:
    moment = parse_utc(text)
    assert moment is not None
    return moment


def _stamp(moment: datetime) -> str:
    text = format_utc(moment)
    assert text is not None
    return text


def active_rollout(db: sqlite_utils.Database, type_: str) -> Rollout | None:
    """The type's rollout that is running, paused or halted, if any."""
    row = db.execute(
        f"SELECT {_COLUMNS} FROM rollouts WHERE type_key = ? AND {_ACTIVE_SQL}",
        (type_key(type_),),
    ).fetchone()
    return _rollout(row) if row else None


def _require_active(db: sqlite_utils.Database, type_: str) -> Rollout:
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


# Starting ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a start would do (``rollout start --dry-run``)."""

    type: str
    version: str
    stable_version: str | None
    waves: list[dict[str, Any]]  # per wave: wave (label), devices (cumulative)
    warning: str | None


def _stable(
    db: sqlite_utils.Database, type_: str, package: Package
) -> tuple[Policy | None, Package | None]:
    """The type's active policy and its stable package, as a rollout to ``package`` sees them."""
    row = db.execute(
        "SELECT type, version_to_use, allow_newer FROM policies"
        " WHERE type_key = ? AND version_to_use IS NOT NULL",
        (type_key(type_),),
    ).fetchone()
    if row is None:
        return None, None
    policy = Policy(row[0], row[1], bool(row[2]))
    packages = list_packages(db, type_)
    if not policy.allow_newer:
        stable = next((p for p in packages if same_version(p.version, policy.version_to_use)), None)
        return policy, stable
    floor = version_key(policy.version_to_use)
    below = [
        p
        for p in packages
        if not p.blocked and floor <= version_key(p.version) < version_key(package.version)
    ]
    return policy, max(below, key=lambda p: version_key(p.version), default=None)


def _check_start(
    db: sqlite_utils.Database, type_: str, version: str
) -> tuple[Package, Policy | None, Package | None]:
    validate_type(type_)
    package = find_package(db, type_, version)
    if package is None:
        available = ", ".join(p.version for p in list_packages(db, type_)) or "none uploaded"
        raise NotFound(f"No package {type_} {version} to roll out; available: {available}.")
    refuse_during_rollout(db, type_, "one rollout of a type at a time")
    policy, stable = _stable(db, type_, package)
    key = version_key(package.version)
    for floor, what in (
        (stable.version if stable else None, "the stable version"),
        (policy.version_to_use if policy else None, "the version to use"),
    ):
        if floor is not None and key <= version_key(floor):
            raise Conflict(
                f"{package.type} {package.version} is not newer than {what} {floor}: "
                "a rollout moves a type forward."
            )
    newer = [
        p.version
        for p in list_packages(db, type_)
        if not p.blocked and version_key(p.version) > key
    ]
    if newer:
        raise Conflict(
            f"{package.type} has {', '.join(newer)}, newer than {package.version}: roll out the "
            f"newest, or remove the newer packages first."
        )
    return package, policy, stable


def start_rollout(
    db: sqlite_utils.Database,
    type_: str,
    version: str,
    options: RolloutOptions | None = None,
    *,
    actor: str | None = None,
    now: datetime | None = None,
) -> Rollout:
    """Start a rollout of ``type_`` to ``version`` (an uploaded package); wave 1 opens now."""
    options = options or RolloutOptions()
    now = now or utc_now()
    with write(db):
        return _start(db, type_, version, options, actor=actor, now=now)


def _start(
    db: sqlite_utils.Database,
    type_: str,
    version: str,
    options: RolloutOptions,
    *,
    actor: str | None,
    now: datetime,
) -> Rollout:
    """:func:`start_rollout` inside the caller's write transaction (``package add --rollout``)."""
    package, policy, stable = _check_start(db, type_, version)
    stamp = _stamp(now)
    _block(db, package.type, package.version, blocked=False)  # starting unblocks V
    cursor = db.execute(
        "INSERT INTO rollouts (type, type_key, version, stable_version, policy_version,"
        " policy_allow_newer, state, waves, wave, wave_opened_at, options, started_at)"
        " VALUES (?, ?, ?, ?, ?, ?, 'running', ?, 1, ?, ?, ?)",
        (
            package.type,
            type_key(package.type),
            package.version,
            stable.version if stable else None,
            policy.version_to_use if policy else None,
            None if policy is None else int(policy.allow_newer),
            json.dumps([wave.label for wave in options.waves]),
            stamp,
            _options_json(options),
            stamp,
        ),
    )
    rollout_id = cursor.lastrowid
    # Devices already offered V, or that reported about it, count as offered with
    # an attempt open: what they do next is evidence like any other.
    known = db.execute(
        "SELECT serial, parent_serial, version, offered_version, report_version, report_state"
        " FROM endpoints WHERE type_key = ?",
        (type_key(package.type),),
    ).fetchall()
    trial = _trial_serials(db)
    for serial, parent, _version, offered, reported, state in known:
        if not (
            (offered is not None and same_version(offered, package.version))
            or (reported is not None and state and same_version(reported, package.version))
        ):
            continue
        _open(db, rollout_id, serial, parent, trial, stamp, 0.0)
    rollout = _load(db, rollout_id)
    audit.append(
        db,
        actor,
        Action.ROLLOUT_START,
        rollout.type,
        {
            "id": rollout.id,
            "version": rollout.version,
            "stable_version": rollout.stable_version,
            **options_to_dict(options),
        },
    )
    return rollout


def _load(db: sqlite_utils.Database, rollout_id: int) -> Rollout:
    row = db.execute(f"SELECT {_COLUMNS} FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
    return _rollout(row)


def plan_rollout(
    db: sqlite_utils.Database, type_: str, version: str, options: RolloutOptions | None = None
) -> Plan:
    """What :func:`start_rollout` would do, refusing as it would; changes nothing."""
    options = options or RolloutOptions()
    db.conn.execute("BEGIN")
    try:
        package, _policy, stable = _check_start(db, type_, version)
        lead = db.execute(
            f"SELECT e.bucket, {_TRIAL_OF} FROM endpoints e WHERE e.type_key = ?",
            (type_key(package.type),),
        ).fetchall()
    finally:
        db.conn.execute("COMMIT")
    waves = [
        {
            "wave": wave.label,
            "devices": sum(1 for b, trial in lead if covers(wave, bucket=b, trial=bool(trial))),
        }
        for wave in options.waves
    ]
    return Plan(package.type, package.version, stable.version if stable else None, waves,
                options.warning)  # fmt: skip


# Attempts ------------------------------------------------------------------------------


def _trial_serials(db: sqlite_utils.Database) -> frozenset[str]:
    return frozenset(row[0] for row in db.execute("SELECT serial FROM trial_devices"))


def _open(
    db: sqlite_utils.Database,
    rollout_id: int,
    serial: str,
    parent: str | None,
    trial: frozenset[str],
    stamp: str,
    stopped: float,
) -> None:
    """Open an attempt for a device (its row made on its first)."""
    lead = parent or serial
    db.execute(
        "INSERT INTO rollout_devices (rollout_id, serial, bucket, trial, offered_at, attempts,"
        " open_at, open_stopped) VALUES (?, ?, ?, ?, ?, 1, ?, ?)"
        " ON CONFLICT (rollout_id, serial) DO UPDATE SET attempts = attempts + 1,"
        " open_at = excluded.open_at, open_stopped = excluded.open_stopped,"
        " offered_at = coalesce(offered_at, excluded.offered_at)",
        (rollout_id, serial, bucket(lead), int(serial in trial or lead in trial), stamp, stamp,
         stopped),
    )  # fmt: skip
    db.execute(
        "INSERT INTO rollout_attempts (rollout_id, serial, opened_at) VALUES (?, ?, ?)",
        (rollout_id, serial, stamp),
    )


# Counts and views ----------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    offered: int = 0
    in_flight: int = 0
    succeeded: int = 0
    failed: int = 0
    held: int = 0


def _counts(db: sqlite_utils.Database, rollout: Rollout, now: datetime) -> Counts:
    deadline = _open_deadline_sql(rollout, now)
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


def _open_deadline_sql(rollout: Rollout, now: datetime) -> str:
    """SQL true for an open attempt that has not timed out (pauses do not count)."""
    limit = rollout.options.install_timeout.total_seconds()
    stopped = rollout.stopped_total(now)
    # elapsed = now - open_at - (stopped now - stopped at open), in seconds
    return (
        f"(julianday('{_stamp(now)}') - julianday(open_at)) * 86400.0"
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


def _evidence(db: sqlite_utils.Database, rollout: Rollout, now: datetime) -> WaveEvidence:
    own, params = _own_sql(rollout, rollout.wave)
    deadline = _open_deadline_sql(rollout, now)
    outcomes, succeeded, in_flight = db.execute(
        "SELECT sum(succeeded_at IS NOT NULL OR failures > 0), count(succeeded_at),"
        f" sum(open_at IS NOT NULL AND {deadline})"
        f" FROM rollout_devices d WHERE d.rollout_id = ? AND {own}",
        (rollout.id, *params),
    ).fetchone()
    return WaveEvidence(outcomes or 0, succeeded or 0, in_flight or 0, _live(db, rollout, now))


def _live(db: sqlite_utils.Database, rollout: Rollout, now: datetime) -> int:
    """K: the wave's own devices on a version older than V heard from within 7 days."""
    cutoff = _stamp(now - LIVE_WINDOW)
    bounds = _wave_bounds(rollout, rollout.wave)
    params: tuple[int, ...] = ()
    if bounds is None:
        where = _TRIAL_OF
    else:
        where, params = f"(e.bucket >= ? AND e.bucket < ? AND NOT {_TRIAL_OF})", bounds
        if rollout.wave == 1:
            where = f"({where} OR {_TRIAL_OF})"
    rows = db.execute(
        "SELECT e.version, count(*) FROM endpoints e WHERE e.type_key = ?"
        " AND (e.last_poll >= ? OR e.last_report >= ?)"
        f" AND {where} GROUP BY e.version",
        (type_key(rollout.type), cutoff, cutoff, *params),
    ).fetchall()
    target = version_key(rollout.version)
    return sum(count for version, count in rows if version_key(version) < target)


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
            _evidence(db, rollout, now),
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
    now = now or utc_now()
    where, params = ("WHERE type_key = ?", (type_key(type_),)) if type_ else ("", ())
    db.conn.execute("BEGIN")
    try:
        rows = db.execute(
            f"SELECT {_COLUMNS} FROM rollouts {where} ORDER BY id DESC", params
        ).fetchall()
        seen: set[str] = set()
        chosen = []
        for row in rows:
            rollout = _rollout(row)
            key = type_key(rollout.type)
            if rollout.state.active or key not in seen:
                chosen.append(rollout)
            seen.add(key)
        summaries = [_summary(db, r, now) for r in chosen]
    finally:
        db.conn.execute("COMMIT")
    return sorted(summaries, key=lambda s: (type_key(s.rollout.type), -s.rollout.id))


def list_rollouts(
    db: sqlite_utils.Database, type_: str | None = None, *, now: datetime | None = None
) -> list[RolloutSummary]:
    """Every rollout, newest first."""
    now = now or utc_now()
    where, params = ("WHERE type_key = ?", (type_key(type_),)) if type_ else ("", ())
    db.conn.execute("BEGIN")
    try:
        rows = db.execute(
            f"SELECT {_COLUMNS} FROM rollouts {where} ORDER BY id DESC", params
        ).fetchall()
        return [_summary(db, _rollout(row), now) for row in rows]
    finally:
        db.conn.execute("COMMIT")


# Admin transitions ---------------------------------------------------------------------


def _transition(
    db: sqlite_utils.Database,
    type_: str,
    allowed: tuple[RolloutState, ...],
    command: str,
) -> Rollout:
    rollout = _require_active(db, type_)
    if rollout.state not in allowed:
        states = " or ".join(str(s) for s in allowed)
        raise Conflict(
            f"The rollout of {rollout.type} is {rollout.state}: rollout {command} works "
            f"only when it is {states}."
        )
    return rollout


def pause_rollout(
    db: sqlite_utils.Database, type_: str, *, actor: str | None = None, now: datetime | None = None
) -> Rollout:
    """Stop offering V (a running rollout); attempts in flight go on."""
    now = now or utc_now()
    with write(db):
        _evaluate_all(db, now)
        rollout = _transition(db, type_, (RolloutState.RUNNING,), "pause")
        db.execute(
            "UPDATE rollouts SET state = 'paused', stopped_at = ? WHERE id = ?",
            (_stamp(now), rollout.id),
        )
        audit.append(db, actor, Action.ROLLOUT_PAUSE, rollout.type, {"id": rollout.id})
        return _load(db, rollout.id)


def resume_rollout(
    db: sqlite_utils.Database, type_: str, *, actor: str | None = None, now: datetime | None = None
) -> Rollout:
    """Run a paused or halted rollout again; after a halt, the halt rules count afresh."""
    now = now or utc_now()
    with write(db):
        _evaluate_all(db, now)
        rollout = _transition(db, type_, (RolloutState.PAUSED, RolloutState.HALTED), "resume")
        db.execute(
            "UPDATE rollouts SET state = 'running', stopped_at = NULL, stopped_seconds = ?,"
            " halt_reason = NULL, resumed_at = ? WHERE id = ?",
            (rollout.stopped_total(now), _stamp(now), rollout.id),
        )
        audit.append(
            db,
            actor,
            Action.ROLLOUT_RESUME,
            rollout.type,
            {"id": rollout.id, "from": str(rollout.state), "halt_reason": rollout.halt_reason},
        )
        return _load(db, rollout.id)


def advance_rollout(
    db: sqlite_utils.Database, type_: str, *, actor: str | None = None, now: datetime | None = None
) -> Rollout:
    """Open the next wave now, gate skipped; on the last wave, complete the rollout."""
    now = now or utc_now()
    with write(db):
        _evaluate_all(db, now)
        rollout = _transition(db, type_, (RolloutState.RUNNING,), "advance")
        audit.append(
            db,
            actor,
            Action.ROLLOUT_ADVANCE,
            rollout.type,
            {"id": rollout.id, "wave": rollout.wave},
        )
        _pass_wave(db, rollout, now, actor=actor)
        return _load(db, rollout.id)


def abort_rollout(
    db: sqlite_utils.Database, type_: str, *, actor: str | None = None, now: datetime | None = None
) -> Rollout:
    """End the rollout: V is blocked, the policy stays as it stood (its target the stable one)."""
    now = now or utc_now()
    with write(db):
        rollout = _transition(
            db,
            type_,
            (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.HALTED),
            "abort",
        )
        db.execute(
            "UPDATE rollouts SET state = 'aborted', finished_at = ?, stopped_at = NULL"
            " WHERE id = ?",
            (_stamp(now), rollout.id),
        )
        _block(db, rollout.type, rollout.version)
        audit.append(
            db,
            actor,
            Action.ROLLOUT_ABORT,
            rollout.type,
            {"id": rollout.id, "version": rollout.version, "from": str(rollout.state)},
        )
        return _load(db, rollout.id)


def _block(db: sqlite_utils.Database, type_: str, version: str, *, blocked: bool = True) -> None:
    db.execute(
        "UPDATE packages SET blocked = ? WHERE type_key = ? AND version = ?",
        (int(blocked), type_key(type_), version),
    )


def _pass_wave(
    db: sqlite_utils.Database, rollout: Rollout, now: datetime, *, actor: str | None
) -> None:
    """Open the next wave, or complete the rollout after its last."""
    if rollout.last_wave:
        db.execute(
            "UPDATE rollouts SET state = 'completed', finished_at = ? WHERE id = ?",
            (_stamp(now), rollout.id),
        )
        allow = rollout.policy.allow_newer if rollout.policy else False
        db.execute(
            "INSERT INTO policies (type_key, type, version_to_use, allow_newer, updated)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (type_key) DO UPDATE SET"
            " version_to_use = excluded.version_to_use, updated = excluded.updated",
            (type_key(rollout.type), rollout.type, rollout.version, int(allow), _stamp(now)),
        )
        audit.append(
            db,
            actor if actor is not None else audit.SERVER,
            Action.ROLLOUT_COMPLETED,
            rollout.type,
            {"id": rollout.id, "version": rollout.version},
        )
        return
    db.execute(
        "UPDATE rollouts SET wave = wave + 1, wave_opened_at = ? WHERE id = ?",
        (_stamp(now), rollout.id),
    )
    audit.append(
        db,
        audit.SERVER,
        Action.ROLLOUT_WAVE_OPENED,
        rollout.type,
        {"id": rollout.id, "wave": rollout.wave + 1,
         "share": rollout.waves[rollout.wave].label},
    )  # fmt: skip


# Gates ---------------------------------------------------------------------------------


def evaluate(db: sqlite_utils.Database, *, now: datetime | None = None) -> list[str]:
    """Time out attempts, halt, open waves, complete: one transaction for every rollout.

    Returns what happened, one line each (for the server's log).
    """
    now = now or utc_now()
    with write(db):
        return _evaluate_all(db, now)


def _evaluate_all(db: sqlite_utils.Database, now: datetime) -> list[str]:
    events: list[str] = []
    rows = db.execute(f"SELECT {_COLUMNS} FROM rollouts WHERE {_ACTIVE_SQL}").fetchall()
    for row in rows:
        rollout = _rollout(row)
        events.extend(_time_out(db, rollout, now))
        reason = _halt_check(db, rollout, now)
        if reason is not None:
            events.append(f"{rollout.type} {rollout.version} halted: {reason}")
            continue
        if rollout.state != RolloutState.RUNNING or rollout.options.manual:
            continue
        gate = wave_gate(
            rollout.options,
            _evidence(db, rollout, now),
            opened_at=rollout.wave_opened_at,
            now=now,
        )
        if gate.passed:
            _pass_wave(db, rollout, now, actor=audit.SERVER)
            events.append(
                f"{rollout.type} {rollout.version} completed"
                if rollout.last_wave
                else f"{rollout.type} {rollout.version} wave {rollout.wave + 1} opened"
            )
    return events


def _time_out(db: sqlite_utils.Database, rollout: Rollout, now: datetime) -> list[str]:
    """Attempts open longer than --install-timeout (pauses not counted) have failed."""
    if rollout.state != RolloutState.RUNNING:
        return []  # the clock stands while paused or halted
    deadline = _open_deadline_sql(rollout, now)
    serials = [
        row[0]
        for row in db.execute(
            f"SELECT serial FROM rollout_devices WHERE rollout_id = ? AND open_at IS NOT NULL"
            f" AND NOT {deadline}",
            (rollout.id,),
        )
    ]
    for serial in serials:
        _fail(db, rollout, serial, "timed out", now)
    return [f"{rollout.type} {rollout.version}: {serial} timed out" for serial in serials]


def _fail(
    db: sqlite_utils.Database, rollout: Rollout, serial: str, detail: str, now: datetime
) -> None:
    stamp = _stamp(now)
    db.execute(
        "UPDATE rollout_devices SET failures = failures + 1, open_at = NULL, open_stopped = NULL,"
        " succeeded_at = NULL, installed_at = NULL, failed_at = ?, detail = ?"
        " WHERE rollout_id = ? AND serial = ?",
        (stamp, detail, rollout.id, serial),
    )
    db.execute(
        "UPDATE rollout_attempts SET ended_at = ?, outcome = 'failed', detail = ?"
        " WHERE id = (SELECT max(id) FROM rollout_attempts WHERE rollout_id = ? AND serial = ?)",
        (stamp, detail, rollout.id, serial),
    )


def _halt_check(db: sqlite_utils.Database, rollout: Rollout, now: datetime) -> str | None:
    """Halt a running or paused rollout whose failures meet a halt rule; the reason, or None."""
    if rollout.state not in (RolloutState.RUNNING, RolloutState.PAUSED):
        return None
    since = _stamp(rollout.resumed_at) if rollout.resumed_at else ""
    failed, succeeded = db.execute(
        "SELECT sum(failures > 0 AND succeeded_at IS NULL AND failed_at > ?),"
        " sum(succeeded_at > ?) FROM rollout_devices WHERE rollout_id = ?",
        (since, since, rollout.id),
    ).fetchone()
    failed, succeeded = failed or 0, succeeded or 0
    reason = halt_reason(rollout.options, failed=failed, outcomes=failed + succeeded)
    if reason is None:
        return None
    stopped = rollout.stopped_at or now
    db.execute(
        "UPDATE rollouts SET state = 'halted', halt_reason = ?, stopped_at = ? WHERE id = ?",
        (reason, _stamp(stopped), rollout.id),
    )
    audit.append(
        db,
        audit.SERVER,
        Action.ROLLOUT_HALTED,
        rollout.type,
        {"id": rollout.id, "version": rollout.version, "reason": reason, "wave": rollout.wave},
    )
    return reason


# Trial devices -------------------------------------------------------------------------


def add_trial(
    db: sqlite_utils.Database, serials: Iterable[str], *, actor: str | None = None
) -> list[str]:
    """Name trial devices (known or not yet known); returns those newly added."""
    wanted = _serials(serials)
    stamp = _stamp(utc_now())
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


# What the server does with attempts ------------------------------------------------------


def reserve_attempt(
    db: sqlite_utils.Database,
    rollout_id: int,
    serial: str,
    parent: str | None,
    *,
    now: datetime | None = None,
) -> datetime | None:
    """Open an attempt for an offer of V, within the limits; or the ``retryAt`` when full.

    Runs in its own write transaction: the limits are read and the slot taken
    under one lock, so no number of workers can exceed ``--max-in-flight`` or
    ``--max-per-hour``. An attempt already open is kept (None: offer V again).
    """
    now = now or utc_now()
    with write(db):
        rollout = _load(db, rollout_id)
        row = db.execute(
            "SELECT open_at FROM rollout_devices WHERE rollout_id = ? AND serial = ?",
            (rollout_id, serial),
        ).fetchone()
        if row is not None and row[0] is not None:
            return None
        retry = _limited_until(db, rollout, now)
        if retry is not None:
            return retry
        _open(db, rollout_id, serial, parent, _trial_serials(db), _stamp(now),
              rollout.stopped_total(now))  # fmt: skip
        return None


def _limited_until(db: sqlite_utils.Database, rollout: Rollout, now: datetime) -> datetime | None:
    """When a slot is expected to free if a new attempt would exceed a limit; else None."""
    options = rollout.options
    waits: list[datetime] = []
    if options.max_in_flight is not None:
        deadline = _open_deadline_sql(rollout, now)
        opened = [
            _time(row[0])
            for row in db.execute(
                f"SELECT open_at FROM rollout_devices WHERE rollout_id = ?"
                f" AND open_at IS NOT NULL AND {deadline} ORDER BY open_at",
                (rollout.id,),
            )
        ]
        if len(opened) >= options.max_in_flight:
            # At the latest, the oldest attempt in flight times out.
            waits.append(opened[0] + options.install_timeout)
    if options.max_per_hour is not None:
        hour_ago = now - timedelta(hours=1)
        recent = [
            _time(row[0])
            for row in db.execute(
                "SELECT opened_at FROM rollout_attempts WHERE rollout_id = ? AND opened_at > ?"
                " ORDER BY opened_at",
                (rollout.id, _stamp(hour_ago)),
            )
        ]
        if len(recent) >= options.max_per_hour:
            waits.append(recent[len(recent) - options.max_per_hour] + timedelta(hours=1))
    return max(waits) if waits else None


@dataclass(frozen=True)
class Seen:
    """What a poll or a report says of a device in a rollout (see :func:`note_devices`)."""

    serial: str
    version: str
    state: str | None = None  # a report's state; None for a poll
    detail: str | None = None


def note_devices(
    db: sqlite_utils.Database, rollout_id: int, seen: Sequence[Seen], now: datetime
) -> str | None:
    """Record what polls and reports say of attempts, then apply the halt rules.

    Inside the caller's write transaction (the one recording the polls or the
    report), so a failure that meets a halt rule halts in the transaction that
    records it. Returns the halt reason when this halted the rollout.
    """
    if not db.conn.in_transaction:
        raise RuntimeError("note_devices needs the write transaction of the polls or report")
    rollout = _load(db, rollout_id)
    target = version_key(rollout.version)
    stamp = _stamp(now)
    failed = False
    for item in seen:
        row = db.execute(
            "SELECT attempts, open_at, installed_at, succeeded_at FROM rollout_devices"
            " WHERE rollout_id = ? AND serial = ?",
            (rollout_id, item.serial),
        ).fetchone()
        if row is None or not row[0]:
            continue  # never offered V in this rollout: nothing to verify
        _attempts, open_at, installed_at, succeeded_at = row
        newer = version_key(item.version) >= target
        if item.state is None:  # a poll: the device says what it runs
            if newer and succeeded_at is None:
                _succeed(db, rollout_id, item.serial, stamp)
            elif not newer and (succeeded_at is not None or installed_at is not None):
                _fail(db, rollout, item.serial, f"reverted to {item.version}", now)
                failed = True
        elif open_at is not None and same_version(item.version, rollout.version):
            if item.state == "failed":
                _fail(db, rollout, item.serial, item.detail or "failed", now)
                failed = True
            elif item.state == "installed":
                db.execute(
                    "UPDATE rollout_devices SET installed_at = ? WHERE rollout_id = ?"
                    " AND serial = ?",
                    (stamp, rollout_id, item.serial),
                )
    return _halt_check(db, rollout, now) if failed else None


def _succeed(db: sqlite_utils.Database, rollout_id: int, serial: str, stamp: str) -> None:
    db.execute(
        "UPDATE rollout_devices SET succeeded_at = ?, open_at = NULL, open_stopped = NULL"
        " WHERE rollout_id = ? AND serial = ?",
        (stamp, rollout_id, serial),
    )
    db.execute(
        "UPDATE rollout_attempts SET ended_at = ?, outcome = 'succeeded'"
        " WHERE id = (SELECT max(id) FROM rollout_attempts WHERE rollout_id = ? AND serial = ?)"
        " AND ended_at IS NULL",
        (stamp, rollout_id, serial),
    )


def retry_device(db: sqlite_utils.Database, serial: str, *, actor: str | None = None) -> None:
    """Give a held device fresh attempts (its count starts again at 0)."""
    with write(db):
        row = db.execute(
            "SELECT d.rollout_id, r.type, d.failures, r.options, r.waves FROM rollout_devices d"
            f" JOIN rollouts r ON r.id = d.rollout_id WHERE d.serial = ? AND r.{_ACTIVE_SQL}"
            " AND d.open_at IS NULL AND d.succeeded_at IS NULL",
            (serial,),
        ).fetchone()
        held = (
            row is not None
            and row[2] >= _options(row[3], parse_waves(json.loads(row[4]))).max_attempts
        )
        if not held:
            known = db.execute("SELECT 1 FROM endpoints WHERE serial = ?", (serial,)).fetchone()
            if not known:
                raise NotFound(f"No endpoint {serial!r}. See: dynupdate endpoint list")
            raise Conflict(f"{serial} is not held: endpoint retry is only for held devices.")
        db.execute(
            "UPDATE rollout_devices SET failures = 0, attempts = 0 WHERE rollout_id = ?"
            " AND serial = ?",
            (row[0], serial),
        )
        audit.append(db, actor, Action.ENDPOINT_RETRY, None, {"serial": serial,
                                                               "rollout": row[0]})  # fmt: skip


def device_standing(
    db: sqlite_utils.Database, rollout_id: int, serial: str
) -> tuple[bool, bool, bool]:
    """(attempted, held, attempt_open) of a device in a rollout, read in one indexed lookup."""
    row = db.execute(
        "SELECT d.attempts, d.failures, d.open_at, d.succeeded_at, r.options, r.waves"
        " FROM rollout_devices d JOIN rollouts r ON r.id = d.rollout_id"
        " WHERE d.rollout_id = ? AND d.serial = ?",
        (rollout_id, serial),
    ).fetchone()
    if row is None:
        return False, False, False
    attempts, failures, open_at, succeeded_at, options, waves = row
    limit = _options(options, parse_waves(json.loads(waves))).max_attempts
    held = failures >= limit and open_at is None and succeeded_at is None
    return attempts > 0 or failures > 0, held, open_at is not None


# package add --rollout -------------------------------------------------------------------


def latest_options(db: sqlite_utils.Database, type_: str) -> RolloutOptions:
    """The options of the type's latest rollout, or the defaults: what ``--rollout`` starts from."""
    row = db.execute(
        "SELECT options, waves FROM rollouts WHERE type_key = ? ORDER BY id DESC LIMIT 1",
        (type_key(type_),),
    ).fetchone()
    return _options(row[0], parse_waves(json.loads(row[1]))) if row else RolloutOptions()


def add_and_start(
    db: sqlite_utils.Database,
    store: PackageStore,
    source: Path,
    type_: str,
    version: str,
    description: str | None = None,
    *,
    given: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    actor: str | None = None,
) -> tuple[Package, bool, Rollout | None]:
    """``package add --rollout``: the upload and the start in one transaction.

    Options not ``given`` come from the type's latest rollout. The identical
    file again starts a rollout only when none of its version is active or
    completed; otherwise it is the usual no-op (no rollout: None).
    """
    started: list[Rollout] = []

    def start_here(db: sqlite_utils.Database, package: Package, new: bool) -> None:
        if not new:
            earlier = db.execute(
                "SELECT 1 FROM rollouts WHERE type_key = ? AND version = ? AND state IN"
                " ('running', 'paused', 'halted', 'completed')",
                (type_key(package.type), package.version),
            ).fetchone()
            if earlier:
                return
        options = latest_options(db, package.type).given(**(given or {}))
        started.append(_start(db, package.type, package.version, options, actor=actor,
                              now=utc_now()))  # fmt: skip

    package, new = add_package(
        db, store, source, type_, version, description, progress, actor=actor, then=start_here
    )
    return package, new, started[0] if started else None


# What the live view shows ----------------------------------------------------------------


def wave_progress(db: sqlite_utils.Database, rollout: Rollout) -> list[dict[str, Any]]:
    """Per wave, its own known devices and how many of them succeeded."""
    known = db.execute(
        f"SELECT e.bucket, {_TRIAL_OF} FROM endpoints e WHERE e.type_key = ?",
        (type_key(rollout.type),),
    ).fetchall()
    done = db.execute(
        "SELECT bucket, trial FROM rollout_devices WHERE rollout_id = ?"
        " AND succeeded_at IS NOT NULL",
        (rollout.id,),
    ).fetchall()
    rows = []
    for index, wave in enumerate(rollout.waves, 1):
        own = _own_of(rollout, index)
        rows.append(
            {
                "wave": wave.label,
                "open": index <= rollout.wave,
                "devices": sum(1 for b, t in known if own(b, bool(t))),
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
