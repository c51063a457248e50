"""The endpoint registry: what each device last said, and its history.

Polls register devices and refresh them (grouped, one transaction for many);
reports update them, all or nothing, and never register a device; a rollout's
attempts are noted in the same transaction. :func:`forget_endpoints` removes
devices. The views of the fleet are :mod:`dynupdate.core.endpoints`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

import sqlite_utils

from dynupdate.core import audit
from dynupdate.core.attempts import Seen, note_devices, tracked_serials
from dynupdate.core.db import write
from dynupdate.core.devices import type_key
from dynupdate.core.durations import format_duration
from dynupdate.core.errors import InvalidInput, NotFound
from dynupdate.core.times import format_utc, utc_now
from dynupdate.core.vocabulary import ReportState
from dynupdate.core.waves import bucket

__all__ = [
    "HISTORY_LIMIT",
    "Forgotten",
    "Sighting",
    "StatusReport",
    "UnknownDevice",
    "forget_endpoints",
    "record_polls",
    "record_report_groups",
    "record_reports",
    "registered_parents",
]

HISTORY_LIMIT = 50


class UnknownDevice(NotFound):
    """A report names a device that has never polled (answered ``409 unknown-device``)."""

    def __init__(self, serials: Sequence[str]) -> None:
        self.serials = tuple(serials)
        shown = ", ".join(repr(s[:64]) for s in self.serials[:3])
        more = f" and {len(self.serials) - 3} more" if len(self.serials) > 3 else ""
        super().__init__(f"No device {shown}{more} has polled yet: poll, then report again.")


class Sighting(NamedTuple):
    """What one poll said about one device (an endpoint or a peripheral).

    A named tuple, as the decision's records: one is made for every device of
    every poll, in a fifth of the time a frozen dataclass of 13 fields takes.
    """

    serial: str
    type: str
    version: str
    model: str | None = None
    mac: str | None = None
    tz: str | None = None
    in_call: bool = False
    address: str | None = None
    parent_serial: str | None = None
    offered_version: str | None = None
    # The active rollout of its type: what the poll says of the device's attempt
    # is noted in the transaction that records the poll.
    rollout: int | None = None
    # What the poll was told: the reason of its answer (UPDATE_OFFERED when it was
    # offered one) and the retryAt it was given.
    reason: str | None = None
    retry_at: datetime | None = None


@dataclass(frozen=True)
class StatusReport:
    serial: str
    type: str
    version: str
    state: str
    detail: str | None = None
    rollout: int | None = None  # as for Sighting: the active rollout of its type


def _history(
    db: sqlite_utils.Database,
    serial: str,
    at: str,
    event: str,
    version: str | None,
    detail: str | None = None,
) -> None:
    db.execute(
        "INSERT INTO endpoint_history (serial, at, event, version, detail) VALUES (?, ?, ?, ?, ?)",
        (serial, at, event, version, detail),
    )


def _prune(db: sqlite_utils.Database, serials: Iterable[str]) -> None:
    """Keep the newest HISTORY_LIMIT events per device."""
    for serial in serials:
        db.execute(
            "DELETE FROM endpoint_history WHERE serial = ? AND id <= (SELECT id FROM"
            " endpoint_history WHERE serial = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (serial, serial, HISTORY_LIMIT),
        )


_REFRESH = (
    "UPDATE endpoints SET type = ?, model = ?, mac = ?, tz = ?, in_call = ?, address = ?,"
    " last_poll = ?, retry_at = ? WHERE serial = ? AND version = ? AND type_key = ?"
    " AND parent_serial IS ? AND (? IS NULL OR offered_version = ?) AND last_reason IS ?"
)
# A poll whose answer has another reason than the last one, and nothing else new:
# last_reason is in the endpoints_window index's condition, so setting it costs an
# index write while the answer is outside-window, which _REFRESH spares the
# usual poll by leaving it alone when it is unchanged.
_REFRESH_REASON = (  # numbered: the same parameters as _REFRESH
    "UPDATE endpoints SET type = ?1, model = ?2, mac = ?3, tz = ?4, in_call = ?5, address = ?6,"
    " last_poll = ?7, retry_at = ?8, last_reason = ?15 WHERE serial = ?9 AND version = ?10"
    " AND type_key = ?11 AND parent_serial IS ?12 AND (?13 IS NULL OR offered_version = ?14)"
)


def record_polls(
    db: sqlite_utils.Database,
    sightings: Sequence[tuple[Sighting, datetime]],
    *,
    events: list[str] | None = None,
) -> None:
    """Register or refresh devices from polls, in one transaction.

    History gets an event only when something worth keeping changes (first
    seen, a new version, a new offer), never one row per poll. A sighting with
    a ``rollout`` is noted for its attempt in the same transaction (a revert
    that meets a halt rule halts there); a halt appends its line to ``events``.
    """
    touched: set[str] = set()
    conn = db.conn
    second: datetime | None = None
    at = ""  # set by the first sighting, whose time is never None
    polls = []
    noted: list[tuple[int, Sighting, datetime]] = []
    for s, when in sightings:
        if s.rollout is not None:
            noted.append((s.rollout, s, when))
        # Polls written together mostly share their second: format it once.
        if when.microsecond:
            when = when.replace(microsecond=0)
        if when != second:
            second, at = when, format_utc(when)
        retry = None if s.retry_at is None else format_utc(s.retry_at)
        refresh = (
            s.type,
            s.model,
            s.mac,
            s.tz,
            int(s.in_call),
            s.address,
            at,
            retry,
            s.serial,
            s.version,
            type_key(s.type),
            s.parent_serial,
            s.offered_version,
            s.offered_version,
            s.reason,
        )
        polls.append((s, at, refresh))
    with write(db):
        # The usual poll changes nothing worth a history event: same version,
        # same offer (or none), same type and parent, an answer of the same
        # reason. One UPDATE that leaves the indexed columns (and last_reason)
        # alone covers it, run for a whole chunk at once. When
        # some poll of a chunk needs more, the chunk is replayed one poll at a
        # time, in order, through the full path that decides the events: a
        # refresh only rewrites what the next write of that device rewrites too.
        for start in range(0, len(polls), _CHUNK):
            chunk = polls[start : start + _CHUNK]
            if conn.executemany(_REFRESH, [p[2] for p in chunk]).rowcount == len(chunk):
                continue
            for s, at, refresh in chunk:
                if conn.execute(_REFRESH, refresh).rowcount:
                    continue
                if conn.execute(_REFRESH_REASON, refresh).rowcount:
                    continue
                _record_poll(db, s, at, touched)
        _prune(db, touched)
        if noted:
            _note_polls(db, noted, events)


def _note_polls(
    db: sqlite_utils.Database,
    noted: Sequence[tuple[int, Sighting, datetime]],
    events: list[str] | None,
) -> None:
    """Polls of types with an active rollout, noted for the devices their rollout tracks.

    Most polls are of devices never offered V: one lookup per rollout for all
    of them, and a record only for the few it tracks.
    """
    serials: dict[int, list[str]] = {}
    for rollout_id, s, _ in noted:
        serials.setdefault(rollout_id, []).append(s.serial)
    tracked = {
        (rollout_id, serial)
        for rollout_id, some in serials.items()
        for serial in tracked_serials(db, rollout_id, some)
    }
    if tracked:
        seen = [
            (r, Seen(s.serial, s.version, at=when), when)
            for r, s, when in noted
            if (r, s.serial) in tracked
        ]
        _note_rollouts(db, seen, events)


def _note_rollouts(
    db: sqlite_utils.Database,
    seen: Sequence[tuple[int, Seen, datetime]],
    events: list[str] | None,
) -> None:
    """Note what polls or reports say of rollout attempts, per rollout, in the caller's write."""
    by_rollout: dict[int, list[Seen]] = {}
    times: dict[int, list[datetime]] = {}
    for rollout_id, item, when in seen:
        by_rollout.setdefault(rollout_id, []).append(item)
        times.setdefault(rollout_id, []).append(when)
    for rollout_id, items in by_rollout.items():
        reason = note_devices(db, rollout_id, items, max(times[rollout_id]))
        if reason is not None and events is not None:
            type_, version = db.execute(
                "SELECT type, version FROM rollouts WHERE id = ?", (rollout_id,)
            ).fetchone()
            events.append(f"{type_} {version} halted: {reason}")


_CHUNK = 64  # polls refreshed by one executemany


# Registers a device, or updates it: the offer (and when it was first made) is kept
# when a poll makes none, first_seen is never rewritten.
_UPSERT = (
    "INSERT INTO endpoints (serial, type, type_key, version, model, mac, tz, in_call, address,"
    " parent_serial, first_seen, last_poll, offered_version, offered_at, bucket, last_reason,"
    " retry_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (serial) DO UPDATE SET type = excluded.type, type_key = excluded.type_key,"
    " version = excluded.version, model = excluded.model, mac = excluded.mac, tz = excluded.tz,"
    " in_call = excluded.in_call, address = excluded.address,"
    " parent_serial = excluded.parent_serial, last_poll = excluded.last_poll,"
    " offered_version = coalesce(excluded.offered_version, offered_version),"
    " offered_at = coalesce(excluded.offered_at, offered_at), bucket = excluded.bucket,"
    " last_reason = excluded.last_reason, retry_at = excluded.retry_at"
)


def _record_poll(db: sqlite_utils.Database, s: Sighting, at: str, touched: set[str]) -> None:
    """The full path of one poll: register, or update and record the events."""
    row = db.execute(
        "SELECT version, offered_version FROM endpoints WHERE serial = ?", (s.serial,)
    ).fetchone()
    old_version, old_offer = row if row is not None else (None, None)
    offer_changed = s.offered_version is not None and s.offered_version != old_offer
    db.execute(
        _UPSERT,
        (
            s.serial,
            s.type,
            type_key(s.type),
            s.version,
            s.model,
            s.mac,
            s.tz,
            int(s.in_call),
            s.address,
            s.parent_serial,
            at,  # first_seen: kept when the device is known
            at,
            s.offered_version,
            at if offer_changed else None,
            bucket(s.parent_serial or s.serial),  # a peripheral leads with its endpoint
            s.reason,
            format_utc(s.retry_at),
        ),
    )
    if row is None:
        _history(db, s.serial, at, "first-seen", s.version)
        if s.offered_version:
            _history(db, s.serial, at, "offered", s.offered_version)
        touched.add(s.serial)
        return
    if old_version != s.version:
        _history(db, s.serial, at, "version-changed", s.version, f"from {old_version}")
        touched.add(s.serial)
    if offer_changed:
        _history(db, s.serial, at, "offered", s.offered_version)
        touched.add(s.serial)


def record_reports(
    db: sqlite_utils.Database, reports: Sequence[tuple[StatusReport, datetime]]
) -> None:
    """Store one report durably, all or nothing (the caller acknowledges only after this returns).

    Raises :class:`UnknownDevice`, having stored nothing, when a device of the
    report has never polled: a report registers nobody, so that anyone able to
    reach the server cannot fill its disk with invented devices.
    """
    [refused] = record_report_groups(db, [reports])
    if refused is not None:
        raise refused


def record_report_groups(
    db: sqlite_utils.Database,
    groups: Sequence[Sequence[tuple[StatusReport, datetime]]],
    *,
    events: list[str] | None = None,
) -> list[UnknownDevice | None]:
    """Store several reports in one transaction, each all or nothing; per report, its refusal.

    The check that every device is registered runs in the transaction that
    writes, so a device forgotten meanwhile cannot slip through. Reports with a
    ``rollout`` are noted for their attempts in that transaction, as for polls.
    """
    refusals: list[UnknownDevice | None] = []
    noted: list[tuple[int, Seen, datetime]] = []
    with write(db):
        known = registered_parents(db, (r.serial for group in groups for r, _ in group))
        stored: set[str] = set()
        for group in groups:
            serials = dict.fromkeys(r.serial for r, _ in group)
            unknown = [serial for serial in serials if serial not in known]
            if unknown:
                refusals.append(UnknownDevice(unknown))
                continue
            for r, when in group:
                _store_report(db, r, format_utc(when))
                if r.rollout is not None:
                    noted.append(
                        (r.rollout, Seen(r.serial, r.version, r.state, r.detail, when), when)
                    )
            stored.update(serials)
            refusals.append(None)
        _prune(db, stored)
        if noted:
            _note_rollouts(db, noted, events)
    return refusals


def _store_report(db: sqlite_utils.Database, r: StatusReport, at: str) -> None:
    detail = r.detail if r.state == ReportState.FAILED else None
    db.execute(
        "UPDATE endpoints SET last_report = ?, report_state = ?, report_version = ?,"
        " report_detail = ?, version = CASE WHEN ? THEN ? ELSE version END"
        " WHERE serial = ?",
        (at, r.state, r.version, detail, r.state == ReportState.INSTALLED, r.version, r.serial),
    )
    _history(db, r.serial, at, r.state, r.version, r.detail)


def registered_parents(db: sqlite_utils.Database, serials: Iterable[str]) -> dict[str, str | None]:
    """The registered devices among ``serials``, each with its parent serial (None: an endpoint).

    Serials not registered yet are absent from the answer.
    """
    wanted = list(dict.fromkeys(serials))
    found: dict[str, str | None] = {}
    for start in range(0, len(wanted), 500):  # well under SQLite's limit of host parameters
        chunk = wanted[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        query = f"SELECT serial, parent_serial FROM endpoints WHERE serial IN ({marks})"
        found.update(db.execute(query, chunk).fetchall())
    return found


@dataclass(frozen=True)
class Forgotten:
    """What :func:`forget_endpoints` removed, by kind (serials sorted)."""

    endpoints: tuple[str, ...]
    peripherals: tuple[str, ...]


def forget_endpoints(
    db: sqlite_utils.Database,
    serials: Sequence[str] = (),
    *,
    stale: timedelta | None = None,
    prefix: str | None = None,
    now: datetime | None = None,
    actor: str | None = None,
) -> Forgotten:
    """Remove the named devices, or those chosen by ``stale`` and ``prefix``, with their
    peripherals and history.

    One transaction: a serial that is not registered refuses the whole call
    and nothing is removed. A device is stale when neither a poll nor a
    report came from it for ``stale`` (before ``now``); ``prefix`` chooses the
    serials that start with it (case counts; a rehearsal's, ``SIM``); given
    both, a device must be both. What is removed is one ``endpoint.forget``
    entry of the audit log (``actor``: see :func:`audit.append`).

    >>> from dynupdate.core.db import connect, migrations
    >>> db = connect(":memory:"); migrations.apply(db)
    >>> record_polls(db, [(Sighting("EP", "Trio", "1"), utc_now()),
    ...                   (Sighting("CAM", "Cam", "1", parent_serial="EP"), utc_now())])
    >>> forget_endpoints(db, ["EP"])
    Forgotten(endpoints=('EP',), peripherals=('CAM',))
    """
    chosen_by_rule = stale is not None or prefix is not None
    if bool(serials) == chosen_by_rule:
        raise InvalidInput(
            "Name the devices to forget, or a stale duration and/or a prefix, not both."
        )
    if prefix == "":
        raise InvalidInput("Give a non-empty --prefix: an empty one would forget every device.")
    with write(db):
        if chosen_by_rule:
            where: list[str] = []
            params: list[str | int] = []
            if stale is not None:
                cutoff = format_utc((now or utc_now()) - stale)
                where.append("coalesce(last_poll, '') < ? AND coalesce(last_report, '') < ?")
                params.extend((cutoff, cutoff))
            if prefix is not None:
                # substr, not LIKE or GLOB: no character of the prefix is a wildcard.
                where.append("substr(serial, 1, ?) = ?")
                params.extend((len(prefix), prefix))
            chosen = dict(
                db.execute(
                    "SELECT serial, parent_serial FROM endpoints WHERE " + " AND ".join(where),
                    params,
                ).fetchall()
            )
        else:
            wanted = list(dict.fromkeys(serials))
            chosen = registered_parents(db, wanted)
            missing = [s for s in wanted if s not in chosen]
            if missing:
                shown = ", ".join(repr(s[:64]) for s in missing[:3])
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise NotFound(
                    f"No endpoint with serial {shown}{more}; nothing was forgotten."
                    " See: dynupdate endpoint list"
                )
        removed = dict(chosen)
        frontier = list(chosen)
        while frontier:  # peripherals go with their endpoint
            attached = _attached(db, frontier)
            frontier = [serial for serial in attached if serial not in removed]
            removed.update(attached)
        rows = [(serial,) for serial in removed]
        db.conn.executemany("DELETE FROM endpoint_history WHERE serial = ?", rows)
        db.conn.executemany("DELETE FROM endpoints WHERE serial = ?", rows)
        forgotten = Forgotten(
            endpoints=tuple(sorted(s for s, parent in removed.items() if parent is None)),
            peripherals=tuple(sorted(s for s, parent in removed.items() if parent is not None)),
        )
        if removed:
            detail = {
                "endpoints": list(forgotten.endpoints),
                "peripherals": list(forgotten.peripherals),
                "stale": format_duration(stale) if stale is not None else None,
                "prefix": prefix,
            }
            audit.append(db, actor, audit.Action.ENDPOINT_FORGET, None, detail)
    return forgotten


def _attached(db: sqlite_utils.Database, parents: Sequence[str]) -> dict[str, str]:
    """The devices registered under any of ``parents``, each with its parent."""
    found: dict[str, str] = {}
    for start in range(0, len(parents), 500):
        chunk = parents[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        query = f"SELECT serial, parent_serial FROM endpoints WHERE parent_serial IN ({marks})"
        found.update(db.execute(query, chunk).fetchall())
    return found
