"""The update decision (SPEC section 2, a contract): pure, so it tests as a table.

For a device of type T running version C at time *now*:

1. no policy for T, or its version to use unset → ``no-policy``;
2. the device is in a call → ``in-call``;
3. target: allow-newer off → the version to use exactly (downgrades too);
   on → the newest package of T whose version ≥ the version to use;
4. C is the target, or allow-newer is on and C ≥ target → ``up-to-date``;
5. a window is set and *now* is outside it → ``outside-window`` + ``retry_at``;
6. otherwise → update to the target package.

While a rollout of the type is active (SPEC section 6), :func:`decide_rollout`
decides instead: after rule 2, a device on the rollout's version V or newer is
``up-to-date``; a device *admitted* (the rollout runs and an open wave covers
it) is ``held``, ``outside-window``, ``rate-limited`` or offered V, in that
order; every other device gets the decision of the policy as it stood at the
start, aimed at the stable version, with ``up-to-date`` and ``no-policy``
answered ``staged``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, NamedTuple

from dynupdate.core.versions import at_least, same_version, version_key
from dynupdate.core.vocabulary import Reason, ReportState, RolloutState, Status
from dynupdate.core.waves import Wave, covers
from dynupdate.core.windows import Window, is_open, retry_at

if TYPE_CHECKING:  # a leaf: packages (and the database) build on the decision, not under it
    from dynupdate.core.packages import Package

__all__ = [
    "RATE_LIMIT_RETRY",
    "Decision",
    "DeviceState",
    "Policy",
    "RolloutView",
    "Standing",
    "decide",
    "decide_for_target",
    "decide_rollout",
    "is_satisfied",
    "rollout_status",
    "status_for_target",
    "target_package",
]

# A rate-limited device comes back no sooner than this after the answer.
RATE_LIMIT_RETRY = timedelta(seconds=60)


@dataclass(frozen=True)
class Policy:
    type: str
    version_to_use: str | None
    allow_newer: bool


# The records made for every device of every poll are named tuples: immutable, and
# built in a third of the time a frozen dataclass takes (its __init__ goes through
# object.__setattr__ field by field).
class DeviceState(NamedTuple):
    serial: str
    type: str
    version: str
    in_call: bool = False
    tz: str | None = None


class Decision(NamedTuple):
    """``package`` is set when the device should update; ``reason`` otherwise.

    ``opens_attempt``: the offer of a rollout's version that starts a new attempt
    (the server reserves its slot before answering).
    """

    package: Package | None = None
    reason: Reason | None = None
    retry_at: datetime | None = None
    opens_attempt: bool = False

    @property
    def update(self) -> bool:
        return self.package is not None


def target_package(policy: Policy | None, packages: Sequence[Package]) -> Package | None:
    """The package a policy sends devices to, or None when it is not active.

    >>> from dynupdate.core.packages import Package
    >>> def package(version):
    ...     return Package("Trio", version, "trio.pup", 1, "0" * 64, None, "2026-01-01T00:00:00Z")
    >>> packages = [package("7.0"), package("7.1"), package("7.2")]
    >>> target_package(Policy("Trio", "7.1", allow_newer=False), packages).version
    '7.1'
    >>> target_package(Policy("Trio", "7.1", allow_newer=True), packages).version
    '7.2'
    >>> target_package(Policy("Trio", None, allow_newer=True), packages) is None
    True
    """
    if policy is None or policy.version_to_use is None:
        return None
    if not policy.allow_newer:
        return next((p for p in packages if same_version(p.version, policy.version_to_use)), None)
    floor = version_key(policy.version_to_use)
    # A blocked package (an aborted rollout's version) is never an allow-newer target.
    eligible = [p for p in packages if not p.blocked and version_key(p.version) >= floor]
    return max(eligible, key=lambda p: version_key(p.version), default=None)


def is_satisfied(version: str, target: Package, allow_newer: bool) -> bool:
    """Whether a device on ``version`` needs nothing from ``target`` (rule 4).

    >>> from dynupdate.core.packages import Package
    >>> target = Package("Trio", "7.1", "trio.pup", 1, "0" * 64, None, "2026-01-01T00:00:00Z")
    >>> is_satisfied("7.1.0", target, allow_newer=False)  # the same version, spelt otherwise
    True
    >>> is_satisfied("7.2", target, allow_newer=False), is_satisfied("7.2", target, True)
    (False, True)
    """
    if version == target.version:  # the usual answer, without comparing keys
        return True
    if allow_newer:
        return at_least(version, target.version)
    return same_version(version, target.version)


def decide(
    policy: Policy | None,
    packages: Sequence[Package],
    window: Window | None,
    device: DeviceState,
    now: datetime,
) -> Decision:
    """Apply the rules above; ``packages`` are those of the device's type.

    >>> from datetime import UTC
    >>> from dynupdate.core.packages import Package
    >>> gs = Package("GroupSeries", "6.2.2", "gs.pup", 1, "0" * 64, None, "2026-01-01T00:00:00Z")
    >>> policy = Policy("GroupSeries", "6.2.2", allow_newer=False)
    >>> now = datetime(2026, 11, 27, 16, 0, tzinfo=UTC)
    >>> device = DeviceState("8211ABC", "GroupSeries", "6.2.1")
    >>> decide(policy, [gs], None, device, now).package.version
    '6.2.2'
    >>> print(decide(None, [gs], None, device, now).reason)
    no-policy
    >>> in_a_call = DeviceState("8211ABC", "GroupSeries", "6.2.1", in_call=True)
    >>> print(decide(policy, [gs], None, in_a_call, now).reason)
    in-call
    """
    return decide_for_target(policy, target_package(policy, packages), window, device, now)


# Decisions are immutable: the ones without a package or a time are shared.
_NO_POLICY = Decision(reason=Reason.NO_POLICY)
_IN_CALL = Decision(reason=Reason.IN_CALL)
_UP_TO_DATE = Decision(reason=Reason.UP_TO_DATE)
_STAGED = Decision(reason=Reason.STAGED)
_HELD = Decision(reason=Reason.HELD)


def decide_for_target(
    policy: Policy | None,
    target: Package | None,
    window: Window | None,
    device: DeviceState,
    now: datetime,
) -> Decision:
    """:func:`decide` with the target already known: ``target_package(policy, packages)``."""
    if target is None or policy is None:
        return _NO_POLICY
    if device.in_call:
        return _IN_CALL
    if is_satisfied(device.version, target, policy.allow_newer):
        return _UP_TO_DATE
    if window is not None and not is_open(window, now, device.tz):
        return Decision(
            reason=Reason.OUTSIDE_WINDOW, retry_at=retry_at(window, now, device.serial, device.tz)
        )
    return Decision(package=target)


def status_for_target(
    policy: Policy | None,
    target: Package | None,
    version: str,
    report_state: str | None,
    report_version: str | None,
) -> Status:
    """The update status from a policy's target and what the device last said."""
    if policy is None or target is None:
        return Status.NO_POLICY
    if is_satisfied(version, target, policy.allow_newer):
        return Status.UP_TO_DATE
    return _progress(target, report_state, report_version)


def _progress(target: Package, report_state: str | None, report_version: str | None) -> Status:
    if report_version is not None and same_version(report_version, target.version):
        if report_state in (ReportState.DOWNLOADING, ReportState.INSTALLING):
            return Status.IN_PROGRESS
        if report_state == ReportState.FAILED:
            return Status.FAILED
    return Status.PENDING


# Staged rollouts (SPEC section 6) ------------------------------------------------------


@dataclass(frozen=True)
class RolloutView:
    """What the decision needs of a type's active rollout."""

    state: RolloutState
    package: Package  # the version V being rolled out
    stable_policy: Policy | None  # the type's policy as it stood at the start
    stable: Package | None  # the stable package: the target of devices not admitted
    wave: Wave  # the highest open wave

    @property
    def version(self) -> str:
        return self.package.version


class Standing(NamedTuple):
    """One device's standing in a rollout.

    ``limited_until``: when a new attempt would exceed ``--max-in-flight`` or
    ``--max-per-hour``, the time a slot is expected to free; None when one is free.
    """

    bucket: int
    trial: bool = False
    held: bool = False
    attempt_open: bool = False
    limited_until: datetime | None = None


def decide_rollout(
    rollout: RolloutView,
    standing: Standing,
    window: Window | None,
    device: DeviceState,
    now: datetime,
) -> Decision:
    """The decision for a device of a type with an active rollout (section 6)."""
    if device.in_call:
        return _IN_CALL
    if at_least(device.version, rollout.version):
        return _UP_TO_DATE
    if admitted(rollout, standing):
        if standing.held:
            return _HELD
        if window is not None and not is_open(window, now, device.tz):
            return Decision(
                reason=Reason.OUTSIDE_WINDOW,
                retry_at=retry_at(window, now, device.serial, device.tz),
            )
        if not standing.attempt_open and standing.limited_until is not None:
            return Decision(
                reason=Reason.RATE_LIMITED,
                retry_at=max(standing.limited_until, now + RATE_LIMIT_RETRY),
            )
        return Decision(package=rollout.package, opens_attempt=not standing.attempt_open)
    stable = decide_for_target(rollout.stable_policy, rollout.stable, window, device, now)
    if stable.reason in (Reason.UP_TO_DATE, Reason.NO_POLICY):
        return _STAGED
    return stable


def admitted(rollout: RolloutView, standing: Standing) -> bool:
    """Whether the rollout runs and one of its open waves covers the device."""
    return rollout.state == RolloutState.RUNNING and covers(
        rollout.wave, bucket=standing.bucket, trial=standing.trial
    )


def rollout_status(
    rollout: RolloutView,
    standing: Standing,
    version: str,
    report_state: str | None,
    report_version: str | None,
    *,
    attempted: bool,
) -> Status:
    """A device's status while a rollout of its type is active (section 6, Statuses).

    ``attempted``: the device has an attempt in this rollout, whatever its state.
    """
    if at_least(version, rollout.version):
        return Status.UP_TO_DATE
    if standing.held:
        return Status.HELD
    if attempted or admitted(rollout, standing):
        return _progress(rollout.package, report_state, report_version)
    status = status_for_target(
        rollout.stable_policy, rollout.stable, version, report_state, report_version
    )
    return Status.WAITING if status in (Status.UP_TO_DATE, Status.NO_POLICY) else status
