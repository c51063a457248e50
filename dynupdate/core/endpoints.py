"""The fleet views: endpoints with their statuses (list, show).

What devices say is recorded by :mod:`dynupdate.core.registry`; the per-type
counts are :func:`dynupdate.core.overview.overview` (importable from here too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlite_utils

from dynupdate.core.db import reading
from dynupdate.core.decision import Standing
from dynupdate.core.devices import type_key
from dynupdate.core.errors import InvalidInput, NotFound
from dynupdate.core.fleet import STATUSES, FleetState
from dynupdate.core.overview import GROUP_TERM, SILENT, overview
from dynupdate.core.registry import HISTORY_LIMIT
from dynupdate.core.rollout_records import COLUMNS, Rollout, rollout_from_row
from dynupdate.core.times import format_utc, utc_now
from dynupdate.core.versions import same_version
from dynupdate.core.vocabulary import Status
from dynupdate.core.waves import covers

__all__ = ["get_endpoint", "list_endpoints", "overview"]

_ENDPOINT_COLUMNS = (
    "e.serial, e.type, e.version, e.model, e.mac, e.tz, e.in_call, e.address, e.parent_serial,"
    " e.first_seen, e.last_poll, e.last_report, e.report_state, e.report_version,"
    " e.report_detail, e.offered_version, e.offered_at, e.last_reason, e.retry_at, e.bucket"
)
# Per device, its row in the active rollout of a type (NULLs without one); the
# leading underscore marks what _endpoint_dict reads and drops.
_ATTEMPT_COLUMNS = (
    "d.rollout_id AS _rollout, d.attempts AS _attempts, d.failures AS _failures,"
    " d.open_at IS NOT NULL AS _open, d.succeeded_at IS NOT NULL AS _succeeded"
)


def _select(fleet: FleetState) -> str:
    """SELECT … FROM endpoints e, with each device's row in its type's active rollout."""
    ids = sorted(kind.rollout.id for kind in fleet.types.values() if kind.rollout is not None)
    if not ids:
        return (
            f"SELECT {_ENDPOINT_COLUMNS}, NULL AS _rollout, NULL AS _attempts,"
            " NULL AS _failures, 0 AS _open, 0 AS _succeeded FROM endpoints e"
        )
    return (
        f"SELECT {_ENDPOINT_COLUMNS}, {_ATTEMPT_COLUMNS} FROM endpoints e"
        " LEFT JOIN rollout_devices d ON d.serial = e.serial"
        f" AND d.rollout_id IN ({', '.join(map(str, ids))})"  # integers from the database
    )


@dataclass(frozen=True, slots=True)
class _Standing:
    """A device's place in its type's active rollout, as the views need it."""

    standing: Standing
    attempted: bool
    attempts: int
    admitted: bool


def _endpoint_dict(fleet: FleetState, names: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
    data = dict(zip(names, row, strict=True))
    rollout_id, attempts, failures, open_, succeeded = (
        data.pop(name) for name in ("_rollout", "_attempts", "_failures", "_open", "_succeeded")
    )
    data["in_call"] = bool(data["in_call"])
    type_ = data["type"]
    active = fleet.of(type_).rollout
    place = None
    if active is not None:
        if rollout_id != active.id:  # none, or a row from when the device had another type
            attempts = failures = 0
            open_ = succeeded = False
        serial, parent = data["serial"], data["parent_serial"]
        standing = Standing(
            bucket=data["bucket"],
            trial=serial in fleet.trial or (parent is not None and parent in fleet.trial),
            held=failures >= active.max_attempts and not open_ and not succeeded,
        )
        attempted = bool(attempts or failures)
        place = _Standing(standing, attempted, attempts, bool(fleet.admits(type_, standing)))
        status = fleet.status(
            type_,
            data["version"],
            data["report_state"],
            data["report_version"],
            standing=standing,
            attempted=attempted,
        )
        towards = attempted or place.admitted or standing.held or status == Status.UP_TO_DATE
        data["target_version"] = fleet.target_version(type_, towards_rollout=towards)
    else:
        data["target_version"] = fleet.target_version(type_)
        status = fleet.status(type_, data["version"], data["report_state"], data["report_version"])
    data["status"] = str(status)
    data["_place"] = place
    return data


def _check_status(status: str | None) -> None:
    if status is not None and status not in STATUSES:
        raise InvalidInput(f"Unknown status '{status}': use one of {', '.join(STATUSES)}.")


def list_endpoints(
    db: sqlite_utils.Database,
    fleet: FleetState,
    *,
    type_: str | None = None,
    status: str | None = None,
    version: str | None = None,
    stale: timedelta | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Endpoints (and peripherals), filtered; ``stale`` keeps those silent that long."""
    _check_status(status)
    where: list[str]
    params: list[str | None]  # a group's report state and version may be NULL
    where, params = [], []
    if type_ is not None:
        where.append("e.type_key = ?")
        params.append(type_key(type_))
    if stale is not None:
        cutoff = format_utc((now or utc_now()) - stale)
        where.append(SILENT)
        params.extend((cutoff, cutoff))
    with reading(db):
        if status is not None or version is not None:
            # Status and version depend mostly on the (type, version, last report)
            # group of a row: pick the groups that can match from the covering
            # index, so that only their rows are read and turned into dicts, not
            # the whole fleet (during a rollout a group's rows may still differ).
            groups = _groups_matching(db, fleet, where, params, status, version)
            if not groups:
                return []
            if len(groups) <= _MAXGROUP_TERMS:
                where.append("(" + " OR ".join([GROUP_TERM] * len(groups)) + ")")
                params.extend(value for group in groups for value in group)
        sql = _select(fleet)
        if status == Status.HELD:
            # Only a device with a failed attempt in an active rollout can be held:
            # start from those rows, not from every device of the rollout's type.
            where.append("d.failures > 0")
        if where:
            sql += " WHERE " + " AND ".join(where)
        cursor = db.execute(sql + " ORDER BY e.serial", params)
        names = [d[0] for d in cursor.description]
        rows = []
        for row in cursor:
            data = _endpoint_dict(fleet, names, row)
            if status is not None and data["status"] != status:
                continue
            if version is not None and not same_version(data["version"], version):
                continue
            del data["_place"], data["bucket"]
            rows.append(data)
    return rows


# SQLite nests an OR chain one level per term (at most 1000 levels): past this
# many groups, the rows are filtered in Python only.
_MAXGROUP_TERMS = 200


def _groups_matching(
    db: sqlite_utils.Database,
    fleet: FleetState,
    where: list[str],
    params: list[Any],
    status: str | None,
    version: str | None,
) -> list[tuple[str, str, str | None, str | None]]:
    sql = "SELECT DISTINCT type_key, version, report_state, report_version FROM endpoints e"
    if where:
        sql += " WHERE " + " AND ".join(where)
    matching = []
    for key, group_version, state, report_version in db.execute(sql, params):
        if status is not None and status not in fleet.possible_statuses(
            key, group_version, state, report_version
        ):
            continue
        if version is not None and not same_version(group_version, version):
            continue
        matching.append((key, group_version, state, report_version))
    return matching


def get_endpoint(db: sqlite_utils.Database, fleet: FleetState, serial: str) -> dict[str, Any]:
    """One device's software update details, its peripherals and recent history.

    Besides the list's keys: ``bucket``; ``attempts`` at the version of its
    type's active rollout, else of the type's latest rollout (0 when it had
    none there); ``admitted`` (during a rollout, else None) and ``rollout``,
    the rollout those count in (None when its type never had one).
    """
    with reading(db):
        cursor = db.execute(_select(fleet) + " WHERE e.serial = ?", (serial,))
        names = [d[0] for d in cursor.description]
        row = cursor.fetchone()
        if row is None:
            raise NotFound(f"No endpoint with serial '{serial[:64]}'. See: dynupdate endpoint list")
        data = _shown(db, fleet, _endpoint_dict(fleet, names, row))
        cursor = db.execute(
            _select(fleet) + " WHERE e.parent_serial = ? ORDER BY e.serial", (serial,)
        )
        data["peripherals"] = [_shown(db, fleet, _endpoint_dict(fleet, names, r)) for r in cursor]
        data["history"] = [
            {"at": at, "event": event, "version": version, "detail": detail}
            for at, event, version, detail in db.execute(
                "SELECT at, event, version, detail FROM endpoint_history WHERE serial = ?"
                " ORDER BY id DESC LIMIT ?",
                (serial, HISTORY_LIMIT),
            )
        ]
    return data


def _shown(db: sqlite_utils.Database, fleet: FleetState, data: dict[str, Any]) -> dict[str, Any]:
    """``endpoint show``'s rollout keys for one device (see :func:`get_endpoint`)."""
    place: _Standing | None = data.pop("_place")
    active = fleet.of(data["type"]).rollout
    record: Rollout | None
    if active is not None and active.record is not None:
        record = active.record
    else:
        found = db.execute(
            f"SELECT {COLUMNS} FROM rollouts WHERE type_key = ? ORDER BY id DESC LIMIT 1",
            (type_key(data["type"]),),
        ).fetchone()
        record = rollout_from_row(found) if found else None
    failures, detail = 0, None
    attempts = place.attempts if place is not None else 0
    if record is not None:
        found = db.execute(
            "SELECT attempts, failures, detail FROM rollout_devices"
            " WHERE rollout_id = ? AND serial = ?",
            (record.id, data["serial"]),
        ).fetchone()
        if found is not None:
            attempts, failures, detail = found
    data["attempts"] = attempts
    data["admitted"] = place.admitted if place is not None else None
    data["rollout"] = None
    if record is not None:
        trial = place is not None and place.standing.trial
        data["rollout"] = {
            "id": record.id,
            "version": record.version,
            "state": str(record.state),
            "wave": record.wave,
            "waves": [wave.label for wave in record.waves],
            # The first wave that covers the device: trial devices are in all of them.
            "device_wave": next(
                (
                    index
                    for index, wave in enumerate(record.waves, 1)
                    if covers(wave, bucket=data["bucket"], trial=trial)
                ),
                None,
            ),
            "trial": trial,
            "held": place is not None and place.standing.held,
            "failures": failures,
            "detail": detail,
            "max_attempts": record.options.max_attempts,
        }
    return data
