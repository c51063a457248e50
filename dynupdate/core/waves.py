"""Who a rollout admits: buckets, waves and shares (SPEC section 6, a contract).

A serial's *bucket* is a stable number in 0…9999 from its SHA-256, so the same
endpoints lead every rollout; wave ``p%`` covers the buckets below ``p * 100``.
Shares are kept as hundredths of a percent (basis points), exact: ``0.5%`` is 50.

>>> bucket("8211ABC")
6645
>>> waves = parse_waves("trial,1%,10%,100%")
>>> [w.label for w in waves]
['trial', '1%', '10%', '100%']
>>> covers(waves[1], bucket=99, trial=False), covers(waves[1], bucket=100, trial=False)
(True, False)
>>> parse_percent("0.5%", "--waves")
50
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from dynupdate.core.errors import InvalidInput

__all__ = [
    "ALL",
    "BUCKETS",
    "DEFAULT_WAVES",
    "Wave",
    "bucket",
    "covers",
    "format_percent",
    "parse_percent",
    "parse_waves",
]

BUCKETS = 10_000
ALL = BUCKETS  # 100 % in basis points
DEFAULT_WAVES = "1%,10%,50%,100%"
TRIAL = "trial"
_PERCENT = re.compile(r"(?P<whole>[0-9]{1,3})(?:\.(?P<frac>[0-9]{1,2}))?%", re.ASCII)


def bucket(serial: str) -> int:
    """The serial's bucket: the first 8 bytes of its SHA-256, big-endian, modulo 10,000.

    >>> bucket("")
    1652
    """
    digest = hashlib.sha256(serial.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True)
class Wave:
    """One wave: the trial devices alone (``share`` None), or a cumulative share."""

    label: str  # as the admin gave it, e.g. "0.5%" or "trial"
    share: int | None  # basis points; None for the trial wave

    @property
    def trial(self) -> bool:
        return self.share is None


def covers(wave: Wave, *, bucket: int, trial: bool) -> bool:
    """Whether ``wave`` (with the waves before it) covers a device; trial devices are in all."""
    return trial or (wave.share is not None and bucket < wave.share)


def parse_percent(text: str, option: str, *, zero: bool = False) -> int:
    """``12.5%`` → 1250 basis points; at most two decimals, at most 100 %.

    >>> parse_percent("95%", "--min-success")
    9500
    >>> parse_percent("95", "--min-success")
    Traceback (most recent call last):
    ...
    dynupdate.core.errors.InvalidInput: Invalid --min-success '95': use a percentage such as 95%.
    """
    match = _PERCENT.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise InvalidInput(f"Invalid {option} {text!r}: use a percentage such as 95%.")
    value = int(match["whole"]) * 100 + int((match["frac"] or "0").ljust(2, "0"))
    if value > ALL or (value == 0 and not zero):
        low = "0%" if zero else "0.01%"
        raise InvalidInput(f"Invalid {option} {text!r}: use a percentage from {low} to 100%.")
    return value


def format_percent(basis_points: int) -> str:
    """The shortest spelling :func:`parse_percent` reads back.

    >>> format_percent(50), format_percent(1000), format_percent(1234)
    ('0.5%', '10%', '12.34%')
    """
    whole, frac = divmod(basis_points, 100)
    return f"{whole}.{frac:02d}".rstrip("0").rstrip(".") + "%"


def parse_waves(text: str | Sequence[str]) -> tuple[Wave, ...]:
    """Read ``--waves``: ascending cumulative shares ending at 100 %, ``trial`` first only.

    >>> parse_waves("10%,5%")
    Traceback (most recent call last):
    ...
    dynupdate.core.errors.InvalidInput: Invalid --waves '10%,5%': shares must go up (5% after 10%).
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    shown = text if isinstance(text, str) else ",".join(text)
    labels = [item.strip() for item in items]
    if not labels or any(not label for label in labels):
        raise InvalidInput(
            f"Invalid --waves {shown!r}: give shares separated by commas, e.g. {DEFAULT_WAVES}."
        )
    waves: list[Wave] = []
    for index, label in enumerate(labels):
        if label.casefold() == TRIAL:
            if index:
                raise InvalidInput(
                    f"Invalid --waves {shown!r}: 'trial' can only be the first wave."
                )
            waves.append(Wave(TRIAL, None))
            continue
        share = parse_percent(label, "--waves")
        previous = waves[-1] if waves else None
        if previous is not None and previous.share is not None and share <= previous.share:
            raise InvalidInput(
                f"Invalid --waves {shown!r}: shares must go up ({label} after {previous.label})."
            )
        waves.append(Wave(label, share))
    if waves[-1].share != ALL:
        raise InvalidInput(f"Invalid --waves {shown!r}: the last wave must be 100%.")
    return tuple(waves)
