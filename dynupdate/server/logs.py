"""The server's log lines, as text (the default) or as one JSON object a line.

Three kinds of line, each led (text) or keyed (JSON, ``"time"``) by an
ISO-8601 UTC time to the second:

- ``access``: one per request: client, method, path, status, bytes sent,
  duration, and a few words from the app (``detail``);
- ``connection``: a connection that failed (a TLS handshake, plain HTTP on the
  HTTPS port, a refusal by a limit), rate limited by the listener;
- ``server``: the server itself (a certificate reloaded or not, a worker
  restarted, an error with its traceback).

JSON lines are ``json.dumps`` with ``ensure_ascii``: whatever a client sent
(quotes, newlines, ESC, bidi overrides) is an escape inside a string, so one
line is always one record and shows nothing a terminal would obey:

    >>> access_json("2026-12-02T13:04:05Z", "192.0.2.7", "POST", '/p"\\n', 200, 312, 1.25, "")
    '{"time": "2026-12-02T13:04:05Z", "kind": "access", "client": "192.0.2.7", \
"method": "POST", "path": "/p\\\\"\\\\n", "status": 200, "bytes": 312, "duration_ms": 1.2, \
"detail": null}'
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from enum import StrEnum

__all__ = [
    "JSONFormatter",
    "LogFormat",
    "access_json",
    "connection_line",
    "printable",
    "server_line",
    "server_log",
    "stamp",
]

# Client-sent text in one line is cut here (a path may be kilobytes long).
MAX_TEXT = 200


class LogFormat(StrEnum):
    """How ``serve`` writes its log lines (``--log-format``)."""

    TEXT = "text"
    JSON = "json"


def stamp(seconds: float | None = None) -> str:
    """ISO 8601 UTC to the second, as every line carries it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def printable(text: str) -> str:
    """``text`` fit for one text line: escapes for what a terminal would obey, 200 characters."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return _cut(text)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "..."


def access_json(
    when: str,
    client: str,
    method: str,
    path: str,
    status: int,
    sent: int,
    ms: float,
    detail: str,
) -> str:
    """One request as a JSON object (the text line's fields, named)."""
    return json.dumps(
        {
            "time": when,
            "kind": "access",
            "client": client,
            "method": _cut(method),
            "path": _cut(path),
            "status": status,
            "bytes": sent,
            "duration_ms": round(ms, 1),
            "detail": _cut(detail) if detail else None,
        }
    )


def connection_line(
    fmt: LogFormat, when: str, client: str | None, what: str, *, not_logged: int = 0
) -> str:
    """A failed connection (``client`` None: the count of those not logged)."""
    if fmt is LogFormat.JSON:
        record: dict[str, object] = {"time": when, "kind": "connection", "client": client,
                                     "message": _cut(what)}  # fmt: skip
        if not_logged:
            record["not_logged"] = not_logged
        return json.dumps(record)
    return f"{when} {what}" if client is None else f"{when} {client} {printable(what)}"


def server_line(fmt: LogFormat, message: str, level: str = "info") -> str:
    """A line about the server itself, made now."""
    when = stamp()
    if fmt is LogFormat.JSON:
        return json.dumps({"time": when, "kind": "server", "level": level, "message": message})
    return f"{when} {message}"


class JSONFormatter(logging.Formatter):
    """Python ``logging`` records (a worker restarted, a traceback) as ``server`` lines."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": stamp(record.created),
            "kind": "server",
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


class _Lines(logging.Handler):
    def __init__(self, write: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.write = write

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record))
        except Exception:
            self.handleError(record)


def server_log(fmt: LogFormat, write: Callable[[str], None]) -> Callable[[str, str], None]:
    """``note(message, level)`` writing ``server`` lines through ``write``.

    In JSON, the ``dynupdate`` loggers' records (warnings and errors) become
    JSON lines through ``write`` too, so that every line is one object.
    """
    if fmt is LogFormat.JSON:
        root = logging.getLogger("dynupdate")
        if not any(isinstance(h, _Lines) for h in root.handlers):
            handler = _Lines(write)
            handler.setFormatter(JSONFormatter())
            root.addHandler(handler)

    def note(message: str, level: str = "info") -> None:
        write(server_line(fmt, message, level))

    return note
