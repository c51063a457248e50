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

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import sqlite_utils

from dynupdate.core import audit
from dynupdate.core.attempts import halt_if_failing, open_attempt, time_out
from dynupdate.core.audit import Action
from dynupdate.core.db import reading, write
from dynupdate.core.decision import Policy
from dynupdate.core.devices import type_key, validate_type
from dynupdate.core.durations import format_duration
from dynupdate.core.errors import Conflict, NotFound
from dynupdate.core.gates import (
    RolloutOptions,
    wave_gate,
)
from dynupdate.core.packages import Package, find_package, list_packages
from dynupdate.core.rollout_records import (
    ACTIVE_SQL,
    COLUMNS,
    TRIAL_OF,
    Rollout,
    latest_options,
    load_rollout,
    options_json,
    options_to_dict,
    refuse_during_rollout,
    require_active,
    rollout_from_row,
    wave_evidence,
)
from dynupdate.core.times import format_utc, utc_now
from dynupdate.core.trial import trial_serials
from dynupdate.core.versions import same_version, version_key
from dynupdate.core.vocabulary import RolloutState
from dynupdate.core.waves import covers

__all__ = [
    "Plan",
    "StartOnImport",
    "abort_rollout",
    "advance_rollout",
    "evaluate",
    "pause_rollout",
    "plan_rollout",
    "resume_rollout",
    "start_rollout",
]

# Starting ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a start would do (``rollout start --dry-run``)."""

    type: str
    version: str
    stable_version: str | None
    waves: list[dict[str, Any]]  # per wave: wave (label), devices (cumulative)
    warning: str | None
    options: RolloutOptions

    def estimate(self) -> str:
        """The earliest time to 100 % the options allow, in words, and what bounds it.

        Every wave stays open at least ``--soak``; ``--max-per-hour`` opens at most
        that many attempts an hour, one per device at least. Installs and the
        polls that verify them come on top.
        """
        options = self.options
        devices = self.waves[-1]["devices"] if self.waves else 0
        soak = format_duration(options.soak)
        waves = f"{len(options.waves)} waves, each open at least --soak {soak}"
        bounds = [(options.soak * len(options.waves), waves)]
        if options.max_per_hour:
            hours = timedelta(hours=devices / options.max_per_hour)
            bounds.append((hours, f"{devices} devices at --max-per-hour {options.max_per_hour}"))
        earliest, why = max(bounds, key=lambda bound: bound[0])
        text = f"100 % at the earliest after {format_duration(earliest)} ({why})"
        if options.max_in_flight:
            text += f", fewer than {options.max_in_flight} installs at a time (--max-in-flight)"
        return text + ", plus the installs and the polls that verify them."


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
    version_to_use: str = row[1]  # not NULL: the query's condition
    policy = Policy(row[0], version_to_use, bool(row[2]))
    packages = list_packages(db, type_)
    if not policy.allow_newer:
        stable = next((p for p in packages if same_version(p.version, version_to_use)), None)
        return policy, stable
    floor = version_key(version_to_use)
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
    stamp = format_utc(now)
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
            options_json(options),
            stamp,
        ),
    )
    # Set by the INSERT just run; None only before any.
    rollout_id = cast(int, cursor.lastrowid)
    # Devices already offered V, or that reported about it, count as offered with
    # an attempt open: what they do next is evidence like any other.
    known = db.execute(
        "SELECT serial, parent_serial, version, offered_version, report_version, report_state"
        " FROM endpoints WHERE type_key = ?",
        (type_key(package.type),),
    ).fetchall()
    trial = trial_serials(db)
    for serial, parent, _version, offered, reported, state in known:
        if not (
            (offered is not None and same_version(offered, package.version))
            or (reported is not None and state and same_version(reported, package.version))
        ):
            continue
        open_attempt(db, rollout_id, serial, parent, trial, stamp, 0.0)
    rollout = load_rollout(db, rollout_id)
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


def plan_rollout(
    db: sqlite_utils.Database, type_: str, version: str, options: RolloutOptions | None = None
) -> Plan:
    """What :func:`start_rollout` would do, refusing as it would; changes nothing."""
    options = options or RolloutOptions()
    with reading(db):
        package, _policy, stable = _check_start(db, type_, version)
        lead = db.execute(
            f"SELECT e.bucket, {TRIAL_OF} FROM endpoints e WHERE e.type_key = ?",
            (type_key(package.type),),
        ).fetchall()
    waves = [
        {
            "wave": wave.label,
            "devices": sum(1 for b, trial in lead if covers(wave, bucket=b, trial=bool(trial))),
        }
        for wave in options.waves
    ]
    return Plan(package.type, package.version, stable.version if stable else None, waves,
                options.warning, options)  # fmt: skip


# Admin transitions ---------------------------------------------------------------------


@contextlib.contextmanager
def _transition(
    db: sqlite_utils.Database,
    type_: str,
    allowed: tuple[RolloutState, ...],
    command: str,
    now: datetime | None,
    *,
    evaluate: bool = True,
) -> Iterator[tuple[Rollout, datetime]]:
    """An admin command's transaction: the active rollout of ``type_``, if ``allowed``, and now.

    With ``evaluate``, the gates run first, so the command acts on the rollout
    as it stands (a wave due to open has opened, a failing one has halted).
    """
    now = now or utc_now()
    with write(db):
        if evaluate:
            _evaluate_all(db, now)
        rollout = require_active(db, type_)
        if rollout.state not in allowed:
            states = " or ".join(str(s) for s in allowed)
            raise Conflict(
                f"The rollout of {rollout.type} is {rollout.state}: rollout {command} works "
                f"only when it is {states}."
            )
        yield rollout, now


def pause_rollout(
    db: sqlite_utils.Database, type_: str, *, actor: str | None = None, now: datetime | None = None
) -> Rollout:
    """Stop offering V (a running rollout); attempts in flight go on."""
    with _transition(db, type_, (RolloutState.RUNNING,), "pause", now) as (rollout, now):
        db.execute(
            "UPDATE rollouts SET state = 'paused', stopped_at = ? WHERE id = ?",
            (format_utc(now), rollout.id),
        )
        audit.append(db, actor, Action.ROLLOUT_PAUSE, rollout.type, {"id": rollout.id})
        return load_rollout(db, rollout.id)


def resume_rollout(
    db: sqlite_utils.Database, type_: str, *, actor: str | None = None, now: datetime | None = None
) -> Rollout:
    """Run a paused or halted rollout again; after a halt, the halt rules count afresh."""
    stopped = (RolloutState.PAUSED, RolloutState.HALTED)
    with _transition(db, type_, stopped, "resume", now) as (rollout, now):
        db.execute(
            "UPDATE rollouts SET state = 'running', stopped_at = NULL, stopped_seconds = ?,"
            " halt_reason = NULL, resumed_at = ? WHERE id = ?",
            (rollout.stopped_total(now), format_utc(now), rollout.id),
        )
        detail = {"id": rollout.id, "from": str(rollout.state), "halt_reason": rollout.halt_reason}
        audit.append(db, actor, Action.ROLLOUT_RESUME, rollout.type, detail)
        return load_rollout(db, rollout.id)


def advance_rollout(
    db: sqlite_utils.Database, type_: str, *, actor: str | None = None, now: datetime | None = None
) -> Rollout:
    """Open the next wave now, gate skipped; on the last wave, complete the rollout."""
    with _transition(db, type_, (RolloutState.RUNNING,), "advance", now) as (rollout, now):
        detail = {"id": rollout.id, "wave": rollout.wave}
        audit.append(db, actor, Action.ROLLOUT_ADVANCE, rollout.type, detail)
        _pass_wave(db, rollout, now, actor=actor)
        return load_rollout(db, rollout.id)


def abort_rollout(
    db: sqlite_utils.Database, type_: str, *, actor: str | None = None, now: datetime | None = None
) -> Rollout:
    """End the rollout: V is blocked, the policy stays as it stood (its target the stable one)."""
    active = (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.HALTED)
    with _transition(db, type_, active, "abort", now, evaluate=False) as (rollout, now):
        db.execute(
            "UPDATE rollouts SET state = 'aborted', finished_at = ?, stopped_at = NULL"
            " WHERE id = ?",
            (format_utc(now), rollout.id),
        )
        _block(db, rollout.type, rollout.version)
        detail = {"id": rollout.id, "version": rollout.version, "from": str(rollout.state)}
        audit.append(db, actor, Action.ROLLOUT_ABORT, rollout.type, detail)
        return load_rollout(db, rollout.id)


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
            (format_utc(now), rollout.id),
        )
        allow = rollout.policy.allow_newer if rollout.policy else False
        db.execute(
            "INSERT INTO policies (type_key, type, version_to_use, allow_newer, updated)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (type_key) DO UPDATE SET"
            " version_to_use = excluded.version_to_use, updated = excluded.updated",
            (type_key(rollout.type), rollout.type, rollout.version, int(allow), format_utc(now)),
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
        (format_utc(now), rollout.id),
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
    rows = db.execute(f"SELECT {COLUMNS} FROM rollouts WHERE {ACTIVE_SQL}").fetchall()
    for row in rows:
        rollout = rollout_from_row(row)
        events.extend(time_out(db, rollout, now))
        reason = halt_if_failing(db, rollout, now)
        if reason is not None:
            events.append(f"{rollout.type} {rollout.version} halted: {reason}")
            continue
        if rollout.state != RolloutState.RUNNING or rollout.options.manual:
            continue
        gate = wave_gate(
            rollout.options,
            wave_evidence(db, rollout, now),
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


@dataclass
class StartOnImport:
    """``package add --rollout``: as :func:`add_package`'s ``then``, starts the rollout.

    It runs inside the import's transaction, so no device sees V before its
    rollout exists. Options not ``given`` come from the type's latest rollout.
    The identical file again starts a rollout only when none of its version is
    active or completed; otherwise it is the usual no-op (``started`` stays None).

        start = StartOnImport({"soak": "1h"})
        package, new = add_package(db, store, source, "Trio", "7.2", then=start)
        start.started  # the Rollout, or None
    """

    given: dict[str, Any] = field(default_factory=dict)
    actor: str | None = None
    started: Rollout | None = None

    def __call__(self, db: sqlite_utils.Database, package: Package, new: bool) -> None:
        if not new:
            earlier = db.execute(
                "SELECT 1 FROM rollouts WHERE type_key = ? AND version = ? AND state IN"
                " ('running', 'paused', 'halted', 'completed')",
                (type_key(package.type), package.version),
            ).fetchone()
            if earlier:
                return
        options = latest_options(db, package.type).given(**self.given)
        self.started = _start(
            db, package.type, package.version, options, actor=self.actor, now=utc_now()
        )
