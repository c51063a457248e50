"""What the app and the transport exchange: ``Request``, ``Response``, XML error answers.

The app is a coroutine function ``Request -> Response``; the transport adds
Content-Length, Date and Connection, and answers the requests it refuses
itself with the same XML error document the app uses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import final

__all__ = [
    "ERROR_CODES",
    "App",
    "ErrorBody",
    "FileBody",
    "Request",
    "Response",
    "default_error_body",
    "error_code",
    "error_response",
]

ERROR_CODES = {
    400: "invalid-request",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    411: "length-required",  # a body needs a Content-Length (no chunked bodies)
    413: "too-large",
    414: "invalid-request",
    416: "invalid-request",
    431: "invalid-request",
    500: "internal",
    503: "unavailable",
}


@dataclass(slots=True)
class Request:
    """One HTTP request, as received."""

    method: str  # "GET", "POST", ...
    path: str  # the raw target before "?", exactly as sent (not percent-decoded)
    query: str  # the raw text after "?", "" when none
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "
    body: bytes
    client: tuple[str, int]
    peer_cert: dict | None  # the client certificate (ssl getpeercert()) under mutual TLS


@dataclass(slots=True)
class FileBody:
    """A byte range of a file, streamed as the response body."""

    path: Path
    offset: int
    length: int


@final  # lets `type(x) is not Response` tell it from an awaitable, for mypy too
@dataclass(slots=True)
class Response:
    """What the app answers. The transport adds Content-Length, Date and Connection."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    file: FileBody | None = None  # stream this instead of body
    log: str = ""  # a few words for the access log line


App = Callable[[Request], Awaitable[Response]]
ErrorBody = Callable[[int, str, str], bytes]


def error_code(status: int) -> str:
    """The ``code`` of the XML error document for an HTTP status."""
    return ERROR_CODES.get(status) or ("internal" if status >= 500 else "invalid-request")


def default_error_body(status: int, code: str, message: str) -> bytes:
    """``<error code="…" message="…"/>`` from dynupdate.protocol, built with lxml."""
    from dynupdate.protocol import error_document  # the one place XML answers are built

    return error_document(code, message)


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    *extra: tuple[str, str],
    log: str = "",
) -> Response:
    """An XML error answer (``extra`` headers after its Content-Type; ``log``: see Response)."""
    body = default_error_body(status, code or error_code(status), message)
    return Response(status, [("Content-Type", "application/xml"), *extra], body, log=log)
