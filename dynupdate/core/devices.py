"""Device types and serials as admins and endpoints spell them."""

from __future__ import annotations

import re

from dynupdate.core.errors import InvalidInput

__all__ = ["type_key", "validate_type"]

# Letters, digits and a few separators, as vendors name model families
# (GroupSeries, Trio, EagleEyeIV, CCX-600, RealPresence_Group).
_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def validate_type(text: str) -> str:
    """Return ``text`` if it is a device type name, else raise :class:`InvalidInput`.

    >>> validate_type("GroupSeries")
    'GroupSeries'
    """
    if not _TYPE.fullmatch(text):
        raise InvalidInput(
            f"Invalid device type {_quote(text)}: use 1-64 letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit (e.g. GroupSeries)."
        )
    return text


def type_key(text: str) -> str:
    """The case-insensitive identity of a type: ``Trio`` and ``TRIO`` are one type.

    >>> type_key("TRIO") == type_key("Trio")
    True
    """
    return text.casefold()


def _quote(text: str, limit: int = 64) -> str:
    shown = text if len(text) <= limit else text[:limit] + "…"
    return repr(shown)
