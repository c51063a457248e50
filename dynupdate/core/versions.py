"""Endpoint firmware versions: validate them, and compare them as release versions.

Version strings are stored and shown exactly as given; only comparisons use
the parsed form, :func:`version_key`, which is defined for *every* string
and gives a total order (equal keys mean the same version, with equal
hashes):

1. A string that PEP 440 accepts (``packaging.version.Version``; a leading
   ``v``, letter case and surrounding whitespace do not matter) compares as
   packaging compares it: ``6.2 == 6.2.0``, ``7.0.0rc1 < 7.0.0 <
   7.0.0.post1``, and ``6.2.1.1-600021`` is build (post-release) 600021 of
   ``6.2.1.1``.
2. A trailing ``_N`` build number means the same as ``-N``:
   ``2.6.1_0049 == 2.6.1-49``, between ``2.6.1`` and ``2.6.1.1``.
3. Anything else is ``[epoch!]release`` plus a vendor suffix
   (``5.9.0.PVR`` → release ``5.9.0``, suffix ``PVR``). It sorts by epoch
   and release like every other version, and after every PEP 440 version
   of the same release: ``5.9.0 < 5.9.0.post3 < 5.9.0.PVR < 5.9.0.1``.
   Suffixes compare naturally among themselves: digit runs as numbers,
   other runs case-insensitively, text before numbers, and the separators
   ``. - _ +`` and whitespace ignored (``5.9.0.PVR == 5.9.0-pvr``).
4. A string with no leading number (``PVR``, ``""``) sorts before every
   version that has one, and among its kind by the same natural order.

>>> sorted(["6.10.0", "6.2.2.0-100", "5.9.0.PVR", "6.2.1.1-600021"], key=version_key)
['5.9.0.PVR', '6.2.1.1-600021', '6.2.2.0-100', '6.10.0']
>>> same_version("6.2", "6.2.0")
True
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

from packaging.version import Version

from dynupdate.core.errors import InvalidInput

__all__ = [
    "MAX_VERSION_LENGTH",
    "VersionKey",
    "at_least",
    "compare_versions",
    "newest",
    "same_version",
    "validate_version",
    "version_key",
]

MAX_VERSION_LENGTH = 64

_ALLOWED = re.compile(r"[A-Za-z0-9._+~!-]+")
_ALLOWED_HINT = "use only letters, digits and . _ + ~ ! -"
# A build number after an underscore, as in 2.6.1_0049: read as 2.6.1-0049.
_UNDERSCORE_BUILD = re.compile(r"(.*[0-9])_([0-9]+)", re.DOTALL)
# The fallback split: optional v, optional epoch, dotted release, the rest.
_FALLBACK = re.compile(r"v?(?:([0-9]+)!)?([0-9]+(?:\.[0-9]+)*)(.*)", re.DOTALL)
_TOKEN = re.compile(r"[0-9]+|[^0-9._+\-\s]+")
# Python refuses to turn very long digit strings into ints in one go
# (sys.get_int_max_str_digits, at least 640); version_key must never raise.
_DIGITS_PER_CHUNK = 500

_TEXT, _NUMBER = 0, 1

Token = tuple[int, str] | tuple[int, int]


@dataclass(frozen=True, order=True, slots=True, repr=False)
class VersionKey:
    """The comparable form of a version string; build it with :func:`version_key`.

    Fields compare in order; ``rest`` is a ``Version`` for PEP 440 strings and
    a tuple of tagged tokens for vendor strings, and the ``vendor`` flag before
    it keeps the two from ever being compared with each other.

    >>> version_key("6.2") == version_key("6.2.0")
    True
    >>> version_key("6.2.0")
    <VersionKey('6.2.0')>
    """

    has_release: bool
    epoch: int
    release: tuple[int, ...]
    vendor: bool
    rest: Version | tuple[Token, ...]
    text: str = field(compare=False)

    def __repr__(self) -> str:
        return f"<VersionKey({self.text!r})>"


def validate_version(text: str) -> str:
    """Return ``text`` unchanged if it is an acceptable version string, else raise.

    >>> validate_version("6.2.1.1-600021")
    '6.2.1.1-600021'
    >>> validate_version("6.2 beta")
    Traceback (most recent call last):
    ...
    dynupdate.core.errors.InvalidInput: Invalid version '6.2 beta': it contains whitespace; \
use only letters, digits and . _ + ~ ! -.
    """
    why = _problem(text)
    if why is not None:
        raise InvalidInput(f"Invalid version {_shown(text)}: {why}.")
    return text


# A fleet runs a few dozen versions and every poll and status compares them:
# parsing is the costly part, so keys are kept (they are immutable).
@functools.lru_cache(maxsize=8192)
def version_key(text: str) -> VersionKey:
    """The key that orders ``text`` among versions; defined for every string.

    >>> version_key("6.2.1.1-600021") < version_key("6.2.2.0-100") < version_key("6.10.0")
    True
    >>> version_key("5.9.0") < version_key("5.9.0.PVR") < version_key("5.9.0.1")
    True
    """
    parsed = _parse(text)
    if parsed is None:
        parsed = _parse_underscore_build(text)
    if parsed is not None:
        return VersionKey(True, parsed.epoch, _strip_zeros(parsed.release), False, parsed, text)
    folded = text.strip().casefold()
    match = _FALLBACK.fullmatch(folded)
    if match is None:
        return VersionKey(False, 0, (), True, _tokens(folded), text)
    epoch, release, suffix = match.groups()
    return VersionKey(
        True,
        _int(epoch) if epoch else 0,
        _strip_zeros(tuple(_int(part) for part in release.split("."))),
        True,
        _tokens(suffix),
        text,
    )


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version ``a`` is older than, the same as, or newer than ``b``.

    >>> compare_versions("6.10.0", "6.9.9")
    1
    >>> compare_versions("6.2", "6.2.0")
    0
    """
    key_a, key_b = version_key(a), version_key(b)
    return (key_a > key_b) - (key_a < key_b)


# Polls ask these two about a handful of (device version, target) pairs, again and
# again: comparing two keys costs more than finding the answer in a cache.
@functools.lru_cache(maxsize=8192)
def same_version(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are two spellings of one version.

    >>> same_version("2.6.1_0049", "2.6.1-49")
    True
    >>> same_version("7.0.0rc1", "7.0.0")
    False
    """
    return a == b or version_key(a) == version_key(b)


@functools.lru_cache(maxsize=8192)
def at_least(version: str, floor: str) -> bool:
    """Whether ``version`` is ``floor`` or newer.

    >>> at_least("6.10.0", "6.9.9"), at_least("6.2", "6.2.0"), at_least("7.0.0rc1", "7.0.0")
    (True, True, False)
    """
    return version == floor or version_key(version) >= version_key(floor)


def newest(versions: Iterable[str]) -> str | None:
    """The newest of ``versions`` as given (the first of equal ones), or None if there are none.

    >>> newest(["6.2.0", "6.10.0", "6.9.9"])
    '6.10.0'
    >>> newest([]) is None
    True
    """
    return max(versions, key=version_key, default=None)


def _problem(text: str) -> str | None:
    if not text:
        return "it is empty"
    if text.isspace():
        return "it is blank"
    if len(text) > MAX_VERSION_LENGTH:
        return f"it is longer than {MAX_VERSION_LENGTH} characters"
    if text != text.strip():
        return "it starts or ends with whitespace"
    for char in text:
        if char.isspace():
            return f"it contains whitespace; {_ALLOWED_HINT}"
        if unicodedata.category(char) == "Cc":
            return f"it contains a control character; {_ALLOWED_HINT}"
    if not _ALLOWED.fullmatch(text):
        bad = next(char for char in text if not _ALLOWED.fullmatch(char))
        return f"{bad!r} is not allowed; {_ALLOWED_HINT}"
    return None


def _shown(text: str, limit: int = 40) -> str:
    """``text`` quoted with control characters escaped, cut short if long."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _parse(text: str) -> Version | None:
    try:
        return Version(text)
    except ValueError:  # InvalidVersion, or an int too long for Python to convert
        return None


def _parse_underscore_build(text: str) -> Version | None:
    match = _UNDERSCORE_BUILD.fullmatch(text.strip())
    if match is None:
        return None
    return _parse(f"{match[1]}-{match[2]}")


def _strip_zeros(release: tuple[int, ...]) -> tuple[int, ...]:
    end = len(release)
    while end and release[end - 1] == 0:
        end -= 1
    return release[:end]


def _tokens(suffix: str) -> tuple[Token, ...]:
    """Natural-sort tokens, tagged so an int is never compared with a str."""
    return tuple(
        (_NUMBER, _int(run)) if "0" <= run[0] <= "9" else (_TEXT, run)
        for run in _TOKEN.findall(suffix)
    )


def _int(digits: str) -> int:
    """An ASCII digit string of any length as an int."""
    value = 0
    for start in range(0, len(digits), _DIGITS_PER_CHUNK):
        chunk = digits[start : start + _DIGITS_PER_CHUNK]
        value = value * 10 ** len(chunk) + int(chunk)
    return value
