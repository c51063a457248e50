"""The reference endpoint's one exception."""

from __future__ import annotations

from dynupdate.core.errors import DynupdateError

__all__ = ["EndpointError"]


class EndpointError(DynupdateError):
    """A request or an update step that failed; ``kind`` names the failure for counting.

    Kinds: ``connect``, ``timeout``, ``tls``, ``pin-mismatch``, ``reset`` (the
    connection ended early), ``bad-response``, ``http-<status>``, ``too-large``
    (more bytes than announced), ``size-mismatch``, ``sha256-mismatch``,
    ``storage`` (the device's disk), ``install``.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
