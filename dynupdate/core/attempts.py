"""Each device's attempts at a rollout's version: opened, verified, failed, held.

The server opens an attempt with :func:`reserve_attempt` (within
``--max-in-flight`` and ``--max-per-hour``), and records what polls and reports
say of it with :func:`note_devices`, in the transaction that records them, so a
failure that meets a halt rule halts there. :func:`time_out` fails attempts
that ran past ``--install-timeout``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import NamedTuple

import sqlite_utils

from dynupdate.core import audit
from dynupdate.core.audit import Action
from dynupdate.core.db import write
from dynupdate.core.errors import Conflict, NotFound
from dynupdate.core.gates import (
    halt_reason,
)
from dynupdate.core.rollout_records import (
    ACTIVE_SQL,
    Rollout,
    in_flight_sql,
    load_rollout,
    options_from_json,
)
from dynupdate.core.times import format_utc, parse_utc, utc_now
from dynupdate.core.trial import trial_serials
from dynupdate.core.versions import at_least, same_version
from dynupdate.core.vocabulary import ReportState, RolloutState
from dynupdate.core.waves import bucket, parse_waves

__all__ = [
    "Seen",
    "device_standing",
    "fail_attempt",
    "halt_if_failing",
    "note_devices",
    "open_attempt",
    "reserve_attempt",
    "retry_device",
    "time_out",
    "tracked_serials",
]


def open_attempt(
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


def time_out(db: sqlite_utils.Database, rollout: Rollout, now: datetime) -> list[str]:
    """Attempts open longer than --install-timeout (pauses not counted) have failed."""
    if rollout.state != RolloutState.RUNNING:
        return []  # the clock stands while paused or halted
    deadline = in_flight_sql(rollout, now)
    serials = [
        row[0]
        for row in db.execute(
            f"SELECT serial FROM rollout_devices WHERE rollout_id = ? AND open_at IS NOT NULL"
            f" AND NOT {deadline}",
            (rollout.id,),
        )
    ]
    for serial in serials:
        fail_attempt(db, rollout, serial, "timed out", now)
    return [f"{rollout.type} {rollout.version}: {serial} timed out" for serial in serials]


def fail_attempt(
    db: sqlite_utils.Database, rollout: Rollout, serial: str, detail: str, now: datetime
) -> None:
    stamp = format_utc(now)
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


def halt_if_failing(db: sqlite_utils.Database, rollout: Rollout, now: datetime) -> str | None:
    """Halt a running or paused rollout whose failures meet a halt rule; the reason, or None."""
    if rollout.state not in (RolloutState.RUNNING, RolloutState.PAUSED):
        return None
    since = format_utc(rollout.resumed_at) if rollout.resumed_at else ""
    # Times are kept to the second: an outcome in the second of the resume counts
    # (a failure right after a resume must be able to halt again).
    failed, succeeded = db.execute(
        "SELECT sum(failures > 0 AND succeeded_at IS NULL AND failed_at >= ?),"
        " sum(succeeded_at >= ?) FROM rollout_devices WHERE rollout_id = ?",
        (since, since, rollout.id),
    ).fetchone()
    failed, succeeded = failed or 0, succeeded or 0
    reason = halt_reason(rollout.options, failed=failed, outcomes=failed + succeeded)
    if reason is None:
        return None
    stopped = rollout.stopped_at or now
    db.execute(
        "UPDATE rollouts SET state = 'halted', halt_reason = ?, stopped_at = ? WHERE id = ?",
        (reason, format_utc(stopped), rollout.id),
    )
    audit.append(
        db,
        audit.SERVER,
        Action.ROLLOUT_HALTED,
        rollout.type,
        {"id": rollout.id, "version": rollout.version, "reason": reason, "wave": rollout.wave},
    )
    return reason


# What the server does with attempts ------------------------------------------------------


def reserve_attempt(
    db: sqlite_utils.Database,
    rollout_id: int,
    serial: str,
    parent: str | None,
    *,
    now: datetime | None = None,
    version: str | None = None,
) -> datetime | None:
    """Open an attempt for an offer of V, within the limits; or the ``retryAt`` when full.

    Runs in its own write transaction: the limits are read and the slot taken
    under one lock, so no number of workers can exceed ``--max-in-flight`` or
    ``--max-per-hour``. An attempt already open is kept (None: offer V again).
    ``version``: what the poll asking for it says the device runs, noted first
    (a revert it shows ends the previous attempt before this one opens).

    Raises :class:`Conflict` when, since the poll was decided, the rollout
    stopped running or the device became held: V must not be offered then.
    """
    now = now or utc_now()
    with write(db):
        if version is not None:
            note_devices(db, rollout_id, [Seen(serial, version, at=now)], now)
        rollout = load_rollout(db, rollout_id)
        if rollout.state != RolloutState.RUNNING:
            raise Conflict(f"The rollout of {rollout.type} is {rollout.state}.")
        row = db.execute(
            "SELECT open_at, failures FROM rollout_devices WHERE rollout_id = ? AND serial = ?",
            (rollout_id, serial),
        ).fetchone()
        if row is not None and row[0] is not None:
            return None
        if row is not None and row[1] >= rollout.options.max_attempts:
            raise Conflict(f"{serial} is held in the rollout of {rollout.type}.")
        retry = _limited_until(db, rollout, now)
        if retry is not None:
            return retry
        open_attempt(db, rollout_id, serial, parent, trial_serials(db), format_utc(now),
              rollout.stopped_total(now))  # fmt: skip
        return None


def _limited_until(db: sqlite_utils.Database, rollout: Rollout, now: datetime) -> datetime | None:
    """When a slot is expected to free if a new attempt would exceed a limit; else None."""
    options = rollout.options
    waits: list[datetime] = []
    if options.max_in_flight is not None:
        deadline = in_flight_sql(rollout, now)
        opened = [
            parse_utc(row[0])
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
            parse_utc(row[0])
            for row in db.execute(
                "SELECT opened_at FROM rollout_attempts WHERE rollout_id = ? AND opened_at > ?"
                " ORDER BY opened_at",
                (rollout.id, format_utc(hour_ago)),
            )
        ]
        if len(recent) >= options.max_per_hour:
            waits.append(recent[len(recent) - options.max_per_hour] + timedelta(hours=1))
    return max(waits) if waits else None


class Seen(NamedTuple):
    """What a poll or a report says of a device in a rollout (see :func:`note_devices`).

    A tuple: the server makes one per poll of a rollout's type.
    """

    serial: str
    version: str
    state: str | None = None  # a report's state; None for a poll
    detail: str | None = None
    at: datetime | None = None  # when the server received it


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
    # Most polls are of devices never offered V: one lookup for all of them, then
    # a row read only for those the rollout tracks, and the whole rollout (its
    # options, for the halt rules) only once an attempt fails.
    tracked = tracked_serials(db, rollout_id, [item.serial for item in seen])
    if not tracked:
        return None
    (version,) = db.execute("SELECT version FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
    rollout: Rollout | None = None
    stamp = format_utc(now)
    for item in seen:
        if item.serial not in tracked:
            continue
        row = db.execute(
            "SELECT attempts, open_at, installed_at, succeeded_at, said_at FROM rollout_devices"
            " WHERE rollout_id = ? AND serial = ?",
            (rollout_id, item.serial),
        ).fetchone()
        if row is None or not row[0]:
            continue  # never offered V in this rollout: nothing to verify
        _attempts, open_at, installed_at, succeeded_at, said_at = row
        at = (item.at or now).timestamp()
        newer = at_least(item.version, version)
        if item.state is None:  # a poll: the device says what it runs
            if newer and succeeded_at is None:
                _succeed(db, rollout_id, item.serial, stamp, at)
            elif (
                not newer
                and (succeeded_at is not None or installed_at is not None)
                # A poll received before the installed report or the success (written
                # late by another worker's writer) says nothing of what came after.
                and (said_at is None or at > said_at)
            ):
                rollout = rollout or load_rollout(db, rollout_id)
                fail_attempt(db, rollout, item.serial, f"reverted to {item.version}", now)
        elif open_at is not None and same_version(item.version, version):
            if item.state == ReportState.FAILED:
                rollout = rollout or load_rollout(db, rollout_id)
                fail_attempt(db, rollout, item.serial, item.detail or "failed", now)
            elif item.state == ReportState.INSTALLED:
                db.execute(
                    "UPDATE rollout_devices SET installed_at = ?, said_at = max(?, coalesce("
                    "said_at, 0)) WHERE rollout_id = ? AND serial = ?",
                    (stamp, at, rollout_id, item.serial),
                )
    return None if rollout is None else halt_if_failing(db, rollout, now)


def tracked_serials(db: sqlite_utils.Database, rollout_id: int, serials: Sequence[str]) -> set[str]:
    """Those of ``serials`` the rollout tracks (offered V at least once), in one lookup."""
    return {
        row[0]
        for row in db.execute(
            "SELECT serial FROM rollout_devices WHERE rollout_id = ?"
            " AND serial IN (SELECT value FROM json_each(?))",
            (rollout_id, json.dumps(serials)),
        )
    }


def _succeed(
    db: sqlite_utils.Database, rollout_id: int, serial: str, stamp: str, at: float
) -> None:
    db.execute(
        "UPDATE rollout_devices SET succeeded_at = ?, open_at = NULL, open_stopped = NULL,"
        " said_at = max(?, coalesce(said_at, 0)) WHERE rollout_id = ? AND serial = ?",
        (stamp, at, rollout_id, serial),
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
            f" JOIN rollouts r ON r.id = d.rollout_id WHERE d.serial = ? AND r.{ACTIVE_SQL}"
            " AND d.open_at IS NULL AND d.succeeded_at IS NULL",
            (serial,),
        ).fetchone()
        held = (
            row is not None
            and row[2] >= options_from_json(row[3], parse_waves(json.loads(row[4]))).max_attempts
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
    db: sqlite_utils.Database, rollout_id: int, serial: str, max_attempts: int | None = None
) -> tuple[bool, bool, bool]:
    """(attempted, held, attempt_open) of a device in a rollout, read in one indexed lookup.

    ``max_attempts``: the rollout's, when the caller knows it (the poll server
    does), which spares reading and parsing the rollout's options.
    """
    # The connection itself, not sqlite-utils' wrapper: this is on the poll path.
    row = db.conn.execute(
        "SELECT attempts, failures, open_at, succeeded_at FROM rollout_devices"
        " WHERE rollout_id = ? AND serial = ?",
        (rollout_id, serial),
    ).fetchone()
    if row is None:
        return False, False, False
    attempts, failures, open_at, succeeded_at = row
    if max_attempts is None:
        max_attempts = load_rollout(db, rollout_id).options.max_attempts
    held = failures >= max_attempts and open_at is None and succeeded_at is None
    return attempts > 0 or failures > 0, held, open_at is not None
