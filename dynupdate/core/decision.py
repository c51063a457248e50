"""The update decision (SPEC section 2, a contract): pure, so it tests as a table.

For a device of type T running version C at time *now*:

1. no policy for T, or its version to use unset → ``no-policy``;
2. the device is in a call → ``in-call``;
3. target: allow-newer off → the version to use exactly (downgrades too);
   on → the newest package of T whose version ≥ the version to use;
4. C is the target, or allow-newer is on and C ≥ target → ``up-to-date``;
5. a window is set and *now* is outside it → ``outside-window`` + ``retry_at``;
6. otherwise → update to the target package.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from dynupdate.core.versions import same_version, version_key
from dynupdate.core.windows import Window, is_open, retry_at

if TYPE_CHECKING:  # a leaf: packages (and the database) build on the decision, not under it
    from dynupdate.core.packages import Package

__all__ = [
    "Decision",
    "DeviceState",
    "Policy",
    "decide",
    "decide_for_target",
    "is_satisfied",
    "target_package",
]

NO_POLICY = "no-policy"
IN_CALL = "in-call"
UP_TO_DATE = "up-to-date"
OUTSIDE_WINDOW = "outside-window"


@dataclass(frozen=True)
class Policy:
    type: str
    version_to_use: str | None
    allow_newer: bool


@dataclass(frozen=True)
class DeviceState:
    serial: str
    type: str
    version: str
    in_call: bool = False
    tz: str | None = None


@dataclass(frozen=True)
class Decision:
    """``package`` is set when the device should update; ``reason`` otherwise."""

    package: Package | None = None
    reason: str | None = None
    retry_at: datetime | None = None

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
    eligible = [p for p in packages if version_key(p.version) >= floor]
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
        return version_key(version) >= version_key(target.version)
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
    >>> decide(None, [gs], None, device, now).reason
    'no-policy'
    >>> in_a_call = DeviceState("8211ABC", "GroupSeries", "6.2.1", in_call=True)
    >>> decide(policy, [gs], None, in_a_call, now).reason
    'in-call'
    """
    return decide_for_target(policy, target_package(policy, packages), window, device, now)


# Decisions are immutable: the ones without a package or a time are shared.
_NO_POLICY = Decision(reason=NO_POLICY)
_IN_CALL = Decision(reason=IN_CALL)
_UP_TO_DATE = Decision(reason=UP_TO_DATE)


def decide_for_target(
    policy: Policy | None,
    target: Package | None,
    window: Window | None,
    device: DeviceState,
    now: datetime,
) -> Decision:
    """:func:`decide` with the target already known: ``target_package(policy, packages)``."""
    if target is None:
        return _NO_POLICY
    if device.in_call:
        return _IN_CALL
    if is_satisfied(device.version, target, policy.allow_newer):
        return _UP_TO_DATE
    if window is not None and not is_open(window, now, device.tz):
        return Decision(
            reason=OUTSIDE_WINDOW, retry_at=retry_at(window, now, device.serial, device.tz)
        )
    return Decision(package=target)
