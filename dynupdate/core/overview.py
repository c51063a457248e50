"""The overview: per device type, counts by status, the on-target share and what waits.

The list and the details of single devices are :mod:`dynupdate.core.endpoints`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlite_utils

from dynupdate.core.db import reading
from dynupdate.core.decision import Standing
from dynupdate.core.devices import type_key
from dynupdate.core.durations import format_duration
from dynupdate.core.fleet import STATUSES, ActiveRollout, FleetState, PolicyView, TypeState
from dynupdate.core.maintenance import window_view
from dynupdate.core.rollout_records import TRIAL_OF
from dynupdate.core.times import format_utc, utc_now
from dynupdate.core.versions import version_key
from dynupdate.core.vocabulary import Reason, RolloutState, Status
from dynupdate.core.waves import ALL, BUCKETS

__all__ = ["GROUP_TERM", "SILENT", "overview"]

# Not heard from since a time: neither a poll nor a report (SPEC section 8).
SILENT = "coalesce(e.last_poll, '') < ? AND coalesce(e.last_report, '') < ?"
# Spelled as the endpoints_window index's condition, so that SQLite reads that index.
_TOLD_OUTSIDE_WINDOW = f"e.last_reason = '{Reason.OUTSIDE_WINDOW}'"
# One (type, version, last report) group; IS, because report_* are NULL until a report.
GROUP_TERM = "(e.type_key = ? AND e.version = ? AND e.report_state IS ? AND e.report_version IS ?)"


def overview(
    db: sqlite_utils.Database,
    fleet: FleetState,
    *,
    type_: str | None = None,
    stale: timedelta | None = None,
    silent_after: timedelta | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Per device type: the policy, its active rollout, counts by status and the version spread.

    ``type_``: that type only. ``stale``: only the devices not heard from (no
    poll, no report) for that long. ``silent_after``: devices not heard from
    for that long are left out of ``on_target_percent`` (``left_out`` says how
    many); None counts every device, as does ``stale``.

    One pass over a covering index grouped by (type, version, last report),
    so it stays fast with a million endpoints. A type with an active rollout
    then gets corrections: its devices' statuses also depend on their bucket,
    trial membership and attempts (see :func:`_rollout_corrections`). The
    pending devices told ``outside-window`` come from the partial index
    endpoints_window; ``stale`` and ``silent_after`` read the whole table.
    """
    now = now or utc_now()
    wanted = type_key(type_) if type_ is not None else None
    where: list[str] = []
    params: list[Any] = []
    if stale is not None:
        cutoff = format_utc(now - stale)
        where.append(SILENT)
        params.extend((cutoff, cutoff))
    result: dict[str, dict[str, Any]] = {}
    for key, kind in fleet.types.items():
        if wanted is None or key == wanted:
            name = kind.policy.type if kind.policy else kind.packages[0].type
            result[key] = _overview_row(name, fleet, kind)
    silent: dict[str, Counter[Status]] = {}
    silent_since = None
    with reading(db):
        groups: list[tuple[str, str, str | None, str | None, int]] = []
        # The whole fleet's silent devices: a scan of the table beats the index and a
        # table lookup for every row; one type's: its range of the index, then lookups.
        scan = stale is not None and wanted is None
        counts = _status_counts(db, fleet, where, params, wanted, scan=scan, groups=groups)
        for key, version, state, report_version, count in groups:
            row = result.get(key)
            if row is None:
                # type is not in the index: reading it for every row would cost a table
                # lookup per endpoint, so it is read only for types the fleet state lacks.
                name = _type_name(db, key, version, state, report_version)
                row = result[key] = _overview_row(name, fleet, fleet.of(name))
            row["endpoints"] += count
            row["_versions"][version] += count
        waiting = _status_counts(db, fleet, [*where, _TOLD_OUTSIDE_WINDOW], params, wanted)
        if stale is None and silent_after is not None:
            silent_since = format_utc(now - silent_after)
            silent = _status_counts(
                db, fleet, [SILENT], [silent_since, silent_since], wanted, scan=wanted is None
            )
    window = window_view(fleet.window, now)
    rows = []
    for key in sorted(result):
        row = result[key]
        for status, count in counts.get(key, {}).items():
            row["counts"][status] += count
        spread = row.pop("_versions")
        row["versions"] = [
            {"version": v, "count": n}
            for v, n in sorted(spread.items(), key=lambda item: version_key(item[0]), reverse=True)
        ]
        gone = silent.get(key, Counter())
        left = sum(gone.values())
        total = row["endpoints"] - left
        # No target (no active policy): "0 % on target" would read as a stalled rollout.
        row["on_target_percent"] = (
            round(100 * (row["counts"][Status.UP_TO_DATE] - gone[Status.UP_TO_DATE]) / total, 1)
            if total and row["target_version"] is not None
            else None
        )
        row["left_out"] = (
            {
                "devices": left,
                "silent_after": format_duration(silent_after),
                "not_heard_from_since": silent_since,
            }
            if silent_after is not None and silent_since is not None
            else None
        )
        row["pending_for_window"] = waiting.get(key, Counter())[Status.PENDING]
        row["window_open"] = window["open_now"]
        row["window_next_opening"] = window["next_opening"] and window["next_opening"]["start"]
        rows.append(row)
    return rows


def _status_counts(
    db: sqlite_utils.Database,
    fleet: FleetState,
    where: Sequence[str],
    params: Sequence[Any],
    wanted: str | None = None,
    *,
    scan: bool = False,
    groups: list[tuple[str, str, str | None, str | None, int]] | None = None,
) -> dict[str, Counter[Status]]:
    """Per type key, the devices matching ``where`` (on ``endpoints e``) by status.

    ``wanted``: that type key only. ``scan``: read the table itself, not an
    index and then the table (for conditions on columns no index has).
    ``groups`` gets each (type key, version, report state, report version, count).
    """
    conditions = [*where, *(["e.type_key = ?"] if wanted is not None else [])]
    sql = "SELECT type_key, version, report_state, report_version, count(*) FROM endpoints e"
    if scan:
        sql += " NOT INDEXED"
    if conditions:
        sql += " WHERE " + " AND ".join(conditions)
    sql += " GROUP BY type_key, version, report_state, report_version"
    counts: dict[str, Counter[Status]] = {}
    for key, version, state, report_version, count in db.execute(
        sql, [*params, *([wanted] if wanted is not None else [])]
    ):
        active = fleet.of(key).rollout
        standing = _base_standing(active) if active is not None else None
        status = fleet.status(key, version, state, report_version, standing=standing)
        counts.setdefault(key, Counter())[status] += count
        if groups is not None:
            groups.append((key, version, state, report_version, count))
    for key, kind in fleet.types.items():
        if kind.rollout is not None and key in counts:  # no row matched: none to correct
            counts[key].update(_rollout_corrections(db, fleet, key, kind.rollout, where, params))
    return counts


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
    db: sqlite_utils.Database,
    fleet: FleetState,
    key: str,
    active: ActiveRollout,
    where: Sequence[str] = (),
    params: Sequence[Any] = (),
) -> Counter[Status]:
    """What the grouped pass got wrong for a type with an active rollout, by status.

    Of the devices matching ``where`` (on ``endpoints e``) only, as that pass.

    The pass gave every device the :func:`_base_standing`. Three smaller
    reads correct it: the devices on the other side of the wave's border
    (a range of the ``endpoints_bucket`` index, at most half the buckets),
    then the devices with a row in the rollout and the trial devices (few
    next to a fleet), whose status also depends on their attempts.
    """
    share = _share(active)
    base = _base_standing(active)
    change: Counter[Status] = Counter()
    also = "".join(f" AND {condition}" for condition in where)

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
            f" WHERE e.type_key = ? AND {other}{also} GROUP BY 1, 2, 3",
            (key, share, *params),
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
        f" ON e.serial = d.serial WHERE d.rollout_id = ? AND e.type_key = ?{also}"
        " GROUP BY 1, 2, 3, 4, 5, 6, 7",
        (active.max_attempts, active.id, key, *params),
    )
    # From the trial list to its devices (the serial's, then its peripherals),
    # by index: an OR in one join would read the whole type instead, and so would
    # the endpoints_bucket index on type_key (the unary + keeps the planner off it).
    trial_only = db.execute(
        "WITH trial_rows AS (SELECT e.serial, e.version, e.report_state, e.report_version,"
        " e.bucket FROM trial_devices t CROSS JOIN endpoints e ON e.serial = t.serial"
        f" WHERE +e.type_key = ?{also} UNION SELECT e.serial, e.version, e.report_state,"
        " e.report_version, e.bucket FROM trial_devices t CROSS JOIN endpoints e"
        f" ON e.parent_serial = t.serial WHERE +e.type_key = ?{also})"
        f" SELECT version, report_state, report_version, {side('bucket')}, 1, 0, 0,"
        " count(*) FROM trial_rows r WHERE NOT EXISTS (SELECT 1 FROM rollout_devices d"
        " WHERE d.rollout_id = ? AND d.serial = r.serial) GROUP BY 1, 2, 3, 4",
        (key, *params, key, *params, active.id),
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
        "SELECT min(e.type) FROM endpoints e WHERE " + GROUP_TERM,
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
