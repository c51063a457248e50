"""endpoint list/show and overview through the CLI, on a registry filled as polls would."""

from __future__ import annotations

from datetime import timedelta

import pytest

from dynupdate.core.registry import Sighting, StatusReport, record_polls, record_reports
from dynupdate.core.times import utc_now


@pytest.fixture
def fleet(cli, make_file, home):
    cli("package", "add", make_file(b"a"), "--type", "GroupSeries", "--version", "6.2.1")
    cli("package", "add", make_file(b"b"), "--type", "GroupSeries", "--version", "6.2.2")
    cli("policy", "set", "GroupSeries", "--version", "6.2.2")
    now = utc_now()
    record_polls(
        home.db,
        [
            (Sighting("GS1", "GroupSeries", "6.2.1", in_call=True), now),
            (Sighting("CAM1", "EagleEyeIV", "1.4", parent_serial="GS1", in_call=True), now),
            (Sighting("GS2", "GroupSeries", "6.2.2"), now - timedelta(days=2)),
            (Sighting("GS3", "GroupSeries", "6.2.1"), now),
        ],
    )
    record_reports(home.db, [(StatusReport("GS3", "GroupSeries", "6.2.2", "failed", "bad"), now)])


def test_endpoint_list_json_keys_and_types(cli, fleet):
    rows = {e["serial"]: e for e in cli.json("endpoint", "list")}
    assert set(rows) == {"GS1", "CAM1", "GS2", "GS3"}
    gs1 = rows["GS1"]
    assert {
        "serial",
        "type",
        "version",
        "target_version",
        "status",
        "last_poll",
        "in_call",
        "parent_serial",
    } <= set(gs1)
    assert gs1["in_call"] is True and gs1["status"] == "pending"
    assert gs1["target_version"] == "6.2.2" and gs1["last_poll"].endswith("Z")
    assert rows["CAM1"]["parent_serial"] == "GS1" and rows["CAM1"]["target_version"] is None
    assert rows["GS3"]["status"] == "failed"


@pytest.mark.parametrize(
    ("args", "serials"),
    [
        (["--status", "failed"], ["GS3"]),
        (["--status", "up-to-date"], ["GS2"]),
        (["--type", "eagleeyeiv"], ["CAM1"]),
        (["--version", "6.2.1.0"], ["GS1", "GS3"]),
        (["--stale", "1d"], ["GS2"]),
    ],
)
def test_endpoint_list_filters(cli, fleet, args, serials):
    assert [e["serial"] for e in cli.json("endpoint", "list", *args)] == serials


def test_endpoint_show(cli, fleet):
    data = cli.json("endpoint", "show", "GS3")
    assert data["status"] == "failed" and data["report_detail"] == "bad"
    assert data["history"][0]["event"] == "failed"
    assert [p["serial"] for p in cli.json("endpoint", "show", "GS1")["peripherals"]] == ["CAM1"]
    table = cli("endpoint", "show", "GS1").stdout
    assert "CAM1" in table and "History" in table


def test_overview_json(cli, fleet):
    rows = {r["type"]: r for r in cli.json("overview")}
    gs = rows["GroupSeries"]
    assert gs["target_version"] == "6.2.2" and gs["active"] is True
    assert gs["counts"] == {
        "no-policy": 0,
        "up-to-date": 1,
        "pending": 1,
        "in-progress": 0,
        "failed": 1,
        "waiting": 0,
        "held": 0,
    }
    assert rows["EagleEyeIV"]["counts"]["no-policy"] == 1
    assert "GroupSeries" in cli("overview").stdout


def test_bad_filter_values_are_named(cli, fleet):
    assert "'bogus'" in cli("endpoint", "list", "--status", "bogus", code=1).stderr
    assert "'soon'" in cli("endpoint", "list", "--stale", "soon", code=1).stderr
    assert "'NOPE'" in cli("endpoint", "show", "NOPE", code=1).stderr


def test_empty_lists_are_empty_arrays(cli):
    assert cli.json("endpoint", "list") == []
    assert cli.json("overview") == []
    assert cli.json("policy", "list") == []


def test_unexpected_errors_never_show_a_traceback(cli, home, monkeypatch):
    import dynupdate.cli.policy as policy_cli

    def broken(db):
        raise KeyError(0)

    monkeypatch.setattr(policy_cli, "list_policies", broken)
    result = cli("policy", "list", code=1)
    assert "Traceback" not in result.output
    assert "unexpected KeyError" in result.stderr and result.stderr.count("\n") == 1
