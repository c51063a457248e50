"""Who may speak for a device: the serial a client certificate names (``--bind-serial``).

Under mutual TLS with ``--bind-serial``, an endpoint may poll only as the
serial in its certificate (the subject CN, or any DNS, URI or email SAN
value; Python's ssl shows otherName SANs only as ``<unsupported>``, so they
never count), and report only for that serial and the peripherals registered
under it. A peripheral attached to another endpoint (or itself a registered
endpoint) is not claimed by a poll: it is answered ``forbidden`` on its own,
so that whoever claimed a camera first cannot get its rightful endpoint's
whole poll refused.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["Forbidden", "certificate_names", "check_poll", "check_report"]


class Forbidden(Exception):
    """The client certificate does not allow this request (answered 403)."""


def certificate_names(peer_cert: dict | None) -> frozenset[str]:
    """The names a verified peer certificate (``ssl.getpeercert()``) gives its holder."""
    if not peer_cert:
        return frozenset()
    names = set()
    for rdn in peer_cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.add(value)
    for kind, value in peer_cert.get("subjectAltName", ()):
        if kind in ("DNS", "URI", "email"):
            names.add(value)
    return frozenset(names)


def check_poll(
    names: frozenset[str], endpoint_serial: str, peripherals: Iterable[tuple[str, str | None]]
) -> frozenset[str]:
    """The peripherals this poll may not speak for; :class:`Forbidden` for the endpoint itself.

    ``peripherals``: (serial, who speaks for it now) for each peripheral polled:
    its registered parent, itself for a registered endpoint, None when unknown.

    >>> check_poll(frozenset({"EP"}), "EP", [("CAM", "EP"), ("NEW", None), ("TAKEN", "OTHER")])
    frozenset({'TAKEN'})
    """
    if endpoint_serial not in names:
        raise Forbidden(f"This certificate may not poll for serial {endpoint_serial[:64]!r}.")
    return frozenset(
        serial
        for serial, owner in peripherals
        if serial not in names and owner is not None and owner != endpoint_serial
    )


def check_report(names: frozenset[str], devices: Iterable[tuple[str, str | None]]) -> None:
    """``devices``: (serial, registered parent serial or None) for each reported device."""
    for serial, parent in devices:
        if serial in names or (parent is not None and parent in names):
            continue
        raise Forbidden(f"This certificate may not report for serial {serial[:64]!r}.")
