"""A rollout's options and its gates, as pure functions of counts and times (SPEC section 6).

The rollout model counts; these functions decide. :func:`halt_reason` says
whether failures halt the rollout, :func:`wave_gate` whether the current wave
may pass (the next opens, or after the last the rollout completes) and, when
not, why in words.

>>> options = RolloutOptions(parse_waves("10%,100%"))
>>> halt_reason(options, failed=5, outcomes=100)
'5 failed devices reached --max-failures 5'
>>> halt_reason(options, failed=2, outcomes=10)
'2 of 10 outcomes failed (20%), over --max-failure-rate 10%'
>>> halt_reason(options, failed=1, outcomes=9) is None
True
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from typing import Any

from dynupdate.core.durations import parse_duration
from dynupdate.core.errors import InvalidInput
from dynupdate.core.times import format_utc
from dynupdate.core.waves import DEFAULT_WAVES, Wave, format_percent, parse_percent, parse_waves

__all__ = [
    "LIVE_WINDOW",
    "Gate",
    "RolloutOptions",
    "WaveEvidence",
    "halt_reason",
    "wave_gate",
]

LIVE_WINDOW = timedelta(days=7)  # a device heard from within this counts as live (K)


@dataclass(frozen=True)
class RolloutOptions:
    """Every option of ``rollout start``; shares and rates in basis points (1% = 100)."""

    waves: tuple[Wave, ...] = field(default_factory=lambda: parse_waves(DEFAULT_WAVES))
    soak: timedelta = timedelta(hours=1)
    min_devices: int = 10
    min_success: int = 9500
    max_failures: int = 5
    max_failure_rate: int = 1000
    max_in_flight: int | None = None
    max_per_hour: int | None = None
    max_attempts: int = 3
    install_timeout: timedelta = timedelta(hours=2)
    manual: bool = False

    def __post_init__(self) -> None:
        for name in ("min_devices", "max_failures", "max_attempts"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"Invalid --{name.replace('_', '-')}: use 1 or more.")
        for name in ("max_in_flight", "max_per_hour"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidInput(f"Invalid --{name.replace('_', '-')} {value}: use 1 or more.")

    def given(self, **text: str | int | bool | None) -> RolloutOptions:
        """These options with those an admin gave (``None``: not given) read from their text.

        >>> RolloutOptions().given(waves="trial,100%", min_success="99%", manual=None).min_success
        9900
        """
        values: dict[str, Any] = {}
        for name, value in text.items():
            if value is None:
                continue
            option = f"--{name.replace('_', '-')}"
            if name == "waves":
                values[name] = parse_waves(str(value))
            elif name in ("soak", "install_timeout"):
                values[name] = parse_duration(str(value))
            elif name in ("min_success", "max_failure_rate"):
                values[name] = parse_percent(str(value), option, zero=name == "max_failure_rate")
            elif name in _FIELDS:
                values[name] = value
            else:
                raise TypeError(f"no rollout option {name}")
        return replace(self, **values)

    @property
    def warning(self) -> str | None:
        """What a start should warn about, if anything."""
        if self.soak < self.install_timeout:
            return (
                "--soak is shorter than --install-timeout: a wave may pass before its "
                "slowest installs have timed out."
            )
        return None


_FIELDS = frozenset(f.name for f in fields(RolloutOptions))


@dataclass(frozen=True)
class WaveEvidence:
    """The current wave's own devices (for the trial wave, the trial devices).

    ``live``: K, those on a version older than V heard from within 7 days.
    """

    outcomes: int = 0
    succeeded: int = 0
    in_flight: int = 0
    live: int = 0


@dataclass(frozen=True)
class Gate:
    """The next-wave gate as ``rollout status --json`` shows it (``gate``)."""

    outcomes: int
    needed: int
    succeeded: int
    in_flight: int
    blocked_by: str | None

    @property
    def passed(self) -> bool:
        return self.blocked_by is None

    def to_dict(self) -> dict[str, int | str | None]:
        return {
            "outcomes": self.outcomes,
            "needed": self.needed,
            "succeeded": self.succeeded,
            "in_flight": self.in_flight,
            "blocked_by": self.blocked_by,
        }


def halt_reason(options: RolloutOptions, *, failed: int, outcomes: int) -> str | None:
    """Why these counts (since the last resume) halt the rollout, or None."""
    if failed >= options.max_failures:
        return f"{failed} failed devices reached --max-failures {options.max_failures}"
    if outcomes >= options.min_devices and failed * 10_000 > options.max_failure_rate * outcomes:
        share = format_percent(round(failed * 10_000 / outcomes))
        return (
            f"{failed} of {outcomes} outcomes failed ({share}), over --max-failure-rate "
            f"{format_percent(options.max_failure_rate)}"
        )
    return None


def wave_gate(
    options: RolloutOptions,
    evidence: WaveEvidence,
    *,
    opened_at: datetime,
    now: datetime,
) -> Gate:
    """Whether the current wave (of a running, automatic rollout) may pass, and if not, why.

    >>> opened = datetime.fromisoformat("2026-12-02T13:05:00+00:00")
    >>> gate = wave_gate(RolloutOptions(), WaveEvidence(7, 7, 3, 40), opened_at=opened,
    ...                  now=opened + timedelta(minutes=30))
    >>> gate.blocked_by
    'soaking until 2026-12-02T14:05:00Z; 7 of 10 outcomes; 3 attempts in flight'
    """
    needed = min(options.min_devices, evidence.live)
    reasons = []
    until = opened_at + options.soak
    if now < until:
        reasons.append(f"soaking until {format_utc(until)}")
    if evidence.outcomes < needed:
        reasons.append(f"{evidence.outcomes} of {needed} outcomes")
    pending = evidence.outcomes + evidence.in_flight
    if evidence.succeeded * 10_000 < options.min_success * pending:
        if evidence.in_flight:
            reasons.append(
                f"{evidence.in_flight} attempt{'s' if evidence.in_flight != 1 else ''} in flight"
            )
        if evidence.outcomes and evidence.succeeded * 10_000 < options.min_success * (
            evidence.outcomes
        ):
            reasons.append(
                f"{evidence.succeeded} of {evidence.outcomes} succeeded, "
                f"{format_percent(options.min_success)} needed"
            )
    return Gate(
        evidence.outcomes,
        needed,
        evidence.succeeded,
        evidence.in_flight,
        "; ".join(reasons) or None,
    )
