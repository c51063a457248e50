"""The endpoint XML protocol (SPEC section 3, a contract): bytes in, dataclasses out, and back.

Pure functions, no sockets and no database. Requests are parsed by a
hardened lxml parser (no DTD, no entities, no network, bounded depth) and
checked by hand; responses are built with lxml, so every value is escaped.

>>> poll = parse_poll(b'<poll protocol="1"><endpoint serial="8211ABC" type="GroupSeries"'
...                   b' version="6.2.1.1-600021" in-call="true"/></poll>')
>>> poll.endpoint.serial, poll.endpoint.in_call, poll.peripherals
('8211ABC', True, ())
>>> try:
...     parse_poll(b'<poll protocol="2"/>')
... except ProtocolError as e:
...     print(e.code, "|", e.message)
invalid-request | <poll> protocol='2' is not supported; this server speaks protocol 1.

Decisions (the contract is silent on them):

- Any DOCTYPE or ENTITY declaration is refused as ``malformed-xml``, before
  parsing, so entity expansion (billion laughs, XXE) never starts.
- The protocol is UTF-8: invalid UTF-8, NUL bytes (UTF-16/32) and an XML
  declaration naming another encoding are ``malformed-xml``; a UTF-8 BOM is
  accepted. Nesting deeper than :data:`MAX_DEPTH` is ``malformed-xml``.
- ``in-call`` is exactly ``true`` or ``false`` (not ``1``/``0``).
- ``serial``, ``type`` and ``version`` are kept exactly as sent: printable,
  no leading or trailing whitespace, and no whitespace at all in a serial;
  anything else is refused, never repaired. ``model``, ``mac`` and ``tz``
  lose leading and trailing spaces and count as absent when empty.
- ``detail`` is free text (tabs and newlines allowed): longer than
  :data:`MAX_DETAIL` it is cut, ending in ``…``, rather than losing the
  report; C1 control characters (terminal escapes) are refused.
- Two devices with one serial in a poll are refused; a report may name a
  device more than once (the store applies them in order).
- Times given without a timezone are taken as UTC.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from lxml import etree

# The reasons of a <noUpdate> are the decision's words, defined there once.
from dynupdate.core.vocabulary import ReportState

__all__ = [
    "INVALID_REQUEST",
    "MALFORMED_XML",
    "MAX_DEPTH",
    "MAX_DETAIL",
    "MAX_DEVICES",
    "MAX_PERIPHERALS",
    "PROTOCOL",
    "STATES",
    "UNKNOWN_DEVICE",
    "Device",
    "DeviceReport",
    "NoOffer",
    "Offer",
    "Poll",
    "PollEndpoint",
    "ProtocolError",
    "Report",
    "error_document",
    "format_time",
    "hardened_parser",
    "parse_document",
    "parse_poll",
    "parse_report",
    "poll_response",
    "report_response",
]

PROTOCOL = "1"
MALFORMED_XML = "malformed-xml"
INVALID_REQUEST = "invalid-request"
# 409: a report about a device that has never polled (it polls, then reports again).
UNKNOWN_DEVICE = "unknown-device"
# The reports' states come from the one vocabulary, in the order a device goes through them.
STATES = tuple(ReportState)

MAX_DEPTH = 32  # the root is level 1; the protocol itself needs 2
MAX_PERIPHERALS = 64
MAX_DEVICES = 256  # per report
MAX_DETAIL = 2000
_LIMITS = {"serial": 64, "type": 64, "version": 64, "model": 128, "mac": 64, "tz": 64}
_SHOWN = 64  # characters of a bad value quoted in an error message


class ProtocolError(Exception):
    """A document the protocol refuses: ``code`` is ``malformed-xml`` or ``invalid-request``.

    (Or ``invalid-response``: an answer the client half refuses, see
    :mod:`dynupdate.protocol_client`.) ``message`` is one line naming the
    bad element, attribute and value.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# -- requests -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Device:
    """A device as it names itself: a peripheral, or the base of :class:`PollEndpoint`."""

    serial: str
    type: str
    version: str


@dataclass(frozen=True, slots=True)
class PollEndpoint(Device):
    """The polling endpoint; its peripherals share its ``in_call``."""

    model: str | None = None
    mac: str | None = None
    tz: str | None = None
    in_call: bool = False


@dataclass(frozen=True, slots=True)
class Poll:
    endpoint: PollEndpoint
    peripherals: tuple[Device, ...] = ()


@dataclass(frozen=True, slots=True)
class DeviceReport:
    serial: str
    type: str
    version: str
    state: str
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Report:
    devices: tuple[DeviceReport, ...]


_local = threading.local()
_DECLARED_ENCODING = re.compile(rb"<\?xml[^>]*?\sencoding\s*=\s*([\"'])(.*?)\1", re.DOTALL)
_C1 = re.compile(r"[\x7f-\x9f]")
_BOM = b"\xef\xbb\xbf"


def _parser() -> etree.XMLParser:
    # lxml parsers are not thread-safe; one per thread, reused, is also the fast way.
    try:
        return _local.parser
    except AttributeError:
        _local.parser = etree.XMLParser(
            encoding="utf-8",  # ignore what the bytes claim: checked by hand below
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            dtd_validation=False,
            remove_comments=True,
            remove_pis=True,
            huge_tree=False,
            collect_ids=False,
        )
        return _local.parser


hardened_parser = _parser  # public, for anyone reading protocol XML outside parse_document


def _too_deep(root: etree._Element) -> bool:
    for child in root:
        if len(child):
            break
    else:
        return False  # the usual case: depth 2 at most, nothing to walk
    try:
        check = _local.too_deep
    except AttributeError:
        check = _local.too_deep = etree.XPath("boolean(" + "/".join(["*"] * MAX_DEPTH) + ")")
    return bool(check(root))


def _show(value: str) -> str:
    """A value for an error message: cut to 64 characters, quoted, controls escaped."""
    if len(value) > _SHOWN:
        value = value[:_SHOWN] + "…"
    return repr(value)


def parse_document(
    body: bytes | bytearray | memoryview | str, what: str = "request"
) -> etree._Element:
    """The root element of a protocol document, read by the one hardened guard and parser.

    Both halves read with it: the server its requests, the reference
    endpoint its answers. Refused as ``malformed-xml``: empty, not UTF-8, a
    DOCTYPE or ENTITY declaration (before parsing, so no entity is ever
    expanded), not well-formed, or nested deeper than :data:`MAX_DEPTH`.
    ``what`` names the document in the messages.

    >>> parse_document(b'<?xml version="1.0" encoding="UTF-16"?><poll/>', "answer")
    Traceback (most recent call last):
    ...
    dynupdate.protocol.ProtocolError: malformed-xml: The XML declaration names encoding \
'UTF-16'; send UTF-8.
    """
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")  # lone surrogates fail the check below
    elif not isinstance(body, bytes):
        body = bytes(body)
    if body.startswith(_BOM):
        body = body[3:]
    if not body or body.isspace():
        raise ProtocolError(MALFORMED_XML, f"The {what} body is empty.")
    try:
        if not body.isascii():  # ASCII is UTF-8: only other bytes need the check
            body.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = f"byte 0x{body[e.start]:02x} at offset {e.start}"
        raise ProtocolError(MALFORMED_XML, f"The {what} is not UTF-8: {bad}.") from None
    if b"\x00" in body:
        raise ProtocolError(MALFORMED_XML, f"The {what} contains a NUL byte; send UTF-8 XML.")
    if body.startswith(b"<?xml"):
        declared = _DECLARED_ENCODING.match(body)
        if declared and declared[2].lower() not in (b"utf-8", b"utf8"):
            encoding = declared[2].decode("utf-8")
            raise ProtocolError(
                MALFORMED_XML, f"The XML declaration names encoding {_show(encoding)}; send UTF-8."
            )
    # Refused before parsing: a DTD is never read, so its entities are never expanded.
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise ProtocolError(MALFORMED_XML, "A DOCTYPE or ENTITY declaration is not allowed.")
    try:
        root = etree.fromstring(body, _parser())
    except etree.XMLSyntaxError as e:
        text = (e.msg or str(e) or "unreadable").splitlines()[0]
        raise ProtocolError(MALFORMED_XML, f"Not well-formed XML: {_clean(text)}") from None
    # defence in depth: the check above covers it (lxml-stubs 0.5 lacks DocInfo.doctype)
    if root.getroottree().docinfo.doctype:  # type: ignore[union-attr]
        raise ProtocolError(MALFORMED_XML, "A DOCTYPE or ENTITY declaration is not allowed.")
    if _too_deep(root):
        raise ProtocolError(MALFORMED_XML, f"Elements are nested deeper than {MAX_DEPTH} levels.")
    return root


def _load(body: bytes | bytearray | memoryview | str, name: str) -> etree._Element:
    """Parse ``body`` to its root element, which must be ``<name protocol="1">``."""
    root = parse_document(body)
    if root.tag != name:
        raise ProtocolError(
            INVALID_REQUEST, f"The root element is {_show(str(root.tag))}; expected <{name}>."
        )
    protocol = root.get("protocol")
    if protocol is None:
        raise ProtocolError(INVALID_REQUEST, f"<{name}> is missing attribute protocol.")
    if protocol != PROTOCOL:
        raise ProtocolError(
            INVALID_REQUEST,
            f"<{name}> protocol={_show(protocol)} is not supported; "
            f"this server speaks protocol {PROTOCOL}.",
        )
    return root


def _clean(text: str, limit: int = 200) -> str:
    """One printable line of at most ``limit`` characters (controls escaped)."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "…"


def _required(element: etree._Element, where: str, name: str) -> str:
    value = element.get(name)
    if value is None:
        raise ProtocolError(INVALID_REQUEST, f"{where} is missing attribute {name}.")
    if not value:
        raise ProtocolError(INVALID_REQUEST, f"{where} attribute {name} is empty.")
    _check(value, where, name)
    if value[0] == " " or value[-1] == " ":
        raise ProtocolError(
            INVALID_REQUEST, f"{where} {name}={_show(value)} has leading or trailing spaces."
        )
    return value


def _check(value: str, where: str, name: str) -> None:
    limit = _LIMITS[name]
    if len(value) > limit:
        raise ProtocolError(
            INVALID_REQUEST,
            f"{where} {name}={_show(value)} is {len(value)} characters long; at most {limit}.",
        )
    # isprintable() is False for control, format (e.g. bidi overrides) and
    # separator characters other than the ASCII space.
    if not value.isprintable():
        raise ProtocolError(
            INVALID_REQUEST,
            f"{where} {name}={_show(value)} contains a control or invisible character.",
        )


def _optional(element: etree._Element, where: str, name: str) -> str | None:
    value = element.get(name)
    if value is None:
        return None
    value = value.strip(" ")
    if not value:
        return None
    _check(value, where, name)
    return value


def _serial(element: etree._Element, where: str) -> str:
    serial = _required(element, where, "serial")
    if " " in serial:
        raise ProtocolError(INVALID_REQUEST, f"{where} serial={_show(serial)} contains a space.")
    return serial


def _device(element: etree._Element, where: str) -> Device:
    return Device(
        _serial(element, where),
        _required(element, where, "type"),
        _required(element, where, "version"),
    )


def parse_poll(body: bytes) -> Poll:
    """The :class:`Poll` in a ``POST /poll`` body, or :class:`ProtocolError`.

    >>> poll = parse_poll(b'<poll protocol="1"><endpoint serial="A1" type="Trio" version="7.2"/>'
    ...                   b'<peripheral serial="P1" type="EagleEyeIV" version="1.4.0"/></poll>')
    >>> poll.peripherals
    (Device(serial='P1', type='EagleEyeIV', version='1.4.0'),)
    """
    root = _load(body, "poll")
    endpoints = []
    peripherals = []
    for child in root:
        tag = child.tag
        if tag == "endpoint":
            endpoints.append(child)
        elif tag == "peripheral":
            peripherals.append(child)
            if len(peripherals) > MAX_PERIPHERALS:
                raise ProtocolError(
                    INVALID_REQUEST,
                    f"<poll> has more than {MAX_PERIPHERALS} <peripheral> elements.",
                )
    if len(endpoints) != 1:
        found = "none" if not endpoints else len(endpoints)
        raise ProtocolError(
            INVALID_REQUEST, f"<poll> needs exactly one <endpoint> element; found {found}."
        )
    element = endpoints[0]
    get = element.get
    serial, type_, version = get("serial"), get("type"), get("version")
    model, mac, tz, in_call = get("model"), get("mac"), get("tz"), get("in-call")
    # The usual endpoint passes every check below at once: values present,
    # short, printable, no surrounding (or, in a serial, any) spaces, optional
    # ones absent or already clean. Anything else takes the checks one by one,
    # which refuse, name the first bad value, or clean the optional ones.
    if (
        serial
        and type_
        and version
        and len(serial) <= _LIMITS["serial"]
        and len(type_) <= _LIMITS["type"]
        and len(version) <= _LIMITS["version"]
        and " " not in serial
        and type_[0] != " " != type_[-1]
        and version[0] != " " != version[-1]
        and (serial + type_ + version).isprintable()
        and (in_call is None or in_call == "false" or in_call == "true")
        and (model is None or _clean_optional(model, "model"))
        and (mac is None or _clean_optional(mac, "mac"))
        and (tz is None or _clean_optional(tz, "tz"))
    ):
        endpoint = PollEndpoint(serial, type_, version, model, mac, tz, in_call == "true")
    else:
        endpoint = _endpoint(element)
    if peripherals:
        devices = tuple(_device(p, f"<peripheral> #{i}") for i, p in enumerate(peripherals, 1))
    else:
        devices = ()
    if devices:
        seen = {endpoint.serial}
        for device in devices:
            if device.serial in seen:
                raise ProtocolError(
                    INVALID_REQUEST, f"serial={_show(device.serial)} appears twice in the poll."
                )
            seen.add(device.serial)
    return Poll(endpoint, devices)


def _clean_optional(value: str, name: str) -> bool:
    """Whether an optional value needs no cleaning and passes its checks as it is."""
    return (
        bool(value)
        and value[0] != " " != value[-1]
        and len(value) <= _LIMITS[name]
        and value.isprintable()
    )


def _endpoint(element: etree._Element) -> PollEndpoint:
    where = "<endpoint>"
    in_call = element.get("in-call")
    if in_call is None or in_call == "false":
        in_call_flag = False
    elif in_call == "true":
        in_call_flag = True
    else:
        raise ProtocolError(
            INVALID_REQUEST, f"<endpoint> in-call={_show(in_call)} is not true or false."
        )
    return PollEndpoint(
        _serial(element, where),
        _required(element, where, "type"),
        _required(element, where, "version"),
        _optional(element, where, "model"),
        _optional(element, where, "mac"),
        _optional(element, where, "tz"),
        in_call_flag,
    )


def parse_report(body: bytes) -> Report:
    """The :class:`Report` in a ``POST /report`` body, or :class:`ProtocolError`.

    >>> parse_report(b'<report protocol="1"><device serial="A1" type="Trio" version="7.2"'
    ...              b' state="failed" detail="disk full"/></report>').devices[0].detail
    'disk full'
    """
    root = _load(body, "report")
    reports: list[DeviceReport] = []
    for element in root:
        if element.tag != "device":
            continue
        if len(reports) == MAX_DEVICES:
            raise ProtocolError(
                INVALID_REQUEST, f"<report> has more than {MAX_DEVICES} <device> elements."
            )
        where = f"<device> #{len(reports) + 1}"
        device = _device(element, where)
        state = element.get("state")
        if state is None:
            raise ProtocolError(INVALID_REQUEST, f"{where} is missing attribute state.")
        if state not in STATES:
            raise ProtocolError(
                INVALID_REQUEST,
                f"{where} state={_show(state)} is not one of {', '.join(STATES)}.",
            )
        detail = element.get("detail") or None
        if detail is not None:
            if _C1.search(detail):
                raise ProtocolError(
                    INVALID_REQUEST, f"{where} detail={_show(detail)} contains a control character."
                )
            if len(detail) > MAX_DETAIL:
                detail = detail[: MAX_DETAIL - 1] + "…"
        reports.append(DeviceReport(device.serial, device.type, device.version, state, detail))
    if not reports:
        raise ProtocolError(INVALID_REQUEST, "<report> needs at least one <device> element.")
    return Report(tuple(reports))


# -- responses ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Offer:
    """An ``<update>``: the device should download and install this package."""

    serial: str
    type: str
    version: str
    size: int
    sha256: str
    name: str
    url: str
    activation_key: str | None = None  # the device's key for this version (SPEC section 7)


@dataclass(frozen=True, slots=True)
class NoOffer:
    """A ``<noUpdate>``; ``reason`` a :class:`~dynupdate.core.vocabulary.Reason`.

    ``retry_at`` with ``outside-window`` and ``rate-limited`` (then at least 60 s
    after the answer's ``serverTime``); ``staged`` and ``held`` carry none.
    """

    serial: str
    type: str
    reason: str
    retry_at: datetime | None = None


def format_time(dt: datetime) -> str:
    """ISO-8601 UTC with ``Z``, to the second (a naive time is taken as UTC).

    >>> from datetime import timedelta, timezone
    >>> format_time(datetime(2026, 11, 27, 17, 0, 0, 999999, tzinfo=timezone(timedelta(hours=1))))
    '2026-11-27T16:00:00Z'
    """
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC)
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}Z"
    )


def _document(root: etree._Element) -> bytes:
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def poll_response(
    answers: Sequence[Offer | NoOffer], poll_interval: int, server_time: datetime
) -> bytes:
    """The ``<pollResponse>`` document: one child per answer, in order.

    >>> print(poll_response([NoOffer("A1", "Trio", "in-call")], 3600,
    ...                     datetime(2026, 11, 27, 16, tzinfo=UTC)).decode())
    <?xml version='1.0' encoding='UTF-8'?>
    <pollResponse protocol="1" pollInterval="3600" serverTime="2026-11-27T16:00:00Z"><noUpdate \
serial="A1" type="Trio" reason="in-call"/></pollResponse>
    """
    # One root per thread, emptied and refilled: a new lxml document per answer
    # costs more than all its attributes. serverTime changes once a second.
    try:
        root = _local.response
    except AttributeError:
        root = _local.response = etree.Element(
            "pollResponse", {"protocol": PROTOCOL, "pollInterval": "", "serverTime": ""}
        )
        _local.response_second = _local.response_interval = None
    else:
        del root[:]
    interval = str(int(poll_interval))
    if interval != _local.response_interval:
        root.set("pollInterval", interval)
        _local.response_interval = interval
    second = server_time.replace(microsecond=0) if server_time.microsecond else server_time
    if second != _local.response_second:  # format_time ignores the microseconds
        root.set("serverTime", format_time(server_time))
        _local.response_second = second
    for answer in answers:
        if isinstance(answer, Offer):
            update = etree.SubElement(
                root,
                "update",
                {
                    "serial": answer.serial,
                    "type": answer.type,
                    "version": answer.version,
                    "size": str(int(answer.size)),
                    "sha256": answer.sha256,
                    "name": answer.name,
                    "url": answer.url,
                },
            )
            if answer.activation_key is not None:
                update.set("activationKey", answer.activation_key)
        else:
            attributes = {"serial": answer.serial, "type": answer.type, "reason": answer.reason}
            if answer.retry_at is not None:
                attributes["retryAt"] = format_time(answer.retry_at)
            etree.SubElement(root, "noUpdate", attributes)
    return _document(root)


_REPORT_RESPONSE = _document(etree.Element("reportResponse", protocol=PROTOCOL))


def report_response() -> bytes:
    """The ``<reportResponse protocol="1"/>`` document."""
    return _REPORT_RESPONSE


def error_document(code: str, message: str) -> bytes:
    """The ``<error code message/>`` document; the message is made one printable line.

    >>> error_document("invalid-request", "bad <x> & \\x1b[31m").decode().splitlines()[1]
    '<error code="invalid-request" message="bad &lt;x&gt; &amp; \\\\x1b[31m"/>'
    """
    return _document(etree.Element("error", code=_clean(code), message=_clean(message, 1000)))
