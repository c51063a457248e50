"""Why a device waits: its last answer (last_reason, retry_at), endpoint show, overview.

What the server records is checked over real HTTPS; the three write paths of
``record_polls`` (refresh, reason changed, full) and the overview's counts of
devices waiting for the window on a temp home through core and the CLI.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from dynupdate.cli import app
from dynupdate.core.endpoints import get_endpoint
from dynupdate.core.fleet import load_fleet_state
from dynupdate.core.gates import RolloutOptions
from dynupdate.core.maintenance import save_window
from dynupdate.core.overview import overview
from dynupdate.core.packages import add_package
from dynupdate.core.policies import set_policy
from dynupdate.core.registry import Sighting, StatusReport, record_polls, record_reports
from dynupdate.core.rollouts import start_rollout
from dynupdate.core.times import format_utc, parse_utc, utc_now
from dynupdate.core.vocabulary import RolloutState
from dynupdate.core.waves import bucket, parse_waves
from dynupdate.core.windows import make_window

NOW = datetime.now(UTC).replace(microsecond=0)


def admin(home, *args: str, code: int = 0):
    result = CliRunner().invoke(app, ["--home", str(home), *map(str, args)])
    assert result.exit_code == code, result.output
    return result


def admin_json(home, *args: str):
    return json.loads(admin(home, *args, "--json").stdout)


def answer(db, serial: str) -> tuple[str | None, str | None]:
    row = db.execute("SELECT last_reason, retry_at FROM endpoints WHERE serial = ?", (serial,))
    return tuple(row.fetchone())


# --- what record_polls stores ----------------------------------------------------------


def test_every_write_path_stores_the_last_answer(home):
    retry = NOW + timedelta(hours=5)
    seen = Sighting("A", "Trio", "7.0", reason="outside-window", retry_at=retry)
    record_polls(home.db, [(seen, NOW)])  # first poll: the INSERT
    assert answer(home.db, "A") == ("outside-window", format_utc(retry))

    later = retry + timedelta(days=1)  # the same reason, another opening: the refresh
    record_polls(home.db, [(Sighting("A", "Trio", "7.0", reason="outside-window",
                                     retry_at=later), NOW)])  # fmt: skip
    assert answer(home.db, "A") == ("outside-window", format_utc(later))

    record_polls(home.db, [(Sighting("A", "Trio", "7.0", reason="in-call"), NOW)])
    assert answer(home.db, "A") == ("in-call", None), "another reason is not left behind"

    offered = Sighting("A", "Trio", "7.0", offered_version="7.1", reason="update")
    record_polls(home.db, [(offered, NOW)])  # a new offer: the full path, with its event
    assert answer(home.db, "A") == ("update", None)

    record_polls(home.db, [(Sighting("A", "Trio", "7.1", reason="up-to-date"), NOW)])
    assert answer(home.db, "A") == ("up-to-date", None)


def test_a_chunk_of_refreshes_with_one_changed_reason(home):
    """The grouped UPDATE misses the changed one; the others are written once, in order."""
    serials = [f"S{i:03d}" for i in range(100)]
    record_polls(home.db, [(Sighting(s, "Trio", "7.0", reason="up-to-date"), NOW) for s in serials])
    again = [
        (Sighting(s, "Trio", "7.0", reason="in-call" if s == "S050" else "up-to-date"), NOW)
        for s in serials
    ]
    record_polls(home.db, again)
    reasons = dict(home.db.execute("SELECT serial, last_reason FROM endpoints").fetchall())
    assert reasons.pop("S050") == "in-call"
    assert set(reasons.values()) == {"up-to-date"}


def test_an_older_database_has_no_answer_until_the_next_poll(home):
    record_polls(home.db, [(Sighting("OLD", "Trio", "7.0"), NOW)])  # as a bench writes
    assert answer(home.db, "OLD") == (None, None)
    data = get_endpoint(home.db, load_fleet_state(home.db), "OLD")
    assert (data["last_reason"], data["retry_at"]) == (None, None)
    record_polls(home.db, [(Sighting("OLD", "Trio", "7.0", reason="no-policy"), NOW)])
    assert answer(home.db, "OLD") == ("no-policy", None)


# --- over HTTPS -------------------------------------------------------------------------


POLL = (
    '<poll protocol="1"><endpoint serial="{serial}" type="{type}" version="{version}"'
    ' in-call="{in_call}" tz="Europe/Berlin"/></poll>'
)


def poll(server, serial, type_, version, in_call="false"):
    from lxml import etree

    body = POLL.format(serial=serial, type=type_, version=version, in_call=in_call)
    status, _, data = server.request("POST", "/poll", body)
    assert status == 200, data
    [child] = etree.fromstring(data)
    return child


def written(server):
    """Wait until every poll sent so far is written: a report is stored only after them."""
    body = (
        '<report protocol="1"><device serial="BARRIER" type="Barrier" version="1"'
        ' state="downloading"/></report>'
    )
    status, _, data = server.request("POST", "/report", body)
    assert status == 200, data


def test_a_device_outside_the_window_says_so_in_endpoint_show_and_overview(
    start_server, tmp_path
):
    home = tmp_path / "server"
    server = start_server(home, "--no-access-log")
    package = tmp_path / "win.pup"
    package.write_bytes(b"win 2.0" * 100)
    admin(home, "package", "add", package, "--type", "Win", "--version", "2.0")
    admin(home, "policy", "set", "Win", "--version", "2.0")
    start = (datetime.now(UTC) + timedelta(hours=3)).strftime("%H:%M")
    admin(home, "window", "set", "--start", start, "--duration", "1h")
    poll(server, "BARRIER", "Barrier", "1")

    child = poll(server, "W1", "Win", "1.0")
    assert child.get("reason") == "outside-window"
    written(server)

    data = admin_json(home, "endpoint", "show", "W1")
    assert data["last_reason"] == "outside-window"
    assert data["retry_at"] == child.get("retryAt"), "the retryAt it was given, as given"
    opening = admin_json(home, "window", "show")["next_opening"]["start"]
    shown = parse_utc(opening).strftime("%Y-%m-%d %H:%M UTC")
    table = admin(home, "endpoint", "show", "W1").stdout
    assert f"waiting for the maintenance window: next opening {shown}" in table
    assert parse_utc(child.get("retryAt")).strftime("%Y-%m-%d %H:%M UTC") in table

    [row] = [r for r in admin_json(home, "overview") if r["type"] == "Win"]
    assert row["counts"]["pending"] == 1 and row["pending_for_window"] == 1
    assert row["window_open"] is False and row["window_next_opening"] == opening
    table = admin(home, "overview").stdout
    assert "Pending for window" in table
    assert f"closed; next opening {shown}" in " ".join(table.split())

    # In a call, then offered once the window opens: each answer replaces the last.
    poll(server, "W1", "Win", "1.0", in_call="true")
    written(server)
    data = admin_json(home, "endpoint", "show", "W1")
    assert (data["last_reason"], data["retry_at"]) == ("in-call", None)
    assert admin_json(home, "overview", "--type", "Win")[0]["pending_for_window"] == 0

    opened = (datetime.now(UTC) - timedelta(minutes=30)).strftime("%H:%M")
    admin(home, "window", "set", "--start", opened, "--duration", "2h")
    assert poll(server, "W1", "Win", "1.0").tag == "update"
    written(server)
    data = admin_json(home, "endpoint", "show", "W1")
    assert (data["last_reason"], data["retry_at"]) == ("update", None)
    assert "update: offered 2.0 at its last poll" in admin(home, "endpoint", "show", "W1").stdout
    [row] = admin_json(home, "overview", "--type", "win")
    assert row["window_open"] is True and row["pending_for_window"] == 0
    server.assert_no_traceback()


# --- overview: who waits for the window ------------------------------------------------


def test_overview_counts_only_pending_devices_told_outside_window(home, make_file):
    add_package(home.db, home.store, make_file(b"7.1"), "Trio", "7.1")
    set_policy(home.db, "Trio", "7.1")
    save_window(home.db, make_window(None, "02:00", "1h", "UTC"))
    later = NOW + timedelta(hours=20)
    record_polls(
        home.db,
        [
            (Sighting("WAIT1", "Trio", "7.0", reason="outside-window", retry_at=later), NOW),
            (Sighting("WAIT2", "Trio", "7.0", reason="outside-window", retry_at=later), NOW),
            (Sighting("CALL", "Trio", "7.0", reason="in-call"), NOW),
            (Sighting("DONE", "Trio", "7.1", reason="up-to-date"), NOW),
            (Sighting("LATE", "Trio", "7.0", reason="outside-window", retry_at=later), NOW),
        ],
    )
    # Told to wait, then downloading: in progress, no longer waiting for the window.
    record_reports(home.db, [(StatusReport("LATE", "Trio", "7.1", "downloading"), NOW)])
    [row] = overview(home.db, load_fleet_state(home.db), now=utc_now())
    assert row["counts"]["pending"] == 3 and row["counts"]["in-progress"] == 1
    assert row["pending_for_window"] == 2


def test_the_waiting_count_reads_the_partial_index(home):
    """Without a table scan: the condition is spelt as the index's, or SQLite reads the table."""
    from dynupdate.core.overview import _TOLD_OUTSIDE_WINDOW

    plan = home.db.execute(
        "EXPLAIN QUERY PLAN SELECT type_key, version, report_state, report_version, count(*)"
        f" FROM endpoints e WHERE {_TOLD_OUTSIDE_WINDOW}"
        " GROUP BY type_key, version, report_state, report_version"
    ).fetchall()
    assert any("endpoints_window" in step[-1] for step in plan), plan


def test_overview_waiting_during_a_rollout_counts_admitted_devices(home, make_file):
    """A device of the first wave told outside-window is pending, not waiting for its wave."""
    add_package(home.db, home.store, make_file(b"6.2.1"), "GroupSeries", "6.2.1")
    set_policy(home.db, "GroupSeries", "6.2.1")
    add_package(home.db, home.store, make_file(b"6.3"), "GroupSeries", "6.3")
    options = RolloutOptions(waves=parse_waves("10%,100%"), max_failures=1000)
    rollout = start_rollout(home.db, "GroupSeries", "6.3", options)
    assert rollout.state == RolloutState.RUNNING
    save_window(home.db, make_window(None, "02:00", "1h", "UTC"))
    inside = next(f"IN{n}" for n in range(10_000) if bucket(f"IN{n}") < 1000)
    outside = next(f"OUT{n}" for n in range(10_000) if bucket(f"OUT{n}") >= 1000)
    later = NOW + timedelta(hours=20)
    record_polls(
        home.db,
        [
            (Sighting(inside, "GroupSeries", "6.2.1", reason="outside-window", retry_at=later),
             NOW),
            (Sighting(outside, "GroupSeries", "6.2.1", reason="staged"), NOW),
        ],
    )  # fmt: skip
    [row] = overview(home.db, load_fleet_state(home.db), now=utc_now())
    assert row["counts"]["pending"] == 1 and row["counts"]["waiting"] == 1
    assert row["pending_for_window"] == 1


@pytest.mark.parametrize(
    ("reason", "retry", "status", "words"),
    [
        ("in-call", None, "pending", "in-call: the update waits for its first poll out of"),
        ("staged", None, "waiting", "staged: the rollout has not opened its wave"),
        ("up-to-date", None, "up-to-date", "up-to-date: nothing to install"),
        ("rate-limited", "+1h", "pending", "rate-limited: the rollout's --max-in-flight"),
        ("held", None, "held", "held: its attempts are used up: dynupdate endpoint retry X1"),
        ("no-policy", None, "no-policy", "no-policy: its type has no active policy"),
        ("outside-window", "-1h", "pending", "not heard from since"),
        ("outside-window", None, "up-to-date", "up to date now: nothing to wait for"),
        (None, None, "pending", "none recorded"),
    ],
)
def test_every_answer_in_words(reason, retry, status, words):
    from dynupdate.cli.endpoint import answer_in_words

    now = datetime(2026, 12, 2, 12, tzinfo=UTC)
    at = None
    if retry is not None:
        at = format_utc(now + (timedelta(hours=1) if retry == "+1h" else -timedelta(hours=1)))
    device = {"serial": "X1", "status": status, "tz": None, "offered_version": None,
              "last_reason": reason, "retry_at": at}  # fmt: skip
    window = make_window(None, "22:00", "4h", "UTC")
    assert words in answer_in_words(device, window, now)


def test_the_words_follow_the_window_on_the_devices_clock(home):
    """With --tz endpoint, the next opening is the device's, from its tz."""
    from dynupdate.cli.endpoint import answer_in_words

    window = make_window(None, "22:00", "1h", "endpoint")
    now = datetime(2026, 12, 2, 12, tzinfo=UTC)
    device = {"serial": "X", "status": "pending", "tz": "Asia/Tokyo", "offered_version": None,
              "last_reason": "outside-window", "retry_at": "2026-12-02T13:10:00Z"}  # fmt: skip
    assert "next opening 2026-12-02 13:00 UTC" in answer_in_words(device, window, now)


def test_window_view_is_the_same_in_window_show_and_overview(home, make_file):
    add_package(home.db, home.store, make_file(b"7.1"), "Trio", "7.1")
    runner = CliRunner()
    shown = json.loads(runner.invoke(app, ["window", "set", "--start", "02:00",
                                           "--duration", "1h", "--json"]).stdout)  # fmt: skip
    [row] = json.loads(runner.invoke(app, ["overview", "--json"]).stdout)
    assert row["window_next_opening"] == shown["next_opening"]["start"]
    assert row["window_open"] == shown["open_now"]
