"""What a server's connections share: settings, counters, the open connections.

The listener makes one :class:`ServerState` and hands it to every connection
it accepts; a connection reads and updates only this object, never the
listener's own attributes (as uvicorn's protocols share one ``server_state``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from dynupdate.server.logs import access_json, printable
from dynupdate.server.messages import App, ErrorBody, Response, error_code

__all__ = ["ServerState", "printable"]

logger = logging.getLogger("dynupdate.server")

_READ_BUFFER = 64 * 1024


class ServerState:
    """The settings, counters and live connections one server's connections share."""

    __slots__ = (
        "access_log",
        "app",
        "closing",
        "connections",
        "count",
        "crowded",
        "crowded_keepalive_timeout",
        "date_line",
        "date_second",
        "drained",
        "error_body",
        "json_log",
        "keepalive_timeout",
        "loop",
        "max_body",
        "peer_certs",
        "per_client",
        "plain",
        "read_view",
        "rejected",
        "request_timeout",
        "requests",
        "stamp_second",
        "stamp_text",
        "timeouts",
        "write_timeout",
    )

    def __init__(
        self,
        app: App,
        *,
        plain: bool,
        peer_certs: bool,
        max_body: int,
        request_timeout: float,
        keepalive_timeout: float,
        crowded_keepalive_timeout: float,
        write_timeout: float,
        max_connections: int,
        max_per_client: int | None,
        access_log: Callable[[str], None] | None,
        error_body: ErrorBody,
        json_log: bool = False,
    ) -> None:
        self.app = app
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        self.plain = plain  # no TLS: for tests and behind a TLS-terminating proxy
        self.peer_certs = peer_certs  # mutual TLS: requests carry the client certificate
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.keepalive_timeout = keepalive_timeout
        self.crowded_keepalive_timeout = min(crowded_keepalive_timeout, keepalive_timeout)
        self.write_timeout = write_timeout
        self.access_log = access_log
        self.json_log = json_log  # --log-format json: access lines as JSON objects
        self.error_body = error_body
        self.closing = False
        self.connections: set[Any] = set()  # past connection_made(), not yet lost
        self.count = 0  # accepted and not yet closed, handshakes included
        self.crowded = max(1, max_connections * 3 // 4)  # from here keep-alive is short
        # Open connections per client address, when max_per_client is set.
        self.per_client: dict[str | bytes, int] | None = {} if max_per_client else None
        self.drained: asyncio.Future | None = None  # set by close(): resolved by the last one
        # Reads land in this one buffer, shared by all connections (see Connection.get_buffer).
        self.read_view = memoryview(bytearray(_READ_BUFFER))
        # Counters, for tests and for operators.
        self.requests = 0
        self.rejected = 0  # requests refused by a limit (4xx from the transport)
        self.timeouts = 0  # requests not received, or answers not read, in time
        # The Date header and the log's time stamp, made once a second.
        self.date_second = -1
        self.date_line = ""
        self.stamp_second = -1
        self.stamp_text = ""

    def leave(self, key: str | bytes) -> None:
        """One connection fewer from the client counted under ``key``."""
        per_client = self.per_client
        assert per_client is not None
        left = per_client[key] - 1
        if left:
            per_client[key] = left
        else:
            del per_client[key]

    def stamp(self) -> str:
        """The time now, ISO 8601 UTC to the second (made once a second)."""
        now = int(time.time())
        if now != self.stamp_second:
            self.stamp_second = now
            self.stamp_text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return self.stamp_text

    def error(self, status: int, message: str) -> bytes:
        return self.error_body(status, error_code(status), message)

    def error_response(self, status: int, message: str) -> Response:
        return Response(status, [("Content-Type", "application/xml")], self.error(status, message))

    def internal_error(self) -> Response:
        return self.error_response(
            500, "The server failed on this request; the details are in its log."
        )

    def log_access(
        self, client: str, method: str, path: str, status: int, sent: int, t0: float, log: str
    ) -> None:
        ms = (self.loop.time() - t0) * 1000.0
        if self.json_log:
            line = access_json(self.stamp(), client, method, path, status, sent, ms, log)
        else:
            line = f"{self.stamp()} {client} {method} {printable(path)} {status} {sent} {ms:.1f}ms"
            if log:
                line = f"{line} {log}"
        try:
            self.access_log(line)  # type: ignore[misc]
        except Exception:
            logger.exception("The access log failed")
