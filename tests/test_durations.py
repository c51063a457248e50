"""Durations as admins type them (``30s``, ``90m``, ``4h``, ``1h30m``, ``2d``)."""

import doctest
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynupdate.core import durations
from dynupdate.core.durations import format_duration, parse_duration
from dynupdate.core.errors import InvalidInput


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("90m", timedelta(minutes=90)),
        ("4h", timedelta(hours=4)),
        ("1h30m", timedelta(minutes=90)),
        ("1h30m15s", timedelta(hours=1, minutes=30, seconds=15)),
        ("2d", timedelta(days=2)),
        ("1d12h", timedelta(hours=36)),
        ("1d0h0m1s", timedelta(days=1, seconds=1)),
        ("0h30m", timedelta(minutes=30)),
        ("007m", timedelta(minutes=7)),
        ("4H", timedelta(hours=4)),
        ("1H30M", timedelta(minutes=90)),
        (" 4h\n", timedelta(hours=4)),
        ("999999999d", timedelta(days=999999999)),
    ],
)
def test_parse_duration_accepts(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "0",
        "4",
        "0s",
        "0m",
        "0h0m",
        "-1h",
        "+1h",
        "1.5h",
        "1,5h",
        "4x",
        "4hours",
        "1h 30m",
        "30m1h",
        "1h1h",
        "1m30",
        "h",
        "m30",
        "4 h",
        "1w",
        "1ms",
        "\u0664h",  # ARABIC-INDIC DIGIT FOUR
        "30\u017f",  # LATIN SMALL LETTER LONG S: 's' only when matched ignoring case
        "1000000000d",
        "99999999999999999999d",
        "1" + "0" * 5000 + "s",
    ],
)
def test_parse_duration_refuses_with_a_clear_message(text):
    with pytest.raises(InvalidInput) as caught:
        parse_duration(text)
    message = str(caught.value)
    assert message.startswith("Invalid duration '")
    assert message.endswith(".")
    assert len(text) > 100 or f"'{text}'" in message


def test_parse_duration_message_names_units_and_examples():
    with pytest.raises(InvalidInput, match=r"Invalid duration '4x': .*30s, 90m, 4h, 1h30m\."):
        parse_duration("4x")
    with pytest.raises(InvalidInput, match="longer than zero"):
        parse_duration("0m")
    with pytest.raises(InvalidInput, match="too long"):
        parse_duration("9" * 40 + "d")


def test_parse_duration_refuses_non_strings():
    with pytest.raises(InvalidInput):
        parse_duration(None)


@pytest.mark.parametrize(
    ("duration", "text"),
    [
        (timedelta(seconds=30), "30s"),
        (timedelta(minutes=90), "1h30m"),
        (timedelta(hours=4), "4h"),
        (timedelta(hours=1, minutes=30, seconds=15), "1h30m15s"),
        (timedelta(hours=24), "1d"),
        (timedelta(days=2, seconds=5), "2d5s"),
        (timedelta(0), "0s"),
        (timedelta(minutes=-90), "-1h30m"),
        (timedelta(seconds=1, microseconds=500000), "1.5s"),
        (timedelta(microseconds=250), "0.00025s"),
    ],
)
def test_format_duration(duration, text):
    assert format_duration(duration) == text


@given(st.integers(min_value=1, max_value=timedelta.max.days * 86400))
def test_format_then_parse_round_trips(seconds):
    duration = timedelta(seconds=seconds)
    assert parse_duration(format_duration(duration)) == duration


def test_doctests():
    assert doctest.testmod(durations).failed == 0
