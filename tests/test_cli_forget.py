"""endpoint forget through the CLI: named devices or stale ones, all or nothing (SPEC section 8)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from dynupdate.core.registry import Sighting, StatusReport, record_polls, record_reports
from dynupdate.core.times import utc_now


@pytest.fixture
def fleet(home):
    now = utc_now()
    old = now - timedelta(days=40)
    record_polls(
        home.db,
        [
            (Sighting("GS1", "GroupSeries", "6.2.1"), now),
            (Sighting("CAM1", "EagleEyeIV", "1.4", parent_serial="GS1"), now),
            (Sighting("MIC1", "Mic", "1.0", parent_serial="GS1"), now),
            (Sighting("OLD", "GroupSeries", "6.2.1"), old),
            (Sighting("OLD-CAM", "EagleEyeIV", "1.4", parent_serial="OLD"), old),
            (Sighting("REPORTER", "GroupSeries", "6.2.1"), old),  # polled long ago, reports now
        ],
    )
    record_reports(home.db, [(StatusReport("REPORTER", "GroupSeries", "6.2.2", "failed"), now)])


def serials(cli) -> list[str]:
    return [e["serial"] for e in cli.json("endpoint", "list")]


def test_forget_named_devices_with_their_peripherals(cli, fleet):
    result = cli("endpoint", "forget", "GS1")
    assert result.stderr == "Forgot 1 endpoint and 2 peripherals.\n" and result.stdout == ""
    assert serials(cli) == ["OLD", "OLD-CAM", "REPORTER"]
    result = cli("endpoint", "show", "CAM1", code=1)
    assert "CAM1" in result.stderr
    # A peripheral alone: its endpoint stays.
    assert cli("--quiet", "endpoint", "forget", "OLD-CAM").stderr == ""
    assert serials(cli) == ["OLD", "REPORTER"]


def test_forget_stale_counts_reports_too(cli, fleet):
    result = cli("endpoint", "forget", "--stale", "30d")
    assert result.stderr == "Forgot 1 endpoint and 1 peripheral.\n"
    assert serials(cli) == ["CAM1", "GS1", "MIC1", "REPORTER"]
    again = cli("endpoint", "forget", "--stale", "30d")
    assert again.stderr == "Forgot 0 endpoints and 0 peripherals.\n"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["GS1", "NOPE"], "'NOPE'"),
        (["GS1", "--stale", "30d"], "--stale"),
        ([], "--stale"),
        (["--stale", "soon"], "soon"),
        (["[red]x[/red]"], "[red]x[/red]"),  # shown literally, never as markup
    ],
)
def test_a_refused_forget_is_one_line_and_removes_nothing(cli, fleet, args, named):
    before = serials(cli)
    result = cli("endpoint", "forget", *args, code=1)
    assert named in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output
    assert serials(cli) == before


def test_forget_is_in_the_audit_log_and_a_refusal_is_not(cli, home_dir):
    from dynupdate.core.home import open_home
    from dynupdate.core.registry import Sighting, record_polls
    from dynupdate.core.times import utc_now

    home = open_home(home_dir)
    try:
        record_polls(
            home.db,
            [
                (Sighting("EP-1", "Trio", "1"), utc_now()),
                (Sighting("CAM-1", "Cam", "1", parent_serial="EP-1"), utc_now()),
            ],
        )
    finally:
        home.close()
    cli("endpoint", "forget", "EP-1", "NOPE", code=1)
    assert cli.json("log") == []
    cli("endpoint", "forget", "EP-1")
    (entry,) = cli.json("log")
    assert (entry["action"], entry["type"]) == ("endpoint.forget", None)
    assert entry["detail"] == {
        "endpoints": ["EP-1"], "peripherals": ["CAM-1"], "stale": None, "prefix": None
    }
