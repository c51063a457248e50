"""Maintenance windows: the days and hours in which updates may be offered.

A window is a set of days of the week, a start time, a duration (1 minute to
24 hours) and the clock it is read on: an IANA zone, or ``endpoint`` for
each endpoint's own zone (UTC when it sends none or one that is unknown).

It is defined by the wall clock. For each listed day D, the *opening* of D
is the set of instants whose local wall time w satisfies
``D + start <= w < D + start + duration`` (naive arithmetic). Hence:

- an opening that crosses midnight belongs to the day it starts;
- start is inclusive, end exclusive;
- on a spring-forward day the skipped wall hour never happens, so an
  opening inside it is empty and one straddling it starts at the first real
  instant whose wall time is inside (02:30 for 90 min opens at 03:00 DST);
- on a fall-back day the repeated wall hour happens twice, so an opening
  covering it lasts an hour longer; one covering only part of it is two
  stretches of real time, and each stretch counts as an opening of its own
  for :func:`current_opening` and :func:`next_opening`.

All times given to and returned by this module are timezone-aware; results
are UTC.

>>> window = make_window("mon-fri", "22:00", "4h", "UTC")
>>> window.to_dict()
{'days': ['mon', 'tue', 'wed', 'thu', 'fri'], 'start': '22:00', 'duration_minutes': 240, \
'tz': 'UTC'}
>>> is_open(window, datetime(2026, 11, 28, 1, 0, tzinfo=UTC))  # Saturday 01:00, Friday's
True
"""

from __future__ import annotations

import functools
import hashlib
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, cast

from dynupdate.core.durations import parse_duration
from dynupdate.core.errors import InvalidInput

__all__ = [
    "DAY_NAMES",
    "ENDPOINT",
    "Window",
    "current_opening",
    "is_open",
    "make_window",
    "next_opening",
    "parse_days",
    "parse_start",
    "parse_tz",
    "parse_window_duration",
    "retry_at",
    "zone_for",
]

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ENDPOINT = "endpoint"
"""The ``tz`` of a window read on each endpoint's own clock."""

_FULL_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_DAY_INDEX = {name: i for names in (DAY_NAMES, _FULL_DAY_NAMES) for i, name in enumerate(names)}
_DAY_GROUPS = {
    "daily": (0, 1, 2, 3, 4, 5, 6),
    "weekdays": (0, 1, 2, 3, 4),
    "weekends": (5, 6),
    "weekend": (5, 6),
}
_ALL_DAYS = _DAY_GROUPS["daily"]
_DAYS_HELP = "use mon, tue, wed, thu, fri, sat, sun, ranges such as mon-fri, or daily"
_START = re.compile(r"([0-9]{1,2}):([0-9]{2})", re.ASCII)
_MAX_MINUTES = 24 * 60
# Zone files that exist but are no portable IANA name: the server's own
# zone, a rules template, and clocks that count leap seconds.
_REFUSED_ZONES = frozenset({"localtime", "posixrules"})
_REFUSED_PREFIX = "right/"
_DAY = 86400
# Offsets are probed this often to find DST transitions, which in tzdata are
# weeks apart.
_PROBE = 3600
_EPOCH = datetime(1970, 1, 1)


@dataclass(frozen=True)
class Window:
    """A maintenance window; build one from admin input with :func:`make_window`.

    >>> Window((4, 0), time(22, 0), 240, "Europe/Berlin").days
    (0, 4)
    """

    days: tuple[int, ...]
    start: time
    duration_minutes: int
    tz: str

    def __post_init__(self) -> None:
        try:
            days = tuple(sorted(set(self.days)))
        except TypeError:
            days = ()
        if not days or not all(type(d) is int and 0 <= d <= 6 for d in days):
            raise InvalidInput(
                f"Invalid window days {self.days!r}: give day numbers, 0=Monday..6=Sunday."
            )
        object.__setattr__(self, "days", days)
        if (
            not isinstance(self.start, time)
            or self.start.tzinfo is not None
            or self.start.second
            or self.start.microsecond
        ):
            raise InvalidInput(
                f"Invalid window start {self.start!r}: give a naive time in whole minutes."
            )
        minutes = self.duration_minutes
        if type(minutes) is not int or not 1 <= minutes <= _MAX_MINUTES:
            raise InvalidInput(
                f"Invalid window duration {minutes!r} minutes: give 1 to {_MAX_MINUTES} minutes."
            )
        if self.tz != ENDPOINT and not (
            isinstance(self.tz, str) and (zone := _zone(self.tz)) and zone.key == self.tz
        ):
            raise InvalidInput(
                f"Invalid window time zone {self.tz!r}: give an IANA zone name such as "
                f"Europe/Berlin, or {ENDPOINT}."
            )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, with the keys the CLI and the database use.

        >>> make_window("sat", "7:05", "90m", None).to_dict()
        {'days': ['sat'], 'start': '07:05', 'duration_minutes': 90, 'tz': 'UTC'}
        """
        return {
            "days": [DAY_NAMES[d] for d in self.days],
            "start": self.start.strftime("%H:%M"),
            "duration_minutes": self.duration_minutes,
            "tz": self.tz,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Window:
        """The inverse of :meth:`to_dict`; checks every value.

        >>> Window.from_dict({"days": ["mon"], "start": "02:00", "duration_minutes": 60,
        ...                   "tz": "endpoint"}).tz
        'endpoint'
        """
        missing = [k for k in ("days", "start", "duration_minutes", "tz") if k not in data]
        if missing:
            raise InvalidInput(f"Invalid window {dict(data)!r}: it has no {missing[0]!r}.")
        days = data["days"]
        if isinstance(days, list | tuple) and days and all(isinstance(d, str) for d in days):
            days = ",".join(days)
        if not isinstance(days, str) or not days.strip():
            raise InvalidInput(
                f"Invalid window days {data['days']!r}: give a list such as ['mon', 'tue']."
            )
        start = data["start"]
        if not isinstance(start, str):
            raise InvalidInput(f"Invalid start time {start!r}: use HH:MM, e.g. 22:00.")
        return cls(
            parse_days(days), parse_start(start), data["duration_minutes"], parse_tz(data["tz"])
        )


def parse_days(text: str | None) -> tuple[int, ...]:
    """Read days of the week: ``mon,tue``, ``mon-fri``, ``fri-mon``, ``daily``; none = every day.

    Names are three letters or in full, in any case. Ranges include both
    ends and wrap past Sunday. ``weekdays`` is mon-fri, ``weekend(s)`` sat,sun.

    >>> parse_days("Mon-Wed,sat")
    (0, 1, 2, 5)
    >>> parse_days("fri-mon")
    (0, 4, 5, 6)
    >>> parse_days(None)
    (0, 1, 2, 3, 4, 5, 6)
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return _ALL_DAYS
    if not isinstance(text, str):
        raise InvalidInput(f"Invalid days {text!r}: {_DAYS_HELP}.")
    found: set[int] = set()
    for token in text.split(","):
        word = token.strip().lower()
        if word in _DAY_GROUPS:
            found.update(_DAY_GROUPS[word])
            continue
        first, dash, last = word.partition("-")
        if dash:
            a, b = _day_index(first, token, text), _day_index(last, token, text)
            found.update((a + i) % 7 for i in range((b - a) % 7 + 1))
        else:
            found.add(_day_index(word, token, text))
    return tuple(sorted(found))


def _day_index(word: str, token: str, text: str) -> int:
    if word in _DAY_INDEX:
        return _DAY_INDEX[word]
    where = "" if token.strip() == text.strip() else f" in '{text}'"
    raise InvalidInput(f"Invalid day '{token.strip()}'{where}: {_DAYS_HELP}.")


def parse_start(text: str) -> time:
    """Read a start time ``HH:MM`` (or ``H:MM``), 00:00 to 23:59.

    >>> parse_start("7:30")
    datetime.time(7, 30)
    """
    match = _START.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or int(match[1]) > 23 or int(match[2]) > 59:
        raise InvalidInput(
            f"Invalid start time '{text}': use HH:MM from 00:00 to 23:59, e.g. 22:00."
        )
    return time(int(match[1]), int(match[2]))


def parse_window_duration(text: str) -> int:
    """Read a window's duration (``90m``, ``4h``, ``1h30m``, up to ``24h``) as minutes.

    >>> parse_window_duration("1h30m")
    90
    """
    duration = parse_duration(text)
    if duration % timedelta(minutes=1):
        raise InvalidInput(
            f"Invalid window duration '{text}': use whole minutes, e.g. 90m, 4h, 1h30m."
        )
    minutes = duration // timedelta(minutes=1)
    if minutes > _MAX_MINUTES:
        raise InvalidInput(f"Invalid window duration '{text}': a window lasts at most 24h.")
    return minutes


def parse_tz(text: str | None) -> str:
    """Read a window's clock: an IANA zone name, or ``endpoint``; none = ``UTC``.

    A name in the wrong case is corrected to the zone's own spelling.

    >>> parse_tz("europe/berlin")
    'Europe/Berlin'
    >>> parse_tz(None)
    'UTC'
    """
    if text is None:
        return "UTC"
    key = text.strip() if isinstance(text, str) else ""
    if key.lower() == ENDPOINT:
        return ENDPOINT
    zone = _zone(key)
    if zone is None:
        raise InvalidInput(
            f"Invalid time zone '{text}': use an IANA zone name such as Europe/Berlin or UTC, "
            f"or {ENDPOINT} for each endpoint's own clock."
        )
    return zone.key


def make_window(days: str | None, start: str, duration: str, tz: str | None) -> Window:
    """Build a window from admin input, e.g. ``make_window("mon-fri", "22:00", "4h", None)``.

    >>> make_window(None, "22:00", "4h", "endpoint").days
    (0, 1, 2, 3, 4, 5, 6)
    """
    return Window(
        parse_days(days), parse_start(start), parse_window_duration(duration), parse_tz(tz)
    )


def zone_for(window: Window, endpoint_tz: str | None = None) -> zoneinfo.ZoneInfo:
    """The zone a window is read in for one endpoint; an unknown endpoint zone means UTC.

    >>> zone_for(make_window(None, "22:00", "4h", "endpoint"), "Not/AZone").key
    'UTC'
    """
    if window.tz != ENDPOINT:
        return _zone(window.tz) or _UTC_ZONE
    if isinstance(endpoint_tz, str):
        return _zone(endpoint_tz.strip()) or _UTC_ZONE
    return _UTC_ZONE


def is_open(window: Window, now: datetime, endpoint_tz: str | None = None) -> bool:
    """Whether updates may be offered at ``now``.

    >>> window = make_window("mon", "22:00", "4h", None)
    >>> is_open(window, datetime(2026, 11, 24, 1, 59, tzinfo=UTC))  # Tuesday, Monday's opening
    True
    >>> is_open(window, datetime(2026, 11, 24, 2, 0, tzinfo=UTC))  # the end is exclusive
    False
    """
    return current_opening(window, now, endpoint_tz) is not None


def current_opening(
    window: Window, now: datetime, endpoint_tz: str | None = None
) -> tuple[datetime, datetime] | None:
    """The UTC ``[start, end)`` of the opening containing ``now``, or None outside.

    >>> window = make_window("mon", "22:00", "4h", None)
    >>> [t.isoformat() for t in current_opening(window, datetime(2026, 11, 24, 1, tzinfo=UTC))]
    ['2026-11-23T22:00:00+00:00', '2026-11-24T02:00:00+00:00']
    """
    zone = zone_for(window, endpoint_tz)
    moment = _seconds(now)
    today = _aware(now).astimezone(zone).date()
    for start, end in _openings(window, zone, today - timedelta(days=1), today):
        if start <= moment < end:
            return _utc(start), _utc(end)
    return None


def next_opening(
    window: Window, now: datetime, endpoint_tz: str | None = None
) -> tuple[datetime, datetime]:
    """The UTC ``[start, end)`` of the first non-empty opening that starts strictly after ``now``.

    >>> window = make_window("sat", "22:00", "4h", None)
    >>> [t.isoformat() for t in next_opening(window, datetime(2026, 11, 28, 22, tzinfo=UTC))]
    ['2026-12-05T22:00:00+00:00', '2026-12-06T02:00:00+00:00']
    """
    zone = zone_for(window, endpoint_tz)
    moment = _seconds(now)
    # A later instant's wall time is at most two offsets (< 48 h) earlier,
    # so no opening of a day before today - 3 can start after now.
    first = _aware(now).astimezone(zone).date() - timedelta(days=3)
    best: tuple[int, int] | None = None
    for _ in range(100):
        last = first + timedelta(days=15)
        later = [o for o in _openings(window, zone, first, last) if o[0] > moment]
        best = min([*later, *([best] if best else [])], default=None)
        # Instants of later days' openings come after their wall time - 24 h.
        if best is not None and best[0] <= _wall_seconds(last, time(0)):
            return _utc(best[0]), _utc(best[1])
        first = last + timedelta(days=1)
    raise InvalidInput(f"The maintenance window {window.to_dict()} never opens.")


def retry_at(
    window: Window, now: datetime, serial: str, endpoint_tz: str | None = None
) -> datetime:
    """A time in the first half of the next opening, spread over devices by their serial.

    The same serial always gets the same offset into the opening (from
    SHA-256, so it is stable across processes); whole seconds, UTC.

    >>> window = make_window(None, "22:00", "4h", None)
    >>> retry_at(window, datetime(2026, 11, 27, 16, tzinfo=UTC), "8211ABC").isoformat()
    '2026-11-27T23:37:25+00:00'
    """
    start, end = next_opening(window, now, endpoint_tz)
    half = int((end - start).total_seconds()) // 2
    digest = hashlib.sha256(serial.encode("utf-8", "surrogatepass")).digest()
    offset = int.from_bytes(digest[:8], "big") % half if half else 0
    return start + timedelta(seconds=offset)


# --- zones ------------------------------------------------------------------

_UTC_ZONE = zoneinfo.ZoneInfo("UTC")


@functools.lru_cache(maxsize=1024)
def _zone(key: str) -> zoneinfo.ZoneInfo | None:
    """The zone named ``key`` (or named so in another case), or None; never raises."""
    if not key or len(key) > 255 or key in _REFUSED_ZONES or key.startswith(_REFUSED_PREFIX):
        return None
    try:
        return zoneinfo.ZoneInfo(key)
    except (KeyError, ValueError, OSError):  # not found, malformed key or file, a directory
        pass
    canonical = _zone_keys_by_lower_name().get(key.lower())
    return _zone(canonical) if canonical and canonical != key else None


@functools.cache
def _zone_keys_by_lower_name() -> dict[str, str]:
    return {key.lower(): key for key in zoneinfo.available_timezones()}


# --- openings ---------------------------------------------------------------
# Instants are whole POSIX seconds; wall times
# are the same count for the naive local time, so wall = instant + offset.


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{moment!r} has no time zone; give an aware datetime (UTC).")
    return moment


def _seconds(moment: datetime) -> int:
    # Openings start and end on whole seconds, so comparing them with the
    # whole second of now (rounded down) gives the same answers, exactly.
    return (_aware(moment) - _EPOCH.replace(tzinfo=UTC)) // timedelta(seconds=1)


def _utc(seconds: int) -> datetime:
    return _EPOCH.replace(tzinfo=UTC) + timedelta(seconds=seconds)


def _wall_seconds(day: date, at: time) -> int:
    return (datetime.combine(day, at) - _EPOCH) // timedelta(seconds=1)


def _offset(zone: zoneinfo.ZoneInfo, instant: int) -> int:
    local = _utc(instant).astimezone(zone)
    # An aware datetime always has an offset; typeshed's Optional is for naive ones.
    return cast(timedelta, local.utcoffset()) // timedelta(seconds=1)


def _segments(zone: zoneinfo.ZoneInfo, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """``(start, end, offset)`` runs of constant UTC offset covering ``[lo, hi)``."""
    runs: list[tuple[int, int, int]] = []
    for day in range(lo // _DAY, (hi - 1) // _DAY + 1):
        for run_start, run_end, offset in _day_runs(zone, day):
            start, end = max(run_start, lo), min(run_end, hi)
            if start >= end:
                continue
            if runs and runs[-1][2] == offset:
                runs[-1] = (runs[-1][0], end, offset)
            else:
                runs.append((start, end, offset))
    return runs


# Every poll outside the window asks for the same few days: remember them.
@functools.lru_cache(maxsize=4096)
def _day_runs(zone: zoneinfo.ZoneInfo, day: int) -> tuple[tuple[int, int, int], ...]:
    """The runs of constant offset of one UTC day (``day`` days after 1970-01-01)."""
    lo, hi = day * _DAY, (day + 1) * _DAY
    runs = []
    start, offset, probe = lo, _offset(zone, lo), lo
    while probe < hi:
        ahead = min(probe + _PROBE, hi)
        if _offset(zone, ahead) == offset:
            probe = ahead
            continue
        same, changed = probe, ahead  # bisect to the first second of the new offset
        while changed - same > 1:
            middle = (same + changed) // 2
            same, changed = (middle, changed) if _offset(zone, middle) == offset else (same, middle)
        runs.append((start, changed, offset))
        start, offset, probe = changed, _offset(zone, changed), changed
    runs.append((start, hi, offset))
    return tuple(runs)


def _openings(
    window: Window, zone: zoneinfo.ZoneInfo, first: date, last: date
) -> list[tuple[int, int]]:
    """Sorted real ``[start, end)`` stretches of the openings of the listed days first..last."""
    days = [
        day
        for day in (first + timedelta(days=i) for i in range((last - first).days + 1))
        if day.weekday() in window.days
    ]
    if not days:
        return []
    length = window.duration_minutes * 60
    # Offsets are under 24 h, so every instant of these openings lies in here.
    runs = _segments(
        zone,
        _wall_seconds(days[0], window.start) - _DAY,
        _wall_seconds(days[-1], window.start) + length + _DAY,
    )
    stretches: list[tuple[int, int]] = []
    for day in days:
        wall_start = _wall_seconds(day, window.start)
        pieces: list[tuple[int, int]] = []
        for run_start, run_end, offset in runs:
            start = max(run_start, wall_start - offset)
            end = min(run_end, wall_start + length - offset)
            if start >= end:
                continue
            if pieces and pieces[-1][1] == start:  # a transition the wall clock runs through
                pieces[-1] = (pieces[-1][0], end)
            else:
                pieces.append((start, end))
        stretches.extend(pieces)
    return sorted(stretches)
