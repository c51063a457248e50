"""The one error family of dynupdate's core.

Every message is one sentence naming the bad value and, where there is one,
the fix, so the CLI can print it as it is.
"""

__all__ = [
    "Conflict",
    "DynupdateError",
    "InvalidInput",
    "NotFound",
    "StorageError",
    "one_line",
]


class DynupdateError(Exception):
    """Base of every error the core raises on purpose."""


class InvalidInput(DynupdateError):
    """A value given by an admin or a device is not acceptable."""


class NotFound(DynupdateError):
    """The named object does not exist."""


class Conflict(DynupdateError):
    """The change contradicts the current state (e.g. removing a package a policy needs)."""


class StorageError(DynupdateError):
    """The disk or the database refused (full disk, permissions, locked too long)."""


def one_line(error: BaseException | str) -> str:
    r"""An error's message on one line, never empty: for logs and the CLI's one-line errors.

    >>> one_line(ValueError("bad\n  value"))
    'bad value'
    >>> one_line(KeyError())
    'KeyError'
    """
    text = " ".join(str(error).split())
    return text if text or isinstance(error, str) else type(error).__name__
