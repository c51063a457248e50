"""The endpoint registry: registration, reports, derived status, history, views."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dynupdate.core.endpoints import get_endpoint, list_endpoints, overview
from dynupdate.core.errors import InvalidInput, NotFound
from dynupdate.core.fleet import load_fleet_state
from dynupdate.core.packages import add_package
from dynupdate.core.policies import disable_policy, set_policy
from dynupdate.core.registry import (
    HISTORY_LIMIT,
    Forgotten,
    Sighting,
    StatusReport,
    UnknownDevice,
    forget_endpoints,
    record_polls,
    record_report_groups,
    record_reports,
)

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest.fixture
def fleet_home(home, make_file):
    add_package(home.db, home.store, make_file(b"gs1"), "GroupSeries", "6.2.1")
    add_package(home.db, home.store, make_file(b"gs2"), "GroupSeries", "6.2.2")
    add_package(home.db, home.store, make_file(b"ee"), "EagleEyeIV", "1.4.0")
    return home


def poll(home, serial, version, *, type_="GroupSeries", at=T0, parent=None, offered=None):
    record_polls(
        home.db,
        [
            (
                Sighting(
                    serial,
                    type_,
                    version,
                    model="RP 500",
                    tz="Europe/Berlin",
                    address="127.0.0.1",
                    parent_serial=parent,
                    offered_version=offered,
                ),
                at,
            )
        ],
    )


def status(home, serial):
    return get_endpoint(home.db, load_fleet_state(home.db), serial)["status"]


def test_first_poll_registers_with_keys(fleet_home):
    poll(fleet_home, "8211ABC", "6.2.1")
    poll(fleet_home, "EE4-17", "1.4.0", type_="EagleEyeIV", parent="8211ABC")
    data = get_endpoint(fleet_home.db, load_fleet_state(fleet_home.db), "8211ABC")
    for key in (
        "serial",
        "type",
        "version",
        "target_version",
        "status",
        "last_poll",
        "in_call",
        "parent_serial",
    ):
        assert key in data
    assert data["last_poll"] == "2026-11-27T12:00:00Z"
    assert data["in_call"] is False and data["parent_serial"] is None
    assert [p["serial"] for p in data["peripherals"]] == ["EE4-17"]
    assert data["peripherals"][0]["parent_serial"] == "8211ABC"
    assert [h["event"] for h in data["history"]] == ["first-seen"]


def test_status_follows_policy_without_a_poll(fleet_home):
    poll(fleet_home, "A", "6.2.1")
    assert status(fleet_home, "A") == "no-policy"
    set_policy(fleet_home.db, "GroupSeries", "6.2.2")
    assert status(fleet_home, "A") == "pending"
    set_policy(fleet_home.db, "GroupSeries", "6.2.1")
    assert status(fleet_home, "A") == "up-to-date"
    disable_policy(fleet_home.db, "GroupSeries")
    assert status(fleet_home, "A") == "no-policy"


def test_reports_drive_in_progress_failed_installed(fleet_home):
    set_policy(fleet_home.db, "GroupSeries", "6.2.2")
    poll(fleet_home, "A", "6.2.1", offered="6.2.2")
    for state, expected in [
        ("downloading", "in-progress"),
        ("installing", "in-progress"),
        ("failed", "failed"),
        ("installed", "up-to-date"),
    ]:
        record_reports(
            fleet_home.db,
            [
                (
                    StatusReport(
                        "A",
                        "GroupSeries",
                        "6.2.2",
                        state,
                        "disk full" if state == "failed" else None,
                    ),
                    T0,
                )
            ],
        )
        assert status(fleet_home, "A") == expected
    data = get_endpoint(fleet_home.db, load_fleet_state(fleet_home.db), "A")
    assert data["version"] == "6.2.2"
    events = [h["event"] for h in data["history"]]
    assert events[:2] == ["installed", "failed"] and "offered" in events
    assert any(h["detail"] == "disk full" for h in data["history"])


def test_failed_for_another_version_is_pending_for_new_target(fleet_home):
    set_policy(fleet_home.db, "GroupSeries", "6.2.2")
    poll(fleet_home, "A", "6.2.1")
    record_reports(fleet_home.db, [(StatusReport("A", "GroupSeries", "6.2.9", "failed"), T0)])
    assert status(fleet_home, "A") == "pending"


def table(home) -> list[tuple]:
    """Every row of both endpoint tables: what a refused write must leave as it was."""
    return home.db.execute("SELECT * FROM endpoints ORDER BY serial").fetchall() + (
        home.db.execute("SELECT * FROM endpoint_history ORDER BY id").fetchall()
    )


def test_a_report_registers_nobody(fleet_home):
    poll(fleet_home, "KNOWN", "6.2.1")
    before = table(fleet_home)
    with pytest.raises(UnknownDevice, match="'NEW'") as refused:
        record_reports(
            fleet_home.db, [(StatusReport("NEW", "GroupSeries", "6.2.2", "installed"), T0)]
        )
    assert refused.value.serials == ("NEW",)
    # A known device beside an unknown one: nothing of the report is stored.
    mixed = [
        (StatusReport("KNOWN", "GroupSeries", "6.2.2", "installed"), T0),
        (StatusReport("NEW", "GroupSeries", "6.2.2", "failed", "x" * 2000), T0),
    ]
    with pytest.raises(UnknownDevice, match="'NEW'"):
        record_reports(fleet_home.db, mixed)
    assert table(fleet_home) == before


def test_grouped_reports_are_each_all_or_nothing(fleet_home):
    poll(fleet_home, "A", "6.2.1")
    poll(fleet_home, "B", "6.2.1")
    outcomes = record_report_groups(
        fleet_home.db,
        [
            [(StatusReport("A", "GroupSeries", "6.2.2", "downloading"), T0)],
            [
                (StatusReport("B", "GroupSeries", "6.2.2", "downloading"), T0),
                (StatusReport("GHOST", "GroupSeries", "6.2.2", "downloading"), T0),
            ],
            [(StatusReport("B", "GroupSeries", "6.2.2", "installing"), T0)],
        ],
    )
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], UnknownDevice) and outcomes[1].serials == ("GHOST",)
    fleet = load_fleet_state(fleet_home.db)
    assert get_endpoint(fleet_home.db, fleet, "A")["report_state"] == "downloading"
    assert get_endpoint(fleet_home.db, fleet, "B")["report_state"] == "installing"
    events = [h["event"] for h in get_endpoint(fleet_home.db, fleet, "B")["history"]]
    assert events == ["installing", "first-seen"]  # the refused "downloading" left nothing


def test_history_is_bounded_and_not_one_row_per_poll(fleet_home):
    for i in range(10):
        poll(fleet_home, "A", "6.2.1", at=T0 + timedelta(minutes=i))
    count = fleet_home.db.execute("SELECT count(*) FROM endpoint_history").fetchone()[0]
    assert count == 1
    for _ in range(HISTORY_LIMIT * 2):
        record_reports(
            fleet_home.db, [(StatusReport("A", "GroupSeries", "6.2.2", "downloading"), T0)]
        )
    count = fleet_home.db.execute("SELECT count(*) FROM endpoint_history").fetchone()[0]
    assert count == HISTORY_LIMIT


def test_list_filters(fleet_home):
    set_policy(fleet_home.db, "GroupSeries", "6.2.2")
    poll(fleet_home, "A", "6.2.1", at=T0)
    poll(fleet_home, "B", "6.2.2", at=T0 - timedelta(days=3))
    poll(fleet_home, "C", "1.4.0", type_="EagleEyeIV")
    fleet = load_fleet_state(fleet_home.db)

    def serials(**kw):
        return [e["serial"] for e in list_endpoints(fleet_home.db, fleet, now=T0, **kw)]

    assert serials() == ["A", "B", "C"]
    assert serials(type_="groupseries") == ["A", "B"]
    assert serials(status="pending") == ["A"]
    assert serials(status="no-policy") == ["C"]
    assert serials(version="6.2.2.0") == ["B"]
    assert serials(stale=timedelta(days=1)) == ["B"]
    with pytest.raises(InvalidInput, match="bogus"):
        serials(status="bogus")


def test_overview_counts_and_spread(fleet_home):
    set_policy(fleet_home.db, "GroupSeries", "6.2.2")
    for i in range(3):
        poll(fleet_home, f"old{i}", "6.2.1")
    poll(fleet_home, "new", "6.2.2")
    poll(fleet_home, "x", "0.1", type_="Unmanaged")
    rows = {r["type"]: r for r in overview(fleet_home.db, load_fleet_state(fleet_home.db))}
    gs = rows["GroupSeries"]
    assert gs["endpoints"] == 4 and gs["counts"]["pending"] == 3
    assert gs["counts"]["up-to-date"] == 1 and gs["on_target_percent"] == 25.0
    assert gs["versions"] == [{"version": "6.2.2", "count": 1}, {"version": "6.2.1", "count": 3}]
    assert rows["EagleEyeIV"]["endpoints"] == 0
    assert rows["Unmanaged"]["counts"]["no-policy"] == 1
    # No target, no share: not "0 % on target", which would read as a stalled rollout.
    assert rows["Unmanaged"]["on_target_percent"] is None


def test_unknown_serial(fleet_home):
    with pytest.raises(NotFound, match="NOPE"):
        get_endpoint(fleet_home.db, load_fleet_state(fleet_home.db), "NOPE")


def test_forget_removes_devices_their_peripherals_and_history(fleet_home):
    poll(fleet_home, "EP1", "6.2.1")
    poll(fleet_home, "CAM1", "1.4.0", type_="EagleEyeIV", parent="EP1")
    poll(fleet_home, "EP2", "6.2.1")
    poll(fleet_home, "CAM2", "1.4.0", type_="EagleEyeIV", parent="EP2")
    record_reports(fleet_home.db, [(StatusReport("CAM1", "EagleEyeIV", "1.4.1", "failed"), T0)])
    assert forget_endpoints(fleet_home.db, ["EP1", "CAM2"]) == Forgotten(("EP1",), ("CAM1", "CAM2"))
    left = fleet_home.db.execute("SELECT serial FROM endpoints").fetchall()
    assert left == [("EP2",)]
    history = fleet_home.db.execute("SELECT DISTINCT serial FROM endpoint_history").fetchall()
    assert history == [("EP2",)]


def test_forget_an_unknown_serial_removes_nothing(fleet_home):
    poll(fleet_home, "EP1", "6.2.1")
    poll(fleet_home, "CAM1", "1.4.0", type_="EagleEyeIV", parent="EP1")
    before = table(fleet_home)
    with pytest.raises(NotFound, match="'NOPE'"):
        forget_endpoints(fleet_home.db, ["EP1", "NOPE"])
    assert table(fleet_home) == before
    with pytest.raises(InvalidInput):
        forget_endpoints(fleet_home.db, ["EP1"], stale=timedelta(days=1), now=T0)
    with pytest.raises(InvalidInput):
        forget_endpoints(fleet_home.db)
    assert table(fleet_home) == before


def test_forget_stale_counts_polls_and_reports(fleet_home):
    old = T0 - timedelta(days=10)
    poll(fleet_home, "SILENT", "6.2.1", at=old)
    poll(fleet_home, "SILENT-CAM", "1.4.0", type_="EagleEyeIV", parent="SILENT", at=old)
    poll(fleet_home, "REPORTS", "6.2.1", at=old)  # polled long ago, reported lately
    record_reports(fleet_home.db, [(StatusReport("REPORTS", "GroupSeries", "6.2.2", "failed"), T0)])
    poll(fleet_home, "POLLS", "6.2.1", at=T0 - timedelta(days=1))
    # A peripheral that polled lately goes with its silent endpoint.
    poll(fleet_home, "OLD-EP", "6.2.1", at=old)
    poll(fleet_home, "NEW-CAM", "1.4.0", type_="EagleEyeIV", parent="OLD-EP", at=T0)
    gone = forget_endpoints(fleet_home.db, stale=timedelta(days=7), now=T0)
    assert gone == Forgotten(("OLD-EP", "SILENT"), ("NEW-CAM", "SILENT-CAM"))
    left = fleet_home.db.execute("SELECT serial FROM endpoints ORDER BY serial").fetchall()
    assert left == [("POLLS",), ("REPORTS",)]
    assert forget_endpoints(fleet_home.db, stale=timedelta(days=7), now=T0) == Forgotten((), ())
