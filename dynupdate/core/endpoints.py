"""The fleet views: endpoints with their statuses (list, show) and per-type counts (overview).

What devices say is recorded by :mod:`dynupdate.core.registry`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlite_utils

from dynupdate.core.decision import Standing
from dynupdate.core.devices import type_key
from dynupdate.core.errors import InvalidInput, NotFound
from dynupdate.core.fleet import STATUSES, ActiveRollout, FleetState, PolicyView, TypeState
from dynupdate.core.registry import HISTORY_LIMIT
from dynupdate.core.rollout_records import COLUMNS, TRIAL_OF, Rollout, rollout_from_row
from dynupdate.core.times import format_utc, utc_now
from dynupdate.core.versions import same_version, version_key
from dynupdate.core.vocabulary import RolloutState, Status
from dynupdate.core.waves import ALL, BUCKETS, covers

__all__ = ["get_endpoint", "list_endpoints", "overview"]

_ENDPOINT_COLUMNS = (
    "e.serial, e.type, e.version, e.model, e.mac, e.tz, e.in_call, e.address, e.parent_serial,"
    " e.first_seen, e.last_poll, e.last_report, e.report_state, e.report_version,"
    " e.report_detail, e.offered_version, e.offered_at, e.bucket"
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
        where.append("(e.last_poll IS NULL OR e.last_poll < ?)")
        params.append(format_utc((now or utc_now()) - stale))
    with _reading(db):
        if status is not None or version is not None:
            # Status and version depend mostly on the (type, version, last report)
            # group of a row: pick the groups that can match from the covering
            # index, so that only their rows are read and turned into dicts, not
            # the whole fleet (during a rollout a group's rows may still differ).
            groups = _groups_matching(db, fleet, where, params, status, version)
            if not groups:
                return []
            if len(groups) <= _MAX_GROUP_TERMS:
                where.append("(" + " OR ".join([_GROUP_TERM] * len(groups)) + ")")
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


# One (type, version, last report) group; IS, because report_* are NULL until a report.
_GROUP_TERM = "(e.type_key = ? AND e.version = ? AND e.report_state IS ? AND e.report_version IS ?)"
# SQLite nests an OR chain one level per term (at most 1000 levels): past this
# many groups, the rows are filtered in Python only.
_MAX_GROUP_TERMS = 200


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


@contextlib.contextmanager
def _reading(db: sqlite_utils.Database) -> Iterator[None]:
    """One read transaction around several queries, so they see one state of the fleet."""
    if db.conn.in_transaction:
        yield
        return
    db.conn.execute("BEGIN")
    try:
        yield
    finally:
        db.conn.execute("COMMIT")


def get_endpoint(db: sqlite_utils.Database, fleet: FleetState, serial: str) -> dict[str, Any]:
    """One device's software update details, its peripherals and recent history.

    Besides the list's keys: ``bucket``; ``attempts`` at the version of its
    type's active rollout, else of the type's latest rollout (0 when it had
    none there); ``admitted`` (during a rollout, else None) and ``rollout``,
    the rollout those count in (None when its type never had one).
    """
    with _reading(db):
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


def overview(db: sqlite_utils.Database, fleet: FleetState) -> list[dict[str, Any]]:
    """Per device type: the policy, its active rollout, counts by status and the version spread.

    One pass over a covering index grouped by (type, version, last report),
    so it stays fast with a million endpoints. A type with an active rollout
    then gets corrections: its devices' statuses also depend on their bucket,
    trial membership and attempts (see :func:`_rollout_corrections`).
    """
    result: dict[str, dict[str, Any]] = {}
    for key, kind in fleet.types.items():
        name = kind.policy.type if kind.policy else kind.packages[0].type
        result[key] = _overview_row(name, fleet, kind)
    with _reading(db):
        # type is not in the index: reading it for every row would cost a table
        # lookup per endpoint, so it is read only for types the fleet state lacks.
        groups = db.execute(
            "SELECT type_key, version, report_state, report_version, count(*)"
            " FROM endpoints GROUP BY type_key, version, report_state, report_version"
        ).fetchall()
        for key, version, state, report_version, count in groups:
            row = result.get(key)
            if row is None:
                name = _type_name(db, key, version, state, report_version)
                row = result[key] = _overview_row(name, fleet, fleet.of(name))
            active = fleet.of(key).rollout
            standing = _base_standing(active) if active is not None else None
            status = fleet.status(key, version, state, report_version, standing=standing)
            row["counts"][status] += count
            row["endpoints"] += count
            row["_versions"][version] += count
        for key, kind in fleet.types.items():
            if kind.rollout is not None:
                counts = result[key]["counts"]
                for status, change in _rollout_corrections(db, fleet, key, kind.rollout).items():
                    counts[status] += change
    rows = []
    for key in sorted(result):
        row = result[key]
        spread = row.pop("_versions")
        row["versions"] = [
            {"version": v, "count": n}
            for v, n in sorted(spread.items(), key=lambda item: version_key(item[0]), reverse=True)
        ]
        total = row["endpoints"]
        # No target (no active policy): "0 % on target" would read as a stalled rollout.
        row["on_target_percent"] = (
            round(100 * row["counts"][Status.UP_TO_DATE] / total, 1)
            if total and row["target_version"] is not None
            else None
        )
        rows.append(row)
    return rows


def _share(active: ActiveRollout) -> int:
    """The buckets the rollout admits now (below this), trial devices aside."""
    view = active.view
    if view.state != RolloutState.RUNNING:
        return 0
    return view.wave.share or 0


def _base_standing(active: ActiveRollout) -> Standing:
    """The standing the grouped pass assumes for every device of a rollout type: on the
    side of the current wave's border that holds more of the buckets."""
    return Standing(bucket=0 if _share(active) > ALL // 2 else BUCKETS - 1)


def _rollout_corrections(
    db: sqlite_utils.Database, fleet: FleetState, key: str, active: ActiveRollout
) -> Counter[Status]:
    """What the grouped pass got wrong for a type with an active rollout, by status.

    The pass gave every device the :func:`_base_standing`. Three smaller
    reads correct it: the devices on the other side of the wave's border
    (a range of the ``endpoints_bucket`` index, at most half the buckets),
    then the devices with a row in the rollout and the trial devices (few
    next to a fleet), whose status also depends on their attempts.
    """
    share = _share(active)
    base = _base_standing(active)
    change: Counter[Status] = Counter()

    def move(
        version: str,
        state: str | None,
        report_version: str | None,
        count: int,
        standing: Standing,
        attempted: bool = False,
        assumed: Standing = base,
    ) -> None:
        before = fleet.status(key, version, state, report_version, standing=assumed)
        after = fleet.status(
            key, version, state, report_version, standing=standing, attempted=attempted
        )
        if before != after:
            change[before] -= count
            change[after] += count

    if 0 < share < ALL:
        other = "e.bucket < ?" if base.bucket else "e.bucket >= ?"
        for version, state, report_version, count in db.execute(
            "SELECT e.version, e.report_state, e.report_version, count(*) FROM endpoints e"
            f" WHERE e.type_key = ? AND {other} GROUP BY 1, 2, 3",
            (key, share),
        ):
            move(version, state, report_version, count, Standing(bucket=BUCKETS - 1 - base.bucket))

    def side(column: str) -> str:
        """The bucket a device is counted with now: its side of the border, as corrected."""
        return f"CASE WHEN {column} < {share} THEN 0 ELSE {BUCKETS - 1} END"

    held = "(d.failures >= ? AND d.open_at IS NULL AND d.succeeded_at IS NULL)"
    attempted = "(d.attempts > 0 OR d.failures > 0)"
    # CROSS JOIN: from the rollout's rows to their endpoints, never the other way.
    in_rollout = db.execute(
        f"SELECT e.version, e.report_state, e.report_version, {side('e.bucket')}, {TRIAL_OF},"
        f" {held}, {attempted}, count(*) FROM rollout_devices d CROSS JOIN endpoints e"
        " ON e.serial = d.serial WHERE d.rollout_id = ? AND e.type_key = ?"
        " GROUP BY 1, 2, 3, 4, 5, 6, 7",
        (active.max_attempts, active.id, key),
    )
    # From the trial list to its devices (the serial's, then its peripherals),
    # by index: an OR in one join would read the whole type instead, and so would
    # the endpoints_bucket index on type_key (the unary + keeps the planner off it).
    trial_only = db.execute(
        "WITH trial_rows AS (SELECT e.serial, e.version, e.report_state, e.report_version,"
        " e.bucket FROM trial_devices t CROSS JOIN endpoints e ON e.serial = t.serial"
        " WHERE +e.type_key = ? UNION SELECT e.serial, e.version, e.report_state,"
        " e.report_version, e.bucket FROM trial_devices t CROSS JOIN endpoints e"
        " ON e.parent_serial = t.serial WHERE +e.type_key = ?)"
        f" SELECT version, report_state, report_version, {side('bucket')}, 1, 0, 0,"
        " count(*) FROM trial_rows r WHERE NOT EXISTS (SELECT 1 FROM rollout_devices d"
        " WHERE d.rollout_id = ? AND d.serial = r.serial) GROUP BY 1, 2, 3, 4",
        (key, key, active.id),
    )
    for rows in (in_rollout, trial_only):
        for version, state, report_version, lead, trial, is_held, tried, count in rows:
            move(
                version,
                state,
                report_version,
                count,
                Standing(bucket=lead, trial=bool(trial), held=bool(is_held)),
                bool(tried),
                assumed=Standing(bucket=lead),
            )
    return change


def _type_name(
    db: sqlite_utils.Database, key: str, version: str, state: str | None, report_version: str | None
) -> str:
    """The name of a type with no policy or package: the least spelling in its first group."""
    row = db.execute(
        "SELECT min(e.type) FROM endpoints e WHERE " + _GROUP_TERM,
        (key, version, state, report_version),
    ).fetchone()
    return row[0] if row and row[0] is not None else key


def _overview_row(name: str, fleet: FleetState, kind: TypeState) -> dict[str, Any]:
    return {
        **PolicyView.of(kind, name).to_dict(),
        "type": name,
        "rollout": _rollout_brief(kind.rollout),
        "endpoints": 0,
        "counts": dict.fromkeys(STATUSES, 0),
        "_versions": Counter(),
    }


def _rollout_brief(active: ActiveRollout | None) -> dict[str, Any] | None:
    """The type's active rollout as ``overview`` shows it, or None."""
    if active is None or active.record is None:
        return None
    record = active.record
    return {
        "id": record.id,
        "version": record.version,
        "state": str(record.state),
        "wave": record.wave,
        "waves": [wave.label for wave in record.waves],
    }

