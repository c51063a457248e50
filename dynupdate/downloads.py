"""Package downloads: the URL an offer carries, and the answer to a GET of it.

Only packages of the current configuration are served, by their SHA-256 (any
case in the URL, lowercase on disk and in the ETag); ``file_response`` does the
conditional and range requests.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

from dynupdate.core.store import PackageStore, canonical_sha256
from dynupdate.server.files import file_response
from dynupdate.server.messages import Request, Response, error_response

__all__ = ["Downloads"]

# A Host header is echoed into package URLs only when it is a plain host[:port].
_HOST = re.compile(
    r"(?:[A-Za-z0-9-]{1,63}\.)*[A-Za-z0-9-]{1,63}(?::\d{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](?::\d{1,5})?"
)


class Addresses(Protocol):
    """Where package URLs point (``serve --public-url``, ``--package-url``)."""

    public_url: str | None
    package_url: str | None
    fallback_base: str


class Downloads:
    """Package URLs for offers, and the answers to their GET and HEAD requests."""

    def __init__(
        self, store: PackageStore, addresses: Addresses, known: Callable[[str], bool]
    ) -> None:
        self.store = store
        self.addresses = addresses
        self.known = known  # whether a package of the configuration has this hash
        self._bases: dict[str, str] = {}  # package URL base per Host header

    def url(self, request: Request, sha256: str) -> str:
        """The URL an offer of the package with this hash carries."""
        if self.addresses.package_url:
            return f"{self.addresses.package_url.rstrip('/')}/{sha256[:2]}/{sha256}"
        if self.addresses.public_url:
            return self._base(request) + sha256
        host = request.headers.get("host", "")
        base = self._bases.get(host)
        if base is None:
            if len(self._bases) >= 256:  # Host is the client's to choose: stay small
                self._bases.clear()
            base = self._bases[host] = self._base(request)
        return base + sha256

    def answer(self, request: Request) -> Response:
        """The answer to a request for ``/packages/SHA256``."""
        if request.method not in ("GET", "HEAD"):
            return error_response(
                405, "Use GET or HEAD on packages.", "method-not-allowed", ("Allow", "GET, HEAD"),
                log="method-not-allowed",
            )  # fmt: skip
        sha256 = canonical_sha256(request.path[len("/packages/") :])  # ETag and file: lowercase
        if sha256 is None or not self.known(sha256):
            return error_response(404, "No such package.", "not-found", log="not-found")
        path = self.store.path_for(sha256)
        if not path.is_file():
            return error_response(404, "No such package.", "not-found", log="not-found")
        return file_response(request, path, sha256)

    def _base(self, request: Request) -> str:
        if self.addresses.public_url:
            return self.addresses.public_url.rstrip("/") + "/packages/"
        host = request.headers.get("host", "")
        if _HOST.fullmatch(host):
            return f"https://{host}/packages/"
        return self.addresses.fallback_base.rstrip("/") + "/packages/"
