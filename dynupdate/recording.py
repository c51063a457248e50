"""The writer thread of a poll server: endpoint rows, reports, rollout attempts and gates.

Polls only need to be visible within a second: they are grouped and written
together. A report, and an offer that opens a rollout attempt, are answered
only once committed. The same thread evaluates the rollout gates every few
seconds. One thread and one connection per worker, so the event loop never
waits for the disk.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from dynupdate.core.attempts import reserve_attempt
from dynupdate.core.db import connect
from dynupdate.core.errors import Conflict, StorageError, one_line
from dynupdate.core.registry import (
    Sighting,
    StatusReport,
    UnknownDevice,
    record_polls,
    record_report_groups,
)
from dynupdate.core.rollout_records import ACTIVE_SQL
from dynupdate.core.rollouts import evaluate

__all__ = ["GATE_INTERVAL", "MAX_UNRECORDED", "EndpointWriter"]

log = logging.getLogger("dynupdate.serve")


# Polls not yet recorded while the database cannot be written (a full disk): the
# newest of each device is kept, for at most this many devices, and retried.
MAX_UNRECORDED = 100_000
RETRY_EVERY = 1.0  # seconds between retries of kept polls while writes fail
RETRY_SLICE = 2_000  # kept polls per retried transaction: a failing retry stays cheap
# Seconds between evaluations of rollout gates by each worker: the writer wakes at
# least every flush_interval, so gates run well within SPEC's 5 s.
GATE_INTERVAL = 4.0


class EndpointWriter:
    """One thread, one connection: groups poll writes; reports are committed before replying.

    Polls are queued and written together every ``flush_interval`` (they only
    need to be visible within a second); a report wakes the writer at once and
    its future resolves only after COMMIT, so an acknowledged report survives a
    crash. Polls are written before the reports queued after them, so a device
    may report right after its first poll.

    While the database cannot be written (a full disk, a lock held too long),
    polls are still answered: the newest poll of each device is kept (at most
    ``max_unrecorded`` devices) and written once writing works again. One log
    line says when that starts and one when it ends.

    ``sampled(queued, unrecorded)``, when given, is called by the writer each time
    it has written (or waited ``flush_interval`` for nothing): the requests queued
    for it meanwhile, and the polls it keeps unrecorded (``serve --metrics``).
    """

    def __init__(
        self,
        db_path: Path,
        flush_interval: float = 0.2,
        max_unrecorded: int = MAX_UNRECORDED,
        *,
        connect_db: Callable[[Path], Any] = connect,  # tests give a database that fills up
        gate_interval: float = GATE_INTERVAL,
        sampled: Callable[[int, int], None] | None = None,
    ) -> None:
        self.db_path = db_path
        self._sampled = sampled
        self.gate_interval = gate_interval
        self._connect = connect_db
        self.flush_interval = flush_interval
        self.max_unrecorded = max_unrecorded
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # Set when something must not wait for the next grouped write: a report, stop.
        self._urgent = threading.Event()
        self._thread = threading.Thread(target=self._run, name="endpoint-writer", daemon=True)
        self._stopping = False
        # Only the writer thread touches these.
        self._unrecorded: dict[str, tuple[Sighting, datetime]] = {}
        self._failing_since = 0.0  # time.monotonic() when writes began to fail
        self._next_retry = 0.0
        self._dropped = 0  # polls of devices past max_unrecorded, this episode
        self._next_gates = 0.0
        self._gates_failing = False

    def start(self) -> None:
        self._thread.start()

    def polls(self, sightings: Sequence[tuple[Sighting, datetime]]) -> None:
        self._queue.put(("poll", sightings, None))

    def reports(
        self,
        reports: Sequence[tuple[StatusReport, datetime]],
        done: Callable[[Exception | None], None],
    ) -> None:
        """Store one report, all or nothing; ``done(None)``, or ``done(error)`` when it is not.

        The error is :class:`UnknownDevice` when a device of it has never polled.
        """
        self._queue.put(("report", reports, done))
        self._urgent.set()

    def reserve(
        self,
        items: Sequence[tuple[int, str, str | None, str, datetime]],
        done: Callable[[list[datetime | Exception | None]], None],
    ) -> None:
        """Open rollout attempts, each ``(rollout_id, serial, parent, version, now)``.

        ``done`` gets one result per item: None (offer V), the time a limit frees
        (answer ``rate-limited``), or the error that kept it from opening.
        """
        self._queue.put(("reserve", items, done))
        self._urgent.set()

    def stop(self) -> None:
        """Flush what is queued and end the thread."""
        self._queue.put(("stop", None, None))
        self._urgent.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        db = self._connect(self.db_path)
        try:
            stop = False
            while not stop:
                if time.monotonic() >= self._next_gates:
                    self._evaluate_gates(db)
                polls: list = []
                reports: list = []
                waiting: list = []
                reservations: list = []
                try:
                    first = self._queue.get(timeout=self.flush_interval)
                except queue.Empty:
                    if self._unrecorded and time.monotonic() >= self._next_retry:
                        self._record_polls(db, [], retry_now=False)
                    if self._sampled is not None:
                        self._sampled(self._queue.qsize(), len(self._unrecorded))
                    continue
                # Let polls gather for a moment unless a report is waiting. One
                # sleep rather than a wake-up per poll: under load, the writer
                # then takes the GIL a few times a second, not thousands.
                if first[0] == "poll":
                    self._urgent.wait(self.flush_interval)
                self._urgent.clear()  # what set it is in the queue already
                items = [first]
                while True:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                for kind, payload, done in items:
                    if kind == "poll":
                        polls.extend(payload)
                    elif kind == "report":
                        reports.append(payload)
                        waiting.append(done)
                    elif kind == "reserve":
                        reservations.append((payload, done))
                    else:
                        stop = True
                self._write(db, polls, reports, waiting, reservations, last=stop)
                if self._sampled is not None:
                    self._sampled(self._queue.qsize(), len(self._unrecorded))
        finally:
            db.close()

    def _write(self, db, polls, reports, waiting, reservations=(), last: bool = False) -> None:
        if polls or self._unrecorded:
            # A waiting report may be about a device whose first poll is kept.
            self._record_polls(db, polls, retry_now=bool(reports) or last)
        for items, done in reservations:
            done([self._reserve(db, *item) for item in items])
        if last and self._unrecorded:
            log.error(
                "stopping with %d polls not recorded: %s",
                len(self._unrecorded),
                "the database still cannot be written",
            )
        if reports:
            events: list[str] = []
            try:
                outcomes: list[Exception | None] = list(
                    record_report_groups(db, reports, events=events)
                )
                _log_events(events)
            except Exception as e:
                # One line: a full disk or a held lock is an operator's matter, not a bug.
                log.error(
                    "Could not store a report of %d devices (answered 503): %s",
                    sum(len(group) for group in reports),
                    one_line(e),
                )
                outcomes = [e] * len(reports)
            for i, outcome in enumerate(outcomes):
                if isinstance(outcome, UnknownDevice) and any(
                    serial in self._unrecorded for serial in outcome.serials
                ):
                    # Its poll is kept, not written: the device is known, the disk is full.
                    outcomes[i] = StorageError("a poll of its device is not recorded yet")
                    log.error(
                        "Could not store a report of %d devices (answered 503): %s",
                        len(reports[i]),
                        outcomes[i],
                    )
            for done, outcome in zip(waiting, outcomes, strict=True):
                done(outcome)

    def _record_polls(self, db, polls, *, retry_now: bool) -> None:
        if not self._unrecorded:
            events: list[str] = []
            try:
                record_polls(db, polls, events=events)
                _log_events(events)
                return
            except Exception as e:
                if not _unwritable(e):
                    log.error("Could not record %d polls: %s", len(polls), one_line(e))
                    return
                self._failing_since = time.monotonic()
                self._next_retry = self._failing_since + RETRY_EVERY
                self._keep(polls)
                log.error(
                    "cannot record polls: %s; keeping %d registrations to retry",
                    one_line(e),
                    len(self._unrecorded),
                )
                return
        self._keep(polls)
        if not retry_now and time.monotonic() < self._next_retry:
            return
        # Oldest first, in slices: progress on a disk that frees up slowly, and a
        # retry on a disk still full fails after one slice's work, not all of it.
        kept = list(self._unrecorded.values())
        recorded = 0
        for start in range(0, len(kept), RETRY_SLICE):
            chunk = kept[start : start + RETRY_SLICE]
            events = []
            try:
                record_polls(db, chunk, events=events)
                _log_events(events)
            except Exception as e:
                if _unwritable(e):
                    self._next_retry = time.monotonic() + RETRY_EVERY
                    return
                log.error("Could not record %d kept polls: %s", len(chunk), one_line(e))
            for sighting, _ in chunk:
                del self._unrecorded[sighting.serial]
            recorded += len(chunk)
        dropped = (
            f"; the polls of {self._dropped} more devices were not kept"
            f" (over {self.max_unrecorded})"
            if self._dropped
            else ""
        )
        log.warning(
            "recorded %d polls kept during %.0f s of database errors%s",
            recorded,
            time.monotonic() - self._failing_since,
            dropped,
        )
        self._dropped = 0

    def _reserve(
        self, db, rollout_id: int, serial: str, parent: str | None, version: str, now: datetime
    ) -> datetime | Exception | None:
        try:
            return reserve_attempt(db, rollout_id, serial, parent, now=now, version=version)
        except Conflict as e:
            return e  # the rollout stopped, or the device became held, since the decision
        except Exception as e:
            log.error("Could not open a rollout attempt for %r: %s", serial[:64], one_line(e))
            return e

    def _evaluate_gates(self, db) -> None:
        """Rollout gates, timeouts and halts (SPEC section 6: at least every 5 s)."""
        self._next_gates = time.monotonic() + self.gate_interval
        try:
            if db.execute(f"SELECT 1 FROM rollouts WHERE {ACTIVE_SQL} LIMIT 1").fetchone():
                _log_events(evaluate(db))
        except Exception as e:
            # Evaluated again at the next interval. One line when it starts failing
            # and one when it works again, never a traceback.
            if not self._gates_failing:
                log.error("Could not evaluate rollout gates (retrying): %s", one_line(e))
            self._gates_failing = True
            return
        if self._gates_failing:
            log.warning("rollout gates evaluated again")
            self._gates_failing = False

    def _keep(self, polls) -> None:
        """Keep the newest poll of each device, for at most ``max_unrecorded`` devices."""
        for item in polls:
            serial = item[0].serial
            if serial not in self._unrecorded and len(self._unrecorded) >= self.max_unrecorded:
                self._dropped += 1
                if self._dropped == 1:
                    log.error(
                        "cannot keep more than %d registrations: the polls of further devices"
                        " are not recorded until the database can be written",
                        self.max_unrecorded,
                    )
                continue
            self._unrecorded[serial] = item




def _unwritable(error: Exception) -> bool:
    """The database cannot be written for now (full, read-only, locked), as opposed to a bug."""
    return isinstance(error, (sqlite3.OperationalError, StorageError))


def _log_events(events: Sequence[str]) -> None:
    """Rollout transitions made by this process, one line each (no other process logs them)."""
    for line in events:
        # A timeout names a device's serial: shown, never obeyed by a terminal.
        shown = line if line.isprintable() else line.encode("unicode_escape").decode("ascii")
        log.warning("rollout: %s", shown)
