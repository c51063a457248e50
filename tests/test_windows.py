"""Maintenance windows: parsing, and openings on the wall clock across DST."""

import doctest
import json
from collections import Counter
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynupdate.core import windows
from dynupdate.core.errors import InvalidInput
from dynupdate.core.windows import (
    DAY_NAMES,
    Window,
    current_opening,
    is_open,
    make_window,
    next_opening,
    parse_days,
    parse_start,
    parse_tz,
    parse_window_duration,
    retry_at,
    zone_for,
)

NY = "America/New_York"
SECOND = timedelta(seconds=1)
MICROSECOND = timedelta(microseconds=1)


def utc(*args):
    return datetime(*args, tzinfo=UTC)


def local(zone, *args, fold=0):
    """A wall time in ``zone`` as a UTC instant (fold=1: the second of a repeated time)."""
    return datetime(*args, tzinfo=ZoneInfo(zone), fold=fold).astimezone(UTC)


# The 2026 daylight-saving changes of New York, Berlin and Lord Howe.
CHANGES = [
    utc(2026, 3, 8, 7),
    utc(2026, 11, 1, 6),
    utc(2026, 3, 29, 1),
    utc(2026, 10, 25, 1),
    utc(2026, 4, 4, 15),
    utc(2026, 10, 3, 15, 30),
]


def every(start, end, step):
    while start < end:
        yield start
        start += step


# --- parsing ----------------------------------------------------------------

ALL = (0, 1, 2, 3, 4, 5, 6)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, ALL),
        ("", ALL),
        ("  ", ALL),
        ("daily", ALL),
        ("DAILY", ALL),
        ("mon,tue", (0, 1)),
        ("tue,mon,tue", (0, 1)),
        ("mon-fri", (0, 1, 2, 3, 4)),
        ("fri-mon", (0, 4, 5, 6)),
        ("sun-sun", (6,)),
        ("sat-fri", ALL),
        ("mon-wed,sat", (0, 1, 2, 5)),
        ("MON-Fri", (0, 1, 2, 3, 4)),
        ("monday,Sunday", (0, 6)),
        ("thursday-saturday", (3, 4, 5)),
        (" mon , tue ", (0, 1)),
        ("weekdays", (0, 1, 2, 3, 4)),
        ("weekend", (5, 6)),
        ("weekends,wed", (2, 5, 6)),
    ],
)
def test_parse_days(text, expected):
    assert parse_days(text) == expected


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("funday", "'funday'"),
        ("mon,xyz", "'xyz' in 'mon,xyz'"),
        ("mon,,tue", "'' in 'mon,,tue'"),
        ("mon,", "'' in 'mon,'"),
        ("mon-", "'mon-'"),
        ("-fri", "'-fri'"),
        ("mon-wed-fri", "'mon-wed-fri'"),
        ("mo", "'mo'"),
        ("mon;tue", "'mon;tue'"),
        ("1", "'1'"),
        ("mon tue", "'mon tue'"),
        ("daily-mon", "'daily-mon'"),
    ],
)
def test_parse_days_refuses_naming_the_day(text, named):
    with pytest.raises(InvalidInput) as caught:
        parse_days(text)
    message = str(caught.value)
    assert message.startswith(f"Invalid day {named}:")
    assert "mon-fri" in message
    assert "daily" in message


def test_parse_days_refuses_a_non_string():
    with pytest.raises(InvalidInput, match="Invalid days 5"):
        parse_days(5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("00:00", time(0, 0)),
        ("23:59", time(23, 59)),
        ("7:30", time(7, 30)),
        ("07:05", time(7, 5)),
        (" 22:00 ", time(22, 0)),
    ],
)
def test_parse_start(text, expected):
    assert parse_start(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "24:00",
        "7",
        "07:60",
        "07:00:00",
        "7:5",
        "-1:00",
        "07h00",
        "",
        "7:305",
        "123:00",
        "\u0660\u0667:\u0660\u0660",
        "7.30",
    ],
)
def test_parse_start_refuses(text):
    with pytest.raises(InvalidInput, match=r"Invalid start time '.*': use HH:MM"):
        parse_start(text)


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("90m", 90), ("4h", 240), ("1h30m", 90), ("24h", 1440), ("1d", 1440), ("60s", 1)],
)
def test_parse_window_duration(text, minutes):
    assert parse_window_duration(text) == minutes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("90s", "Invalid window duration '90s': use whole minutes"),
        ("1m30s", "use whole minutes"),
        ("25h", "Invalid window duration '25h': a window lasts at most 24h"),
        ("1d1m", "at most 24h"),
        ("0m", "Invalid duration '0m'"),
        ("4x", "Invalid duration '4x'"),
        ("", "Invalid duration ''"),
    ],
)
def test_parse_window_duration_refuses(text, message):
    with pytest.raises(InvalidInput, match=message):
        parse_window_duration(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "UTC"),
        ("UTC", "UTC"),
        ("utc", "UTC"),
        ("endpoint", "endpoint"),
        ("Endpoint", "endpoint"),
        ("Europe/Berlin", "Europe/Berlin"),
        ("europe/berlin", "Europe/Berlin"),
        (" Asia/Tokyo ", "Asia/Tokyo"),
        ("America/Argentina/Buenos_Aires", "America/Argentina/Buenos_Aires"),
        ("Etc/GMT+5", "Etc/GMT+5"),
        ("US/Eastern", "US/Eastern"),
    ],
)
def test_parse_tz(text, expected):
    assert parse_tz(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Not/AZone",
        "",
        "Berlin",
        "../etc/passwd",
        "/etc/localtime",
        "/usr/share/zoneinfo/UTC",
        "America",
        "localtime",
        "posixrules",
        "right/UTC",
        "Europe/Berlin/",
        "Europe/../Europe/Berlin",
        "zone.tab",
        "tzdata.zi",
        "a\x00b",
        "\udcff",
        "x" * 5000,
    ],
)
def test_parse_tz_refuses(text):
    with pytest.raises(InvalidInput) as caught:
        parse_tz(text)
    message = str(caught.value)
    assert message.startswith("Invalid time zone '")
    assert "Europe/Berlin" in message
    assert "endpoint" in message


# --- the Window value ---------------------------------------------------------


def test_make_window_and_to_dict():
    window = make_window("fri-mon", "7:05", "1h30m", "europe/berlin")
    assert window == Window((0, 4, 5, 6), time(7, 5), 90, "Europe/Berlin")
    data = window.to_dict()
    assert data == {
        "days": ["mon", "fri", "sat", "sun"],
        "start": "07:05",
        "duration_minutes": 90,
        "tz": "Europe/Berlin",
    }
    assert json.loads(json.dumps(data)) == data
    assert Window.from_dict(data) == window


def test_make_window_defaults():
    window = make_window(None, "22:00", "4h", None)
    assert window.to_dict()["days"] == list(DAY_NAMES)
    assert window.tz == "UTC"


def test_window_normalises_days():
    assert Window([4, 0, 4], time(1, 0), 60, "UTC").days == (0, 4)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"days": ()}, "Invalid window days"),
        ({"days": (7,)}, "Invalid window days"),
        ({"days": (-1,)}, "Invalid window days"),
        ({"days": ("mon",)}, "Invalid window days"),
        ({"days": (True,)}, "Invalid window days"),
        ({"days": [[0]]}, "Invalid window days"),
        ({"start": time(7, 30, 15)}, "Invalid window start"),
        ({"start": time(7, 30, tzinfo=UTC)}, "Invalid window start"),
        ({"start": "07:30"}, "Invalid window start"),
        ({"duration_minutes": 0}, "Invalid window duration"),
        ({"duration_minutes": 1441}, "Invalid window duration"),
        ({"duration_minutes": True}, "Invalid window duration"),
        ({"duration_minutes": "90"}, "Invalid window duration"),
        ({"duration_minutes": 90.0}, "Invalid window duration"),
        ({"tz": "Not/AZone"}, "Invalid window time zone"),
        ({"tz": "utc"}, "Invalid window time zone"),
        ({"tz": None}, "Invalid window time zone"),
    ],
)
def test_window_checks_its_fields(fields, message):
    values = {"days": (0,), "start": time(22, 0), "duration_minutes": 240, "tz": "UTC"} | fields
    with pytest.raises(InvalidInput, match=message):
        Window(**values)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"days": None}, "Invalid window days"),
        ({"days": []}, "Invalid window days"),
        ({"days": [1]}, "Invalid window days"),
        ({"days": ["mon", "funday"]}, "Invalid day 'funday'"),
        ({"start": 730}, "Invalid start time"),
        ({"start": "24:00"}, "Invalid start time"),
        ({"duration_minutes": "90"}, "Invalid window duration"),
        ({"tz": "Not/AZone"}, "Invalid time zone"),
    ],
)
def test_from_dict_checks_every_value(changes, message):
    data = {"days": ["mon"], "start": "22:00", "duration_minutes": 240, "tz": "UTC"} | changes
    with pytest.raises(InvalidInput, match=message):
        Window.from_dict(data)


def test_from_dict_names_a_missing_key():
    with pytest.raises(InvalidInput, match="has no 'tz'"):
        Window.from_dict({"days": ["mon"], "start": "22:00", "duration_minutes": 240})


def test_from_dict_accepts_a_days_string():
    data = {"days": "mon-wed", "start": "22:00", "duration_minutes": 240, "tz": "UTC"}
    assert Window.from_dict(data).days == (0, 1, 2)


# --- openings in UTC ------------------------------------------------------------

# 2026-11-23 is a Monday.
MONDAY_NIGHT = make_window("mon", "22:00", "4h", None)


def test_crossing_midnight_belongs_to_the_day_it_starts():
    assert is_open(MONDAY_NIGHT, utc(2026, 11, 23, 23, 0))
    assert is_open(MONDAY_NIGHT, utc(2026, 11, 24, 1, 0))  # Tuesday, Monday's opening
    assert not is_open(MONDAY_NIGHT, utc(2026, 11, 23, 1, 0))  # Sunday's would be: not listed
    assert not is_open(MONDAY_NIGHT, utc(2026, 11, 24, 22, 30))
    assert current_opening(MONDAY_NIGHT, utc(2026, 11, 24, 1, 0)) == (
        utc(2026, 11, 23, 22, 0),
        utc(2026, 11, 24, 2, 0),
    )


def test_start_inclusive_end_exclusive_to_the_microsecond():
    start, end = utc(2026, 11, 23, 22, 0), utc(2026, 11, 24, 2, 0)
    assert not is_open(MONDAY_NIGHT, start - MICROSECOND)
    assert not is_open(MONDAY_NIGHT, start - SECOND)
    assert is_open(MONDAY_NIGHT, start)
    assert is_open(MONDAY_NIGHT, end - MICROSECOND)
    assert is_open(MONDAY_NIGHT, end - SECOND)
    assert not is_open(MONDAY_NIGHT, end)
    assert not is_open(MONDAY_NIGHT, end + MICROSECOND)
    assert current_opening(MONDAY_NIGHT, end - MICROSECOND) == (start, end)
    assert current_opening(MONDAY_NIGHT, end) is None
    assert next_opening(MONDAY_NIGHT, start - MICROSECOND) == (start, end)
    assert next_opening(MONDAY_NIGHT, start) == (start + timedelta(days=7), end + timedelta(days=7))


def test_any_aware_now_is_accepted_and_naive_refused():
    tokyo = datetime(2026, 11, 24, 8, 0, tzinfo=ZoneInfo("Asia/Tokyo"))  # 23:00Z Monday
    assert is_open(MONDAY_NIGHT, tokyo)
    with pytest.raises(ValueError, match="no time zone"):
        is_open(MONDAY_NIGHT, datetime(2026, 11, 23, 23, 0))


def test_results_are_utc():
    start, end = next_opening(MONDAY_NIGHT, utc(2026, 11, 20))
    assert start.tzinfo is UTC
    assert end.tzinfo is UTC
    assert retry_at(MONDAY_NIGHT, utc(2026, 11, 20), "X").tzinfo is UTC


def test_saturday_only():
    window = make_window("sat", "10:00", "2h", None)  # 2026-11-28 is a Saturday
    for day in range(22, 29):
        assert is_open(window, utc(2026, 11, day, 11, 0)) == (day == 28)
    assert next_opening(window, utc(2026, 11, 23)) == (utc(2026, 11, 28, 10), utc(2026, 11, 28, 12))
    assert next_opening(window, utc(2026, 11, 28, 10, 30)) == (
        utc(2026, 12, 5, 10),
        utc(2026, 12, 5, 12),
    )


def test_wrapping_day_range():
    window = make_window("fri-mon", "09:00", "1h", None)
    opened = [day for day in range(23, 30) if is_open(window, utc(2026, 11, day, 9, 30))]
    assert [date(2026, 11, day).strftime("%a") for day in opened] == ["Mon", "Fri", "Sat", "Sun"]
    assert next_opening(window, utc(2026, 11, 24)) == (utc(2026, 11, 27, 9), utc(2026, 11, 27, 10))


@pytest.mark.parametrize("zone", ["UTC", NY, "Europe/Berlin", "Australia/Lord_Howe"])
def test_a_24h_window_every_day_is_always_open(zone):
    window = make_window("daily", "02:30", "24h", zone)
    # Every 7 minutes around each 2026 DST change, and every 5 hours of the year.
    moments = [*every(utc(2026, 1, 1), utc(2027, 1, 1), timedelta(hours=5))]
    for change in CHANGES:
        moments += every(
            change - timedelta(hours=30), change + timedelta(hours=30), timedelta(minutes=7)
        )
    assert all(is_open(window, now) for now in moments)


def test_a_24h_window_on_one_day_has_a_gap_after_it():
    window = make_window("wed", "00:00", "24h", None)  # 2026-11-25 is a Wednesday
    assert current_opening(window, utc(2026, 11, 25, 12)) == (utc(2026, 11, 25), utc(2026, 11, 26))
    assert not is_open(window, utc(2026, 11, 26))


def test_consecutive_24h_openings_are_adjacent_but_separate():
    window = make_window("daily", "06:00", "24h", None)
    now = utc(2026, 11, 25, 12)
    assert current_opening(window, now) == (utc(2026, 11, 25, 6), utc(2026, 11, 26, 6))
    assert next_opening(window, now) == (utc(2026, 11, 26, 6), utc(2026, 11, 27, 6))


# --- daylight saving: America/New_York 2026 (Mar 8 spring forward, Nov 1 fall back) ---


def test_spring_forward_window_in_the_skipped_hour_is_empty():
    window = make_window("daily", "02:00", "60m", NY)
    day_start, day_end = local(NY, 2026, 3, 8), local(NY, 2026, 3, 9)
    assert day_end - day_start == timedelta(hours=23)
    assert not any(is_open(window, now) for now in every(day_start, day_end, timedelta(minutes=1)))
    # 02:00 on the 9th is already daylight time: 06:00Z.
    assert next_opening(window, day_start) == (utc(2026, 3, 9, 6), utc(2026, 3, 9, 7))
    assert local(NY, 2026, 3, 9, 2) == utc(2026, 3, 9, 6)
    # The day before is a normal hour of standard time.
    assert current_opening(window, utc(2026, 3, 7, 7, 30)) == (
        utc(2026, 3, 7, 7),
        utc(2026, 3, 7, 8),
    )


def test_spring_forward_window_straddling_the_gap_opens_at_the_transition():
    window = make_window("daily", "02:30", "90m", NY)
    start, end = next_opening(window, local(NY, 2026, 3, 8))
    assert (start, end) == (utc(2026, 3, 8, 7), utc(2026, 3, 8, 8))  # 03:00 to 04:00 EDT
    assert start.astimezone(ZoneInfo(NY)).strftime("%H:%M %Z") == "03:00 EDT"
    assert end.astimezone(ZoneInfo(NY)).strftime("%H:%M %Z") == "04:00 EDT"
    assert not is_open(window, start - SECOND)  # 01:59:59 EST
    assert is_open(window, start)
    assert current_opening(window, start + timedelta(minutes=30)) == (start, end)


def test_spring_forward_window_ending_in_the_gap_is_shortened():
    window = make_window("daily", "01:30", "60m", NY)  # wall 01:30-02:30, 02:00-03:00 skipped
    assert current_opening(window, utc(2026, 3, 8, 6, 45)) == (
        utc(2026, 3, 8, 6, 30),  # 01:30 EST
        utc(2026, 3, 8, 7, 0),  # 03:00 EDT
    )


def test_fall_back_window_over_the_repeated_hour_lasts_two_hours():
    window = make_window("daily", "01:00", "60m", NY)
    span = (utc(2026, 11, 1, 5), utc(2026, 11, 1, 7))
    assert span == (local(NY, 2026, 11, 1, 1), local(NY, 2026, 11, 1, 2))
    assert current_opening(window, utc(2026, 11, 1, 5, 30)) == span  # 01:30 EDT
    assert current_opening(window, utc(2026, 11, 1, 6, 30)) == span  # 01:30 EST
    assert not is_open(window, span[0] - SECOND)
    assert is_open(window, span[1] - SECOND)
    assert not is_open(window, span[1])
    assert next_opening(window, local(NY, 2026, 11, 1)) == span


def test_fall_back_retry_spreads_over_the_first_real_hour():
    window = make_window("daily", "01:00", "60m", NY)
    now = local(NY, 2026, 11, 1)
    times = [retry_at(window, now, f"SN{i}") for i in range(400)]
    assert all(utc(2026, 11, 1, 5) <= t < utc(2026, 11, 1, 6) for t in times)
    assert min(times) < utc(2026, 11, 1, 5, 5)
    assert max(times) > utc(2026, 11, 1, 5, 55)


def test_fall_back_window_over_part_of_the_repeated_hour_is_two_stretches():
    window = make_window("daily", "01:30", "30m", NY)
    # Wall 01:30-02:00 EDT, then (after the clock goes back to 01:00) 01:30-02:00 EST.
    first = (local(NY, 2026, 11, 1, 1, 30), local(NY, 2026, 11, 1, 1, 0, fold=1))
    second = (local(NY, 2026, 11, 1, 1, 30, fold=1), local(NY, 2026, 11, 1, 2, 0))
    assert first == (utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 6))
    assert second == (utc(2026, 11, 1, 6, 30), utc(2026, 11, 1, 7))
    assert current_opening(window, utc(2026, 11, 1, 5, 45)) == first
    assert not is_open(window, utc(2026, 11, 1, 6, 15))  # 01:15 EST: the wall clock is before
    assert current_opening(window, utc(2026, 11, 1, 6, 45)) == second
    assert next_opening(window, utc(2026, 11, 1, 5, 45)) == second
    assert next_opening(window, utc(2026, 11, 1, 6, 45)) == (
        utc(2026, 11, 2, 6, 30),
        utc(2026, 11, 2, 7),
    )


def test_fall_back_day_long_openings_interleave_in_the_repeated_hour():
    # Wall 01:00-01:30 EST on Nov 1 belongs to Oct 31's opening (01:30 + 24h),
    # between the two stretches of Nov 1's.
    window = make_window("daily", "01:30", "24h", NY)
    oct_31_first = (utc(2026, 10, 31, 5, 30), utc(2026, 11, 1, 5, 30))
    nov_1_first = (utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 6))
    oct_31_second = (utc(2026, 11, 1, 6), utc(2026, 11, 1, 6, 30))
    nov_1_second = (utc(2026, 11, 1, 6, 30), utc(2026, 11, 2, 6, 30))
    assert current_opening(window, utc(2026, 11, 1, 5)) == oct_31_first
    assert next_opening(window, utc(2026, 11, 1, 5)) == nov_1_first
    assert current_opening(window, utc(2026, 11, 1, 5, 45)) == nov_1_first
    assert next_opening(window, utc(2026, 11, 1, 5, 45)) == oct_31_second
    assert current_opening(window, utc(2026, 11, 1, 6, 15)) == oct_31_second
    assert next_opening(window, utc(2026, 11, 1, 6, 15)) == nov_1_second


# --- daylight saving elsewhere --------------------------------------------------


def test_berlin():
    berlin = "Europe/Berlin"
    spring = make_window("daily", "02:00", "60m", berlin)  # 2026-03-29 02:00 CET -> 03:00 CEST
    assert next_opening(spring, local(berlin, 2026, 3, 29)) == (
        local(berlin, 2026, 3, 30, 2),
        local(berlin, 2026, 3, 30, 3),
    )
    assert not is_open(spring, utc(2026, 3, 29, 1))  # 03:00 CEST
    autumn = make_window("sun", "02:00", "60m", berlin)  # 2026-10-25 03:00 CEST -> 02:00 CET
    assert current_opening(autumn, utc(2026, 10, 25, 1)) == (
        utc(2026, 10, 25, 0),  # 02:00 CEST
        utc(2026, 10, 25, 2),  # 03:00 CET
    )
    winter = make_window("mon-fri", "22:00", "4h", berlin)
    assert current_opening(winter, utc(2026, 11, 27, 23)) == (
        utc(2026, 11, 27, 21),
        utc(2026, 11, 28, 1),
    )


def test_lord_howe_half_hour_daylight_saving():
    lord_howe = "Australia/Lord_Howe"
    # 2026-10-04: 02:00 +10:30 becomes 02:30 +11, so 02:00-02:30 never happens.
    skipped = make_window("sun", "02:00", "30m", lord_howe)
    assert not any(
        is_open(skipped, now)
        for now in every(local(lord_howe, 2026, 10, 4), local(lord_howe, 2026, 10, 5), SECOND * 60)
    )
    assert next_opening(skipped, local(lord_howe, 2026, 10, 4))[0] == local(
        lord_howe, 2026, 10, 11, 2
    )
    # 2026-04-05: 02:00 +11 becomes 01:30 +10:30, so 01:30-02:00 happens twice.
    repeated = make_window("sun", "01:30", "30m", lord_howe)
    start, end = next_opening(repeated, local(lord_howe, 2026, 4, 5))
    assert (start, end) == (utc(2026, 4, 4, 14, 30), utc(2026, 4, 4, 15, 30))
    assert end - start == timedelta(hours=1)


def test_kolkata_has_no_daylight_saving():
    window = make_window("daily", "02:00", "60m", "Asia/Kolkata")
    assert next_opening(window, utc(2026, 6, 1)) == (
        utc(2026, 6, 1, 20, 30),
        utc(2026, 6, 1, 21, 30),
    )


# --- the endpoint's own clock -----------------------------------------------------

AT_ENDPOINT = make_window("daily", "22:00", "1h", "endpoint")


def test_endpoint_clock_tokyo():
    now = utc(2026, 11, 27, 13, 30)  # 22:30 in Tokyo
    assert is_open(AT_ENDPOINT, now, "Asia/Tokyo")
    assert not is_open(AT_ENDPOINT, now)
    assert current_opening(AT_ENDPOINT, now, "Asia/Tokyo") == (
        utc(2026, 11, 27, 13),
        utc(2026, 11, 27, 14),
    )
    assert next_opening(AT_ENDPOINT, now, "Asia/Tokyo")[0] == utc(2026, 11, 28, 13)


@pytest.mark.parametrize(
    "endpoint_tz",
    [
        None,
        "",
        "Not/AZone",
        "../../etc/passwd",
        "/etc/localtime",
        "localtime",
        "a\x00b",
        "\udcff",
        "x" * 1000,
        "America",
        "endpoint",
        42,
    ],
)
def test_endpoint_clock_unknown_zone_means_utc(endpoint_tz):
    assert zone_for(AT_ENDPOINT, endpoint_tz).key == "UTC"
    assert is_open(AT_ENDPOINT, utc(2026, 11, 27, 22, 30), endpoint_tz)
    assert not is_open(AT_ENDPOINT, utc(2026, 11, 27, 13, 30), endpoint_tz)
    assert retry_at(AT_ENDPOINT, utc(2026, 11, 27, 12), "S1", endpoint_tz) >= utc(2026, 11, 27, 22)


def test_endpoint_clock_takes_a_zone_in_another_case():
    assert zone_for(AT_ENDPOINT, "asia/tokyo").key == "Asia/Tokyo"


def test_a_fixed_zone_ignores_the_endpoint_clock():
    window = make_window("daily", "22:00", "1h", "Europe/Berlin")
    assert zone_for(window, "Asia/Tokyo").key == "Europe/Berlin"


# --- retry_at ---------------------------------------------------------------------

FOUR_HOURS = make_window("daily", "22:00", "4h", None)


def test_retry_at_is_stable_and_whole_seconds():
    now = utc(2026, 11, 27, 16)
    first = retry_at(FOUR_HOURS, now, "8211ABC")
    assert retry_at(FOUR_HOURS, now, "8211ABC") == first
    # SHA-256 of the serial, not hash(): the same in every process, release after release.
    assert first == utc(2026, 11, 27, 23, 37, 25)
    assert first.microsecond == 0
    later = retry_at(FOUR_HOURS, now + timedelta(hours=3, microseconds=7), "8211ABC")
    assert later == first  # the same opening, the same offset into it


def test_retry_at_is_in_the_first_half_of_the_next_opening():
    for now in every(utc(2026, 11, 27), utc(2026, 11, 29), timedelta(minutes=37)):
        start, end = next_opening(FOUR_HOURS, now)
        moment = retry_at(FOUR_HOURS, now, f"S{now.minute}")
        assert start <= moment < start + (end - start) / 2
        assert moment > now
        assert is_open(FOUR_HOURS, moment)


def test_retry_at_spreads_a_fleet():
    now = utc(2026, 11, 27, 16)
    offsets = [
        (retry_at(FOUR_HOURS, now, f"8211{i:06d}") - utc(2026, 11, 27, 22)).total_seconds()
        for i in range(1000)
    ]
    assert all(0 <= o < 2 * 3600 for o in offsets)
    assert min(offsets) < 5 * 60
    assert max(offsets) > 2 * 3600 - 5 * 60
    buckets = Counter(int(o // 600) for o in offsets)
    assert len(buckets) == 12
    assert max(buckets.values()) <= 3 * 1000 / 12
    assert len(set(offsets)) > 900


def test_retry_at_in_a_one_minute_window():
    window = make_window("daily", "03:00", "1m", None)
    moment = retry_at(window, utc(2026, 11, 27), "S1")
    assert utc(2026, 11, 27, 3) <= moment < utc(2026, 11, 27, 3, 0, 30)


# --- properties -------------------------------------------------------------------

ZONES = [NY, "Europe/Berlin", "Australia/Lord_Howe", "UTC", "Asia/Kolkata"]

window_strategy = st.builds(
    Window,
    days=st.sets(st.integers(0, 6), min_size=1).map(lambda days: tuple(sorted(days))),
    start=st.builds(
        time,
        st.one_of(st.integers(0, 23), st.integers(0, 3)),
        st.one_of(st.integers(0, 59), st.sampled_from([0, 30])),
    ),
    duration_minutes=st.one_of(st.integers(1, 1440), st.sampled_from([30, 60, 90, 1380, 1440])),
    tz=st.sampled_from(ZONES),
)
instant_strategy = st.one_of(
    st.datetimes(datetime(2026, 1, 1), datetime(2026, 12, 31, 23, 59, 59), timezones=st.just(UTC)),
    st.builds(
        lambda change, delta: change + delta,
        st.sampled_from(CHANGES),
        st.timedeltas(-timedelta(days=2), timedelta(days=2)),
    ),
)


def wall_clock_says_open(window, now):
    """The definition, read directly: is now's wall time inside a listed day's interval?"""
    wall = now.astimezone(ZoneInfo(window.tz)).replace(tzinfo=None)
    for day in (wall.date(), wall.date() - timedelta(days=1)):
        start = datetime.combine(day, window.start)
        if day.weekday() in window.days and start <= wall < start + timedelta(
            minutes=window.duration_minutes
        ):
            return True
    return False


@settings(max_examples=300, deadline=None)
@given(window_strategy, instant_strategy)
def test_openings_agree_with_the_wall_clock(window, now):
    opening = current_opening(window, now)
    assert is_open(window, now) == (opening is not None) == wall_clock_says_open(window, now)
    if opening is not None:
        start, end = opening
        assert start <= now < end
        assert wall_clock_says_open(window, start)
        assert wall_clock_says_open(window, end - SECOND)

    start, end = next_opening(window, now)
    assert now < start < end
    assert is_open(window, start)
    assert current_opening(window, start) == (start, end)
    before = current_opening(window, start - SECOND)
    assert before is None or before[1] == start  # only an adjacent opening touches it
    after = current_opening(window, end)
    assert after is None or after[0] == end

    # No opening starts in (now, start): an opening starts at a listed day's
    # start (either of a repeated wall time) or at a DST change.
    zone = ZoneInfo(window.tz)
    today = now.astimezone(zone).date()
    candidates = list(CHANGES)
    for offset in range(-3, 10):
        for fold in (0, 1):
            wall = datetime.combine(today + timedelta(days=offset), window.start, zone)
            candidates.append(wall.replace(fold=fold).astimezone(UTC))
    for candidate in candidates:
        around = current_opening(window, candidate) if candidate > now else None
        if around is not None and around[0] > now:
            assert start <= around[0]

    moment = retry_at(window, now, "SN-1234")
    assert start <= moment < start + (end - start) / 2
    assert is_open(window, moment)


def test_doctests():
    assert doctest.testmod(windows).failed == 0
