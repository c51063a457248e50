"""The client half of the endpoint XML protocol (SPEC section 3): requests out, answers in.

What a device sends and reads, as :mod:`dynupdate.protocol` is what the
server reads and sends: requests are built with lxml, so every value is
escaped; answers go through the same guard and hardened parser as the
server's requests (:func:`dynupdate.protocol.parse_document`: UTF-8 only,
no DTD, no entities, no network, bounded depth). Pure functions, no sockets.

>>> answer = parse_poll_response(b'<pollResponse protocol="1" pollInterval="60" '
...     b'serverTime="2026-11-27T16:00:00Z"><noUpdate serial="A1" type="Trio" '
...     b'reason="outside-window" retryAt="2026-11-27T22:10:00Z"/><future/></pollResponse>')
>>> answer.poll_interval, answer.answers[0].retry_at.isoformat()
(60, '2026-11-27T22:10:00+00:00')

An answer refused is a :class:`~dynupdate.protocol.ProtocolError`:
``malformed-xml`` when it cannot be read, ``invalid-response`` when it is
not the protocol's answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from lxml import etree

from dynupdate.protocol import (
    MAX_DETAIL,
    PROTOCOL,
    Device,
    DeviceReport,
    NoOffer,
    Offer,
    PollEndpoint,
    ProtocolError,
    parse_document,
)

__all__ = [
    "DEFAULT_POLL_INTERVAL",
    "INVALID_RESPONSE",
    "PollAnswer",
    "error_message",
    "parse_poll_response",
    "poll_document",
    "report_document",
]

# Never sent: the client's counterpart of invalid-request, for an answer it refuses.
INVALID_RESPONSE = "invalid-response"
DEFAULT_POLL_INTERVAL = 3600
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True, slots=True)
class PollAnswer:
    """A parsed ``<pollResponse>``: one answer per device, in the poll's order."""

    poll_interval: int
    server_time: datetime
    answers: tuple[Offer | NoOffer, ...]

    def for_serial(self, serial: str) -> Offer | NoOffer | None:
        return next((a for a in self.answers if a.serial == serial), None)


# -- requests -----------------------------------------------------------------------------


def _document(root: etree._Element) -> bytes:
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def poll_document(endpoint: PollEndpoint, peripherals: Sequence[Device]) -> bytes:
    """The ``<poll>`` body for an endpoint and its peripherals.

    >>> poll_document(PollEndpoint("A1", "Trio", "7.2", tz="UTC"), []).decode()[39:]
    '<poll protocol="1"><endpoint serial="A1" type="Trio" version="7.2" tz="UTC" \
in-call="false"/></poll>'
    """
    root = etree.Element("poll", protocol=PROTOCOL)
    attributes = {"serial": endpoint.serial, "type": endpoint.type, "version": endpoint.version}
    for name in ("model", "mac", "tz"):
        value = getattr(endpoint, name)
        if value:
            attributes[name] = value
    attributes["in-call"] = "true" if endpoint.in_call else "false"
    etree.SubElement(root, "endpoint", attributes)
    for device in peripherals:
        etree.SubElement(
            root, "peripheral", serial=device.serial, type=device.type, version=device.version
        )
    return _document(root)


def report_document(reports: Sequence[DeviceReport]) -> bytes:
    """The ``<report>`` body; ``detail`` only when there is one."""
    root = etree.Element("report", protocol=PROTOCOL)
    for r in reports:
        attributes = {"serial": r.serial, "type": r.type, "version": r.version, "state": r.state}
        if r.detail:
            attributes["detail"] = r.detail[:MAX_DETAIL]
        etree.SubElement(root, "device", attributes)
    return _document(root)


# -- answers ------------------------------------------------------------------------------


def _load(body: bytes, name: str) -> etree._Element:
    root = parse_document(body, "server's answer")
    if root.tag != name or root.get("protocol") != PROTOCOL:
        raise ProtocolError(
            INVALID_RESPONSE, f'Expected <{name} protocol="1">, got <{str(root.tag)[:40]}>.'
        )
    return root


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _attribute(element: etree._Element, name: str) -> str:
    value = element.get(name)
    if not value:
        raise ProtocolError(INVALID_RESPONSE, f"<{element.tag}> lacks attribute {name}.")
    return value


def parse_poll_response(body: bytes) -> PollAnswer:
    """The :class:`PollAnswer` in a ``<pollResponse>``; unknown elements are ignored."""
    root = _load(body, "pollResponse")
    try:
        interval = int(root.get("pollInterval", ""))
    except ValueError:
        interval = DEFAULT_POLL_INTERVAL
    interval = min(max(interval, 1), 7 * 86400)
    server_time = _time(root.get("serverTime")) or datetime.now(UTC)
    answers: list[Offer | NoOffer] = []
    for element in root:
        if element.tag == "update":
            try:
                size = int(_attribute(element, "size"))
            except ValueError:
                size = -1
            sha256 = _attribute(element, "sha256")
            url = _attribute(element, "url")
            if size < 0 or not _SHA256.fullmatch(sha256) or not url.startswith("https://"):
                raise ProtocolError(
                    INVALID_RESPONSE,
                    f"<update> for {element.get('serial')!r} has a bad size, sha256 or url.",
                )
            answers.append(
                Offer(
                    _attribute(element, "serial"),
                    _attribute(element, "type"),
                    _attribute(element, "version"),
                    size,
                    sha256.lower(),
                    element.get("name") or sha256.lower(),
                    url,
                    element.get("activationKey") or None,  # for the installer (SPEC section 7)
                )
            )
        elif element.tag == "noUpdate":
            answers.append(
                NoOffer(
                    _attribute(element, "serial"),
                    element.get("type", ""),
                    _attribute(element, "reason"),
                    _time(element.get("retryAt")),
                )
            )
    return PollAnswer(interval, server_time, tuple(answers))


def error_message(body: bytes) -> str:
    """``code: message`` of an ``<error>`` answer; ``""`` when ``body`` is not one.

    >>> error_message(b'<error code="unknown-device" message="Poll first."/>')
    'unknown-device: Poll first.'
    >>> error_message(b"<html>Bad Gateway</html>")
    ''
    """
    try:
        root = parse_document(body, "server's answer")
    except ProtocolError:
        return ""
    if root.tag != "error":
        return ""
    return f"{root.get('code')}: {root.get('message')}"
