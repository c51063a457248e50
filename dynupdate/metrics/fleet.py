"""The fleet's metrics: endpoints by type and status, and rollouts, read when scraped.

They come from the views ``overview`` and ``rollout status`` show (core's
:func:`~dynupdate.core.endpoints.overview` and
:func:`~dynupdate.core.rollout_records.rollout_views`), read at most once per
``ttl`` seconds in each worker, so a storm of scrapes cannot load the database.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from dynupdate.core.db import connect
from dynupdate.core.endpoints import overview
from dynupdate.core.errors import one_line
from dynupdate.core.fleet import STATUSES, load_fleet_state
from dynupdate.core.rollout_records import RolloutSummary, rollout_views
from dynupdate.core.vocabulary import RolloutState

__all__ = ["FLEET_TTL", "MAX_TYPES", "OUTCOMES", "FleetCollector", "fleet_metrics"]

log = logging.getLogger("dynupdate.serve")

FLEET_TTL = 2.0  # seconds a read of the database is served again
# Device types in dynupdate_endpoints: every type with a policy or a package, then
# the largest of those only devices named, up to this many. Devices choose type
# names: without a cap, a device sending a new type in each poll would grow the
# scrape (and the Prometheus server's series) without end.
MAX_TYPES = 200
OUTCOMES = ("offered", "in_flight", "succeeded", "failed", "held")


class FleetCollector:
    """A prometheus_client collector of :func:`fleet_metrics`, read from ``db_path``.

    A read opens its own connection (the scrape runs in a thread of its own). A
    failed read is one log line (not one per scrape) and
    ``dynupdate_fleet_metrics_up 0``, the worker's own metrics still served.
    """

    def __init__(
        self,
        db_path: Path,
        ttl: float = FLEET_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db_path = db_path
        self.ttl = ttl
        self.clock = clock
        self.reads = 0  # for tests: how often the database was read
        self._metrics: list[Metric] = []
        self._until = -float("inf")
        self._failing = False

    def collect(self) -> Iterable[Metric]:
        if self.clock() >= self._until:
            self._metrics = self._read()
            self._until = self.clock() + self.ttl
        return self._metrics

    def _read(self) -> list[Metric]:
        self.reads += 1
        try:
            db = connect(self.db_path)
            try:
                rows = overview(db, load_fleet_state(db))
                rollouts = rollout_views(db)
            finally:
                db.close()
        except Exception as exc:  # a busy or broken database: the scrape goes on
            if not self._failing:
                log.error("Could not read the fleet metrics (retrying): %s", one_line(exc))
            self._failing = True
            return [_up(0)]
        if self._failing:
            log.warning("fleet metrics read again")
            self._failing = False
        return [*fleet_metrics(rows, rollouts), _up(1)]


def fleet_metrics(
    rows: Sequence[dict[str, Any]], rollouts: Sequence[RolloutSummary]
) -> list[Metric]:
    """The metric families of ``overview`` rows and ``rollout_views`` summaries.

    >>> row = {"type": "Trio", "version_to_use": "7.2", "packages": 1, "endpoints": 3,
    ...        "counts": {"up-to-date": 2, "pending": 1}}
    >>> endpoints = fleet_metrics([row], [])[0]
    >>> sorted((s.labels["status"], s.value) for s in endpoints.samples if s.value)
    [('pending', 1), ('up-to-date', 2)]
    """
    endpoints = GaugeMetricFamily(
        "dynupdate_endpoints",
        "Endpoints and peripherals by device type and status, as overview counts them "
        f"(every type with a policy or package, and the {MAX_TYPES} largest in all).",
        labels=["type", "status"],
    )
    configured = [r for r in rows if r.get("version_to_use") is not None or r.get("packages")]
    others = sorted(
        (r for r in rows if r.get("version_to_use") is None and not r.get("packages")),
        key=lambda r: -int(r["endpoints"]),
    )
    for row in [*configured, *others[: max(0, MAX_TYPES - len(configured))]]:
        counts = row["counts"]
        for status in STATUSES:
            endpoints.add_metric([row["type"], status], counts.get(status, 0))
    types = GaugeMetricFamily(
        "dynupdate_device_types",
        "Device types known (with a policy, a package or devices), shown in dynupdate_endpoints "
        "or not.",
        value=len(rows),
    )
    state = GaugeMetricFamily(
        "dynupdate_rollout_state",
        "1 for the state of each type's active (else latest) rollout, 0 for the other states.",
        labels=["type", "version", "state"],
    )
    wave = GaugeMetricFamily(
        "dynupdate_rollout_wave",
        "The wave each type's active (else latest) rollout is in, 1 for the first.",
        labels=["type", "version"],
    )
    waves = GaugeMetricFamily(
        "dynupdate_rollout_waves",
        "The number of waves of each type's active (else latest) rollout.",
        labels=["type", "version"],
    )
    devices = GaugeMetricFamily(
        "dynupdate_rollout_devices",
        "Devices of each type's active (else latest) rollout, by outcome: offered (ever), "
        "in_flight, succeeded, failed (not since succeeded), held (attempts used up).",
        labels=["type", "version", "outcome"],
    )
    for summary in rollouts:
        rollout, counts = summary.rollout, summary.counts
        labels = [rollout.type, rollout.version]
        for each in RolloutState:
            state.add_metric([*labels, each.value], 1 if rollout.state == each else 0)
        wave.add_metric(labels, rollout.wave)
        waves.add_metric(labels, len(rollout.waves))
        for outcome in OUTCOMES:
            devices.add_metric([*labels, outcome], getattr(counts, outcome))
    return [endpoints, types, state, wave, waves, devices]


def _up(value: int) -> Metric:
    return GaugeMetricFamily(
        "dynupdate_fleet_metrics_up",
        "1 when the fleet metrics were read from the database, 0 when that failed (see the log).",
        value=value,
    )
