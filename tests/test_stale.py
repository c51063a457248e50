"""Devices that stopped polling (SPEC section 8): --stale, on-target without them, forget --prefix.

The fleet is recorded as the server records it (``record_polls``,
``record_reports`` on a temp home, at chosen times); what an admin or a cron
job sees is read through the CLI.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from dynupdate.core.packages import add_package
from dynupdate.core.policies import set_policy
from dynupdate.core.registry import Sighting, StatusReport, record_polls, record_reports
from dynupdate.core.times import parse_utc, utc_now


@pytest.fixture
def fleet(home, make_file):
    """Trio 7.1: 6 devices heard from today (3 on it), 4 retired 40 days ago (1 on it), and
    one that polled 40 days ago but reported today."""
    add_package(home.db, home.store, make_file(b"7.1"), "Trio", "7.1")
    set_policy(home.db, "Trio", "7.1")
    now = utc_now()
    old = now - timedelta(days=40)
    record_polls(
        home.db,
        [(Sighting(f"LIVE{i}", "Trio", "7.1" if i < 3 else "7.0"), now) for i in range(6)]
        + [(Sighting(f"GONE{i}", "Trio", "7.1" if i == 0 else "7.0"), old) for i in range(4)]
        + [(Sighting("GONE-CAM", "Cam", "1.0", parent_serial="GONE1"), old)]
        + [(Sighting("REPORTER", "Trio", "7.0"), old)],
    )
    record_reports(home.db, [(StatusReport("REPORTER", "Trio", "7.1", "downloading"), now)])


def test_endpoint_list_stale_counts_reports_as_heard_from(cli, fleet):
    stale = [e["serial"] for e in cli.json("endpoint", "list", "--stale", "30d")]
    assert stale == ["GONE-CAM", "GONE0", "GONE1", "GONE2", "GONE3"]


def test_overview_leaves_silent_devices_out_of_on_target_and_says_which(cli, fleet):
    before = utc_now().replace(microsecond=0)
    [trio] = [row for row in cli.json("overview") if row["type"] == "Trio"]
    after = utc_now()
    assert trio["endpoints"] == 11, "every device is counted by status"
    assert trio["counts"]["up-to-date"] == 4
    # 3 of the 7 heard from within 7 days (REPORTER among them), not 4 of 11.
    assert trio["on_target_percent"] == round(100 * 3 / 7, 1)
    left = trio["left_out"]
    assert left["devices"] == 4 and left["silent_after"] == "7d"
    since = parse_utc(left["not_heard_from_since"])
    assert before - timedelta(days=7) <= since <= after - timedelta(days=7)
    table = " ".join(cli("overview").stdout.split())
    assert "On target leaves out 5 devices not heard from for 7d (Cam 1, Trio 4)" in table
    assert "dynupdate endpoint list --stale 7d" in table


def test_silent_after_is_an_option_and_0_counts_every_device(cli, fleet):
    [trio] = [r for r in cli.json("overview", "--silent-after", "0") if r["type"] == "Trio"]
    assert trio["on_target_percent"] == round(100 * 4 / 11, 1) and trio["left_out"] is None
    [trio] = [r for r in cli.json("overview", "--silent-after", "60d") if r["type"] == "Trio"]
    assert trio["on_target_percent"] == round(100 * 4 / 11, 1)
    assert trio["left_out"]["devices"] == 0
    assert "leaves out" not in cli("overview", "--silent-after", "60d").stdout
    result = cli("overview", "--silent-after", "soon", code=1)
    assert "soon" in result.stderr and "Traceback" not in result.output


def test_overview_stale_shows_only_silent_devices(cli, fleet):
    rows = {row["type"]: row for row in cli.json("overview", "--stale", "30d")}
    trio = rows["Trio"]
    assert trio["endpoints"] == 4 and trio["counts"]["up-to-date"] == 1
    assert trio["on_target_percent"] == 25.0 and trio["left_out"] is None
    assert rows["Cam"]["endpoints"] == 1
    [only] = cli.json("overview", "--stale", "30d", "--type", "trio")
    assert only["type"] == "Trio" and only["endpoints"] == 4


def test_a_type_whose_every_device_is_silent_has_no_share(cli, home, fleet, make_file):
    record_polls(home.db, [(Sighting("OLD-VVX", "VVX", "1"), utc_now() - timedelta(days=9))])
    add_package(home.db, home.store, make_file(b"vvx"), "VVX", "2")
    set_policy(home.db, "VVX", "2")
    [vvx] = cli.json("overview", "--type", "VVX")
    assert vvx["on_target_percent"] is None and vvx["left_out"]["devices"] == 1


# --- forget --prefix ---------------------------------------------------------------------


@pytest.fixture
def rehearsal(home):
    now = utc_now()
    record_polls(
        home.db,
        [
            (Sighting("SIM001", "Trio", "7.0"), now),
            (Sighting("SIM001-P1", "Cam", "1.0", parent_serial="SIM001"), now),
            (Sighting("SIM002", "Trio", "7.0"), now - timedelta(days=3)),
            (Sighting("sim003", "Trio", "7.0"), now),  # another case: another prefix
            (Sighting("REAL", "Trio", "7.0"), now),
            (Sighting("SIM%", "Trio", "7.0"), now),
        ],
    )


def serials(cli) -> list[str]:
    return [e["serial"] for e in cli.json("endpoint", "list")]


def test_forget_prefix_removes_a_rehearsals_serials(cli, rehearsal):
    result = cli("endpoint", "forget", "--prefix", "SIM0")
    assert result.stderr == "Forgot 2 endpoints and 1 peripheral.\n"
    assert serials(cli) == ["REAL", "SIM%", "sim003"]
    (entry,) = cli.json("log")
    assert entry["action"] == "endpoint.forget"
    assert entry["detail"] == {"endpoints": ["SIM001", "SIM002"], "peripherals": ["SIM001-P1"],
                               "stale": None, "prefix": "SIM0"}  # fmt: skip


def test_forget_prefix_is_literal_and_combines_with_stale(cli, rehearsal):
    assert cli("endpoint", "forget", "--prefix", "SIM", "--stale", "2d").stderr.startswith(
        "Forgot 1 endpoint "
    )
    assert "SIM002" not in serials(cli)
    cli("endpoint", "forget", "--prefix", "SIM%")  # % and _ are no wildcards
    assert serials(cli) == ["REAL", "SIM001", "SIM001-P1", "sim003"]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--prefix", ""], "--prefix"),
        (["REAL", "--prefix", "SIM"], "--prefix"),
    ],
)
def test_a_refused_forget_prefix_removes_nothing(cli, rehearsal, args, named):
    before = serials(cli)
    result = cli("endpoint", "forget", *args, code=1)
    assert named in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert serials(cli) == before and cli.json("log") == []
