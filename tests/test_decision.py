"""The update decision as a table (SPEC section 2)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dynupdate.core.decision import DeviceState, Policy, decide, target_package
from dynupdate.core.packages import Package
from dynupdate.core.windows import make_window


def pkg(version: str, type_: str = "GroupSeries") -> Package:
    return Package(
        type_,
        version,
        f"{version}.pup",
        100,
        version.ljust(64, "0")[:64].lower(),
        None,
        "2026-11-01T00:00:00Z",
    )


PACKAGES = [pkg("6.2.0"), pkg("6.2.1.1-600021"), pkg("6.2.2.0-100"), pkg("6.10.0")]
NOW = datetime(2026, 11, 27, 16, 0, tzinfo=UTC)  # a Friday
EXACT = Policy("GroupSeries", "6.2.2.0-100", allow_newer=False)
NEWER = Policy("GroupSeries", "6.2.1.1-600021", allow_newer=True)
OPEN = make_window("fri", "15:00", "2h", "UTC")
CLOSED = make_window("fri", "22:00", "4h", "UTC")


def device(version: str, in_call: bool = False, tz: str | None = None) -> DeviceState:
    return DeviceState("8211ABC", "GroupSeries", version, in_call, tz)


@pytest.mark.parametrize(
    ("policy", "window", "state", "update_to", "reason"),
    [
        # 1. no policy, or version to use unset
        (None, None, device("6.2.0"), None, "no-policy"),
        (Policy("GroupSeries", None, True), None, device("6.2.0"), None, "no-policy"),
        (None, CLOSED, device("6.2.0", in_call=True), None, "no-policy"),
        # 2. in a call, before anything else
        (EXACT, None, device("6.2.0", in_call=True), None, "in-call"),
        (EXACT, None, device("6.2.2.0-100", in_call=True), None, "in-call"),
        (EXACT, CLOSED, device("6.2.0", in_call=True), None, "in-call"),
        # 3./6. exact: any other version gets the target, downgrades included
        (EXACT, None, device("6.2.0"), "6.2.2.0-100", None),
        (EXACT, None, device("6.10.0"), "6.2.2.0-100", None),
        (EXACT, None, device("7.0.0"), "6.2.2.0-100", None),
        (EXACT, None, device("5.2.0.PVR"), "6.2.2.0-100", None),
        # 4. exact: on target
        (EXACT, None, device("6.2.2.0-100"), None, "up-to-date"),
        # 3. allow-newer: newest package >= version to use, never a downgrade
        (NEWER, None, device("6.2.0"), "6.10.0", None),
        (NEWER, None, device("6.2.2.0-100"), "6.10.0", None),
        (NEWER, None, device("6.10.0"), None, "up-to-date"),
        (NEWER, None, device("6.10"), None, "up-to-date"),
        (NEWER, None, device("7.0.0"), None, "up-to-date"),
        # 5. window: closed → outside-window; open → update; up-to-date wins over window
        (EXACT, CLOSED, device("6.2.0"), None, "outside-window"),
        (EXACT, OPEN, device("6.2.0"), "6.2.2.0-100", None),
        (EXACT, CLOSED, device("6.2.2.0-100"), None, "up-to-date"),
        (NEWER, CLOSED, device("7.0"), None, "up-to-date"),
    ],
)
def test_decision_table(policy, window, state, update_to, reason):
    decision = decide(policy, PACKAGES, window, state, NOW)
    if update_to is None:
        assert decision.package is None
        assert decision.reason == reason
    else:
        assert decision.update and decision.package.version == update_to
        assert decision.reason is None


def test_same_version_spelled_differently_is_up_to_date():
    policy = Policy("GroupSeries", "6.2.0", allow_newer=False)
    assert decide(policy, PACKAGES, None, device("6.2"), NOW).reason == "up-to-date"


def test_outside_window_gives_retry_at_inside_first_half_of_next_opening():
    decision = decide(EXACT, PACKAGES, CLOSED, device("6.2.0"), NOW)
    opening = datetime(2026, 11, 27, 22, 0, tzinfo=UTC)
    assert opening <= decision.retry_at < opening + timedelta(hours=2)
    assert decision.retry_at.tzinfo is not None


def test_retry_at_is_stable_per_serial_and_spread_across_serials():
    times = set()
    for n in range(200):
        state = DeviceState(f"SN{n:05}", "GroupSeries", "6.2.0")
        first = decide(EXACT, PACKAGES, CLOSED, state, NOW).retry_at
        assert decide(EXACT, PACKAGES, CLOSED, state, NOW + timedelta(minutes=5)).retry_at == first
        times.add(first)
    assert len(times) > 150


def test_endpoint_clock_window_uses_device_tz():
    window = make_window("fri", "17:00", "1h", "endpoint")
    # 16:00 UTC is 17:00 in Berlin (open) and 16:00 on a device with no zone (closed).
    berlin = decide(EXACT, PACKAGES, window, device("6.2.0", tz="Europe/Berlin"), NOW)
    assert berlin.update
    nozone = decide(EXACT, PACKAGES, window, device("6.2.0"), NOW)
    assert nozone.reason == "outside-window"
    assert (
        nozone.retry_at
        == decide(EXACT, PACKAGES, window, device("6.2.0", tz="Bogus/Zone"), NOW).retry_at
    )


def test_target_package_exact_missing_package_is_inactive():
    assert target_package(Policy("GroupSeries", "9.9", False), PACKAGES) is None
    assert (
        decide(Policy("GroupSeries", "9.9", False), PACKAGES, None, device("1"), NOW).reason
        == "no-policy"
    )


def test_allow_newer_with_only_older_packages_after_floor():
    policy = Policy("GroupSeries", "6.2.2.0-100", allow_newer=True)
    assert target_package(policy, PACKAGES).version == "6.10.0"
    assert target_package(policy, PACKAGES[:3]).version == "6.2.2.0-100"
