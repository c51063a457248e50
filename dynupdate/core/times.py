"""Time helpers: every time dynupdate stores or shows is UTC, ISO-8601 with ``Z``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload

__all__ = ["format_utc", "parse_utc", "utc_now"]


def utc_now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


@overload
def format_utc(moment: datetime) -> str: ...
@overload
def format_utc(moment: None) -> None: ...
def format_utc(moment: datetime | None) -> str | None:
    """ISO-8601 UTC with ``Z``, to the second.

    >>> format_utc(datetime(2026, 11, 27, 16, 0, 0, 500, tzinfo=UTC))
    '2026-11-27T16:00:00Z'
    """
    if moment is None:
        return None
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    # isoformat, not strftime: a third faster, and polls format a retryAt each.
    return moment.isoformat(timespec="seconds")[:19] + "Z"


@overload
def parse_utc(text: str) -> datetime: ...
@overload
def parse_utc(text: None) -> None: ...
def parse_utc(text: str | None) -> datetime | None:
    """The inverse of :func:`format_utc` (also reads fractional seconds)."""
    if text is None:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
