"""Durations as admins type them: ``30s``, ``90m``, ``4h``, ``1h30m``, ``2d``.

A duration is one or more ``<whole number><unit>`` parts with the units
``d`` (days), ``h``, ``m`` and ``s``, largest first, each unit at most once,
no spaces inside, letters in any case. The total must be longer than zero.

>>> parse_duration("1h30m")
datetime.timedelta(seconds=5400)
>>> format_duration(parse_duration("90M"))
'1h30m'
"""

from __future__ import annotations

import math
import re
from datetime import timedelta

from dynupdate.core.errors import InvalidInput

__all__ = ["format_duration", "parse_duration", "parse_seconds"]

_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_PATTERN = re.compile(
    r"(?:(?P<d>[0-9]+)d)?(?:(?P<h>[0-9]+)h)?(?:(?P<m>[0-9]+)m)?(?:(?P<s>[0-9]+)s)?",
    re.IGNORECASE | re.ASCII,
)
# Longer numbers are refused before int() sees them: far beyond any sane
# duration, and Python limits int() to 4300 digits.
_MAX_DIGITS = 15
_MAX_DAYS = timedelta.max.days
_MAX_SECONDS = _MAX_DAYS * 86400
_EXAMPLES = "e.g. 30s, 90m, 4h, 1h30m"
_NUMBER = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,9})?", re.ASCII)


def parse_duration(text: str) -> timedelta:
    """Read a duration such as ``30s``, ``90m``, ``4h``, ``1h30m`` or ``2d``.

    >>> parse_duration("4h")
    datetime.timedelta(seconds=14400)
    >>> parse_duration("1d2h")
    datetime.timedelta(days=1, seconds=7200)
    >>> parse_duration("4x")
    Traceback (most recent call last):
    ...
    dynupdate.core.errors.InvalidInput: Invalid duration '4x': use a number with s, m, h or d, \
e.g. 30s, 90m, 4h, 1h30m.
    """
    stripped = text.strip() if isinstance(text, str) else ""
    match = _PATTERN.fullmatch(stripped)
    if not stripped or match is None:
        raise InvalidInput(
            f"Invalid duration '{text}': use a number with s, m, h or d, {_EXAMPLES}."
        )
    parts = {unit: value for unit, value in match.groupdict().items() if value is not None}
    if any(len(value.lstrip("0")) > _MAX_DIGITS for value in parts.values()):
        raise InvalidInput(f"Invalid duration '{text}': too long, the longest is {_MAX_DAYS}d.")
    seconds = sum(int(value) * _UNIT_SECONDS[unit] for unit, value in parts.items())
    if seconds == 0:
        raise InvalidInput(f"Invalid duration '{text}': it must be longer than zero, {_EXAMPLES}.")
    if seconds > _MAX_SECONDS:
        raise InvalidInput(f"Invalid duration '{text}': too long, the longest is {_MAX_DAYS}d.")
    return timedelta(seconds=seconds)


def format_duration(duration: timedelta) -> str:
    """The canonical short form of a duration, the one :func:`parse_duration` reads back.

    Zero parts are left out; a whole number of days is shown with ``d``.
    Sub-second parts, which parse_duration never makes, show as a fraction of
    a second.

    >>> format_duration(timedelta(minutes=90))
    '1h30m'
    >>> format_duration(timedelta(hours=24))
    '1d'
    >>> format_duration(timedelta(0))
    '0s'
    """
    if duration < timedelta(0):
        return "-" + format_duration(-duration)
    minutes, seconds = divmod(duration.days * 86400 + duration.seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    if duration.microseconds:
        parts.append(f"{seconds}.{duration.microseconds:06d}".rstrip("0") + "s")
    elif seconds or not parts:
        parts.append(f"{seconds}s")
    return "".join(parts)


def parse_seconds(
    text: str,
    option: str,
    *,
    least: float | None = None,
    most: float | None = None,
    whole: bool = False,
) -> float:
    """Seconds as a number (``30``, ``0.5``) or a duration (``5s``, ``2m``, ``1h30m``).

    Longer than zero, from ``least`` to ``most`` when given; ``whole`` refuses
    fractions of a second. A refusal names the option, the value and the range.

    >>> parse_seconds("0.25", "--ramp"), parse_seconds("2m", "--ramp")
    (0.25, 120.0)
    >>> parse_seconds("2h", "--request-timeout", least=1, most=3600)
    Traceback (most recent call last):
    ...
    dynupdate.core.errors.InvalidInput: Invalid --request-timeout '2h': give seconds (30) or a \
duration (5s, 2m, 1h30m) from 1s to 1h.
    """
    stripped = text.strip() if isinstance(text, str) else ""
    if _NUMBER.fullmatch(stripped):
        value = float(stripped)
    else:
        try:
            value = parse_duration(stripped).total_seconds()
        except InvalidInput:
            value = math.nan  # fails every comparison below
    low, high = least or 0.0, most if most is not None else math.inf
    if not (value > 0 and low <= value <= high) or (whole and not value.is_integer()):
        if most is not None:
            span = f" from {_short(low)} to {_short(high)}"
        else:
            span = f" of at least {_short(low)}" if least else " longer than zero"
        kind = "whole seconds" if whole else "seconds"
        raise InvalidInput(
            f"Invalid {option} '{text}': give {kind} (30) or a duration (5s, 2m, 1h30m){span}."
        )
    return value


def _short(seconds: float) -> str:
    return format_duration(timedelta(seconds=seconds))
