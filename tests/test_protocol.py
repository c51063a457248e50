"""The endpoint XML protocol (SPEC section 3): parsing, refusals, responses."""

from __future__ import annotations

import doctest
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from dynupdate import protocol
from dynupdate.protocol import (
    INVALID_REQUEST,
    MALFORMED_XML,
    Device,
    DeviceReport,
    NoOffer,
    Offer,
    Poll,
    PollEndpoint,
    ProtocolError,
    Report,
    error_document,
    format_time,
    parse_poll,
    parse_report,
    poll_response,
    report_response,
)

SPEC_POLL = b"""<poll protocol="1">
  <endpoint serial="8211ABC" type="GroupSeries" version="6.2.1.1-600021"
            model="RealPresence Group 500" in-call="false"/>
  <peripheral serial="EE4-17" type="EagleEyeIV" version="1.4.0"/>
</poll>"""

SPEC_REPORT = b"""<report protocol="1">
  <device serial="8211ABC" type="GroupSeries" version="6.2.2.0-100"
          state="installed" detail="optional free text"/>
</report>"""

SPEC_POLL_PARSED = Poll(
    PollEndpoint("8211ABC", "GroupSeries", "6.2.1.1-600021", "RealPresence Group 500",
                 None, None, False),
    (Device("EE4-17", "EagleEyeIV", "1.4.0"),),
)
BASIC = Poll(PollEndpoint("A1", "Trio", "7.2"), (Device("P1", "Cam", "1.0"),))
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
NOW = datetime(2026, 11, 27, 16, 0, 0, tzinfo=UTC)

SCHEMA = etree.XMLSchema(
    etree.fromstring(resources.files("dynupdate").joinpath("protocol.xsd").read_bytes())
)


@pytest.fixture
def home_dir():
    """Overrides conftest's autouse home: the protocol touches no disk (and stays fast)."""
    return None


def endpoint_poll(endpoint: str = 'serial="A1" type="Trio" version="7.2"', rest: str = "") -> bytes:
    return f'<poll protocol="1"><endpoint {endpoint}/>{rest}</poll>'.encode()


def device_report(attributes: str = 'serial="A1" type="Trio" version="7.2" state="installed"'):
    return f'<report protocol="1"><device {attributes}/></report>'.encode()


def refused(parse, body, code: str, *words: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse(body)
    error = caught.value
    assert error.code == code, error.message
    for word in words:
        assert word in error.message, error.message
    assert "\n" not in error.message and error.message.isprintable()
    assert len(error.message) < 300
    return error


# -- the spec's examples ------------------------------------------------------------------


def test_spec_poll_example():
    assert parse_poll(SPEC_POLL) == SPEC_POLL_PARSED


def test_spec_report_example():
    assert parse_report(SPEC_REPORT) == Report(
        (DeviceReport("8211ABC", "GroupSeries", "6.2.2.0-100", "installed", "optional free text"),)
    )


@pytest.mark.parametrize("body", [SPEC_POLL, SPEC_REPORT])
def test_spec_requests_match_the_schema(body):
    assert SCHEMA.validate(etree.fromstring(body)), SCHEMA.error_log


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ('serial="A1" type="Trio" version="7.2"', PollEndpoint("A1", "Trio", "7.2")),
        ('serial="A1" type="Trio" version="7.2" in-call="true"',
         PollEndpoint("A1", "Trio", "7.2", in_call=True)),
        ('serial="A1" type="Trio" version="7.2" in-call="false" tz="Europe/Paris"'
         ' mac="00:e0:db:11:22:33"',
         PollEndpoint("A1", "Trio", "7.2", mac="00:e0:db:11:22:33", tz="Europe/Paris")),
        # Optional descriptive fields lose edge spaces; empty means absent.
        ('serial="A1" type="Trio" version="7.2" model="  Trio 8800 " tz="" mac=" "',
         PollEndpoint("A1", "Trio", "7.2", model="Trio 8800")),
        # Spaces inside type and version are kept.
        ('serial="A1" type="Group Series" version="5.2.0 PVR"',
         PollEndpoint("A1", "Group Series", "5.2.0 PVR")),
    ],
)
def test_endpoint_fields(endpoint, expected):
    assert parse_poll(endpoint_poll(endpoint)) == Poll(expected, ())


@pytest.mark.parametrize(
    "prefix",
    [b"", b"\xef\xbb\xbf", b'<?xml version="1.0"?>\n', b'<?xml version="1.0" encoding="UTF-8"?>',
     b"\xef\xbb\xbf<?xml version='1.0' encoding='utf-8' standalone='yes'?>\n",
     b"<!-- a comment -->\n<?some-pi x?>\n"],
)
def test_accepted_prologs(prefix):
    assert parse_poll(prefix + SPEC_POLL) == SPEC_POLL_PARSED


def test_str_is_accepted_as_utf8():
    assert parse_poll(SPEC_POLL.decode()) == SPEC_POLL_PARSED


# -- forward compatibility ----------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'<poll protocol="1" firmwareChannel="beta">'
        b'<endpoint serial="A1" type="Trio" version="7.2" color="red" SERIAL="x"/>'
        b'<peripheral serial="P1" type="Cam" version="1.0" in-call="maybe"/></poll>',
        # unknown child elements of the root, with content of their own
        b'<poll protocol="1"><capabilities><codec name="h264"><x/></codec></capabilities>'
        b'<endpoint serial="A1" type="Trio" version="7.2"><future a="1"/>text</endpoint>'
        b'<Endpoint serial="B2" type="x" version="y"/>'
        b'<peripheral serial="P1" type="Cam" version="1.0"/><PERIPHERAL/></poll>',
        # text, comments, CDATA, namespaced extensions, peripheral first
        b'<poll protocol="1" xmlns:x="urn:ext">hello'
        b'<peripheral serial="P1" type="Cam" version="1.0"/><!-- note -->'
        b"<![CDATA[ <endpoint/> ]]><x:endpoint serial='Z' type='Z' version='Z'/>"
        b'<endpoint serial="A1" type="Trio" version="7.2" x:in-call="true"/>tail</poll>',
    ],
)
def test_unknown_attributes_elements_and_text_are_ignored(body):
    assert parse_poll(body) == BASIC


def test_unknown_parts_of_a_report_are_ignored():
    body = (b'<report protocol="1" batch="7"><summary/>'
            b'<device serial="A1" type="Trio" version="7.2" state="failed" progress="40">'
            b"<log>lots</log></device>text</report>")
    assert parse_report(body) == Report((DeviceReport("A1", "Trio", "7.2", "failed", None),))


def test_nesting_up_to_the_limit_is_accepted():
    nested = "<x>" * (protocol.MAX_DEPTH - 1) + "</x>" * (protocol.MAX_DEPTH - 1)
    assert parse_poll(endpoint_poll(rest=nested)).endpoint.serial == "A1"


# -- refusals: structure ------------------------------------------------------------------

MISSING = [
    (parse_poll, b'<poll><endpoint serial="A" type="T" version="1"/></poll>', "protocol"),
    (parse_poll, endpoint_poll('type="T" version="1"'), "serial"),
    (parse_poll, endpoint_poll('serial="A" version="1"'), "type"),
    (parse_poll, endpoint_poll('serial="A" type="T"'), "version"),
    (parse_poll, endpoint_poll(rest='<peripheral type="T" version="1"/>'), "serial"),
    (parse_poll, endpoint_poll(rest='<peripheral serial="P" version="1"/>'), "type"),
    (parse_poll, endpoint_poll(rest='<peripheral serial="P" type="T"/>'), "version"),
    (parse_report, b'<report><device serial="A" type="T" version="1" state="failed"/></report>',
     "protocol"),
    (parse_report, device_report('type="T" version="1" state="failed"'), "serial"),
    (parse_report, device_report('serial="A" version="1" state="failed"'), "type"),
    (parse_report, device_report('serial="A" type="T" state="failed"'), "version"),
    (parse_report, device_report('serial="A" type="T" version="1"'), "state"),
]


@pytest.mark.parametrize(("parse", "body", "attribute"), MISSING)
def test_missing_required_attribute(parse, body, attribute):
    refused(parse, body, INVALID_REQUEST, f"missing attribute {attribute}")


@pytest.mark.parametrize(("parse", "body", "attribute"), MISSING[1:7] + MISSING[8:])
def test_empty_required_attribute(parse, body, attribute):
    head, _, tail = body.rpartition(b"/>")  # the element that lacks the attribute is last
    body = head + f' {attribute}=""/>'.encode() + tail
    refused(parse, body, INVALID_REQUEST, attribute)


@pytest.mark.parametrize(
    ("parse", "body", "shown"),
    [
        (parse_poll, b'<Poll protocol="1"/>', "'Poll'"),
        (parse_poll, b'<POLL protocol="1"/>', "'POLL'"),
        (parse_poll, SPEC_REPORT, "'report'"),
        (parse_poll, b'<poll xmlns="urn:x" protocol="1"/>', "{urn:x}poll"),
        (parse_poll, b'<p:poll xmlns:p="urn:x" protocol="1"/>', "{urn:x}poll"),
        (parse_report, SPEC_POLL, "'poll'"),
        (parse_report, b'<reportResponse protocol="1"/>', "reportResponse"),
    ],
)
def test_wrong_root(parse, body, shown):
    refused(parse, body, INVALID_REQUEST, "root element", shown)


@pytest.mark.parametrize("value", ["2", "1.0", "", " 1", "01", "one"])
@pytest.mark.parametrize("parse", [parse_poll, parse_report])
def test_wrong_protocol(parse, value):
    root = "poll" if parse is parse_poll else "report"
    body = f'<{root} protocol="{value}"/>'.encode()
    refused(parse, body, INVALID_REQUEST, "protocol", repr(value))


@pytest.mark.parametrize(
    ("rest", "found"),
    [("", None), ('<endpoint serial="B" type="T" version="1"/>', "found 2")],
)
def test_endpoint_count(rest, found):
    body = (f'<poll protocol="1">{rest}<endpoint serial="A" type="T" version="1"/></poll>'
            if rest else '<poll protocol="1"><peripheral serial="P" type="T" version="1"/></poll>')
    refused(parse_poll, body.encode(), INVALID_REQUEST, "exactly one <endpoint>", found or "none")


@pytest.mark.parametrize("value", ["1", "0", "TRUE", "False", "yes", "", " true"])
def test_bad_in_call(value):
    refused(parse_poll, endpoint_poll(f'serial="A" type="T" version="1" in-call="{value}"'),
            INVALID_REQUEST, "in-call", repr(value))


@pytest.mark.parametrize("state", protocol.STATES)
def test_every_state(state):
    body = device_report(f'serial="A" type="T" version="1" state="{state}"')
    assert parse_report(body).devices[0].state == state


@pytest.mark.parametrize("state", ["Installed", "INSTALLED", "done", "", "installed "])
def test_bad_state(state):
    body = device_report(f'serial="A" type="T" version="1" state="{state}"')
    refused(parse_report, body, INVALID_REQUEST, "state", repr(state))


def test_duplicate_serials_in_a_poll():
    refused(parse_poll, endpoint_poll(rest='<peripheral serial="A1" type="Cam" version="1"/>'),
            INVALID_REQUEST, "'A1'", "twice")
    twins = '<peripheral serial="P" type="Cam" version="1"/>' * 2
    refused(parse_poll, endpoint_poll(rest=twins), INVALID_REQUEST, "'P'", "twice")


def test_a_report_may_repeat_a_device():
    body = (b'<report protocol="1"><device serial="A" type="T" version="2" state="downloading"/>'
            b'<device serial="A" type="T" version="2" state="installing"/></report>')
    assert [d.state for d in parse_report(body).devices] == ["downloading", "installing"]


def test_peripheral_limit():
    def body(n):
        rest = "".join(f'<peripheral serial="P{i}" type="Cam" version="1"/>' for i in range(n))
        return endpoint_poll(rest=rest)

    assert len(parse_poll(body(protocol.MAX_PERIPHERALS)).peripherals) == protocol.MAX_PERIPHERALS
    refused(parse_poll, body(protocol.MAX_PERIPHERALS + 1), INVALID_REQUEST, "peripheral", "64")


def test_device_limits():
    def body(n):
        devices = "".join(f'<device serial="D{i}" type="T" version="1" state="installed"/>'
                          for i in range(n))
        return f'<report protocol="1">{devices}</report>'.encode()

    assert len(parse_report(body(protocol.MAX_DEVICES)).devices) == protocol.MAX_DEVICES
    refused(parse_report, body(protocol.MAX_DEVICES + 1), INVALID_REQUEST, "device", "256")
    refused(parse_report, body(0), INVALID_REQUEST, "at least one <device>")


# -- refusals: hostile or broken XML ------------------------------------------------------

ENDPOINT = b'<endpoint serial="A" type="T" version="1"/>'
BILLION_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE poll [<!ENTITY lol "lol">'
    + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
               for i in range(1, 10))
    + b']><poll protocol="1">&lol9;' + ENDPOINT + b"</poll>"
)
HOSTILE = {
    "doctype": b'<!DOCTYPE poll><poll protocol="1">' + ENDPOINT + b"</poll>",
    "internal-entity": b'<!DOCTYPE poll [<!ENTITY s "8211">]><poll protocol="1">'
    b'<endpoint serial="&s;" type="T" version="1"/></poll>',
    "xxe": b'<?xml version="1.0"?><!DOCTYPE poll [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    b'<poll protocol="1"><endpoint serial="&x;" type="T" version="1"/></poll>',
    "xxe-network": b'<!DOCTYPE poll [<!ENTITY x SYSTEM "http://127.0.0.1:9/x">]>'
    b'<poll protocol="1">&x;' + ENDPOINT + b"</poll>",
    "parameter-entity": b'<!DOCTYPE poll [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>'
    b'<poll protocol="1">' + ENDPOINT + b"</poll>",
    "external-dtd": b'<!DOCTYPE poll SYSTEM "http://127.0.0.1:9/poll.dtd"><poll protocol="1">'
    + ENDPOINT + b"</poll>",
    "billion-laughs": BILLION_LAUGHS,
    "quadratic-blowup": b'<!DOCTYPE poll [<!ENTITY a "' + b"x" * 20_000 + b'">]><poll protocol="1">'
    + b"&a;" * 2_000 + ENDPOINT + b"</poll>",
    "doctype-after-comment": b'<!-- <poll> --><!DOCTYPE poll [<!ENTITY x "y">]>'
    b'<poll protocol="1">' + ENDPOINT + b"</poll>",
}


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("parse", [parse_poll, parse_report])
def test_dtds_and_entities_are_refused_fast(parse, name):
    started = time.perf_counter()
    error = refused(parse, HOSTILE[name], MALFORMED_XML, "DOCTYPE")
    assert time.perf_counter() - started < 1
    assert "root:" not in error.message


def test_depth_300_is_refused_fast():
    body = b'<poll protocol="1">' + ENDPOINT + b"<x>" * 300 + b"</x>" * 300 + b"</poll>"
    started = time.perf_counter()
    refused(parse_poll, body, MALFORMED_XML)
    assert time.perf_counter() - started < 0.1


@pytest.mark.parametrize("depth", [protocol.MAX_DEPTH + 1, 100, 255])
def test_nesting_beyond_the_limit(depth):
    body = endpoint_poll(rest="<x>" * (depth - 1) + "</x>" * (depth - 1))
    refused(parse_poll, body, MALFORMED_XML, "nested deeper than 32")


BROKEN = {
    "empty": b"",
    "blank": b" \r\n\t ",
    "bom-only": b"\xef\xbb\xbf",
    "truncated": SPEC_POLL[: len(SPEC_POLL) // 2],
    "unclosed": b'<poll protocol="1">' + ENDPOINT,
    "not-xml": b"serial=8211ABC&type=GroupSeries",
    "json": b'{"poll": {"protocol": 1}}',
    "html": b"<html><body><p>hi</html>",
    "two-roots": SPEC_POLL + SPEC_POLL,
    "trailing-garbage": SPEC_POLL + b"garbage",
    "undefined-entity": b'<poll protocol="1"><endpoint serial="&x;" type="T" version="1"/></poll>',
    "mismatched-quote": b'<poll protocol="1\'>' + ENDPOINT + b"</poll>",
    "invalid-utf8": b'<poll protocol="1"><endpoint serial="\xff\xfe" type="T" version="1"/></poll>',
    "overlong-utf8": b'<poll protocol="1"><endpoint serial="\xc0\xaf" type="T" version="1"/>'
    b"</poll>",
    "utf8-surrogate": b'<poll protocol="1"><endpoint serial="\xed\xa0\x80" type="T" version="1"/>'
    b"</poll>",
    "latin-1-bytes": '<poll protocol="1"><endpoint serial="é" type="T" version="1"/></poll>'.encode(
        "latin-1"),
    "latin-1-declaration": b'<?xml version="1.0" encoding="latin-1"?>' + SPEC_POLL,
    "iso-8859-1-declaration": b"<?xml version='1.0' encoding='ISO-8859-1'?>" + SPEC_POLL,
    "ascii-declaration": b'<?xml version="1.0" encoding="US-ASCII"?>' + SPEC_POLL,
    "utf-16-declaration": b'<?xml version="1.0" encoding="UTF-16"?>' + SPEC_POLL,
    "utf-16": '<?xml version="1.0" encoding="UTF-16"?>'.encode("utf-16") + SPEC_POLL.decode()
    .encode("utf-16"),
    "utf-16le-no-bom": SPEC_POLL.decode().encode("utf-16-le"),
    "utf-32": SPEC_POLL.decode().encode("utf-32"),
    "nul-byte": SPEC_POLL.replace(b"8211ABC", b"8211\x00ABC"),
    "forbidden-char-reference": endpoint_poll('serial="A&#1;" type="T" version="1"'),
    "raw-control-char": endpoint_poll('serial="A\x1b[31m" type="T" version="1"'),
    "declaration-not-first": b' <?xml version="1.0"?>' + SPEC_POLL,
}


@pytest.mark.parametrize("name", BROKEN)
@pytest.mark.parametrize("parse", [parse_poll, parse_report])
def test_broken_documents_are_malformed(parse, name):
    refused(parse, BROKEN[name], MALFORMED_XML)


def test_encoding_refusals_say_why():
    refused(parse_poll, BROKEN["latin-1-declaration"], MALFORMED_XML, "'latin-1'", "UTF-8")
    refused(parse_poll, BROKEN["invalid-utf8"], MALFORMED_XML, "UTF-8", "0xff")
    refused(parse_poll, BROKEN["empty"], MALFORMED_XML, "empty")


# -- refusals: field values ---------------------------------------------------------------

FIELDS = {"serial": 64, "type": 64, "version": 64, "model": 128, "mac": 64, "tz": 64}


def with_value(name: str, value: str) -> bytes:
    attributes = {"serial": "A", "type": "T", "version": "1", name: value}
    element = etree.Element("endpoint", attributes)
    return b'<poll protocol="1">' + etree.tostring(element) + b"</poll>"


@pytest.mark.parametrize(("name", "limit"), FIELDS.items())
def test_length_limits(name, limit):
    assert getattr(parse_poll(with_value(name, "x" * limit)).endpoint, name) == "x" * limit
    refused(parse_poll, with_value(name, "x" * (limit + 1)), INVALID_REQUEST, name, str(limit))
    error = refused(parse_poll, with_value(name, "y" * 10_000), INVALID_REQUEST, name, "10000")
    assert "y" * 64 + "…" in error.message and "y" * 65 not in error.message


@pytest.mark.parametrize("name", ["serial", "type", "version"])
@pytest.mark.parametrize("value", [" A", "A ", " "])
def test_edge_spaces_are_refused_in_identifiers(name, value):
    refused(parse_poll, with_value(name, value), INVALID_REQUEST, name)


@pytest.mark.parametrize("value", ["82 11", "8211\u00a0ABC", "8211\u3000ABC"])
def test_serials_have_no_whitespace(value):
    refused(parse_poll, with_value("serial", value), INVALID_REQUEST, "serial")


def test_xml_attribute_normalization_still_refused():
    # A literal tab or newline in an attribute becomes a space (XML 1.0, section 3.3.3).
    refused(parse_poll, endpoint_poll('serial="A\tB" type="T" version="1"'), INVALID_REQUEST,
            "serial", "space")
    refused(parse_poll, endpoint_poll('serial="A" type="T" version="1\n"'), INVALID_REQUEST,
            "version", "spaces")


@pytest.mark.parametrize("name", ["serial", "type", "version", "model", "mac", "tz"])
@pytest.mark.parametrize(
    ("reference", "escaped"),
    [("&#9;", r"\t"), ("&#10;", r"\n"), ("&#13;", r"\r"), ("&#x7f;", r"\x7f"),
     ("&#x85;", r"\x85"), ("&#x9b;", r"\x9b"), ("&#x200b;", r"\u200b"), ("&#x202e;", r"\u202e"),
     ("&#xfeff;", r"\ufeff"), ("&#x2028;", r"\u2028"), ("&#xe000;", r"\ue000")],
)
def test_control_and_invisible_characters_are_refused(name, reference, escaped):
    attributes = {"serial": "A", "type": "T", "version": "1"}
    attributes[name] = f"x{reference}y"
    text = " ".join(f'{k}="{v}"' for k, v in attributes.items())
    error = refused(parse_poll, endpoint_poll(text), INVALID_REQUEST, name, "control")
    assert escaped in error.message


@pytest.mark.parametrize(
    ("name", "value"),
    [("serial", "٨٢١١"), ("serial", "\uff18\uff12\uff11\uff11\uff21"),
     ("version", "\uff16.\uff12.\u0967"), ("type", "会議室"),
     ("model", "Salle de réunion « 3 »"), ("tz", "America/Argentina/Buenos_Aires"),
     ("serial", "<>&\"'"), ("serial", "😀")],
)
def test_unicode_values_are_kept_verbatim(name, value):
    assert getattr(parse_poll(with_value(name, value)).endpoint, name) == value


@pytest.mark.parametrize(
    ("detail", "expected"),
    [
        ("", None),
        ("line one\nline two\ttabbed", "line one\nline two\ttabbed"),
        ("x" * 2000, "x" * 2000),
        ("x" * 10_000, "x" * 1999 + "…"),
    ],
)
def test_detail_is_kept_or_cut(detail, expected):
    device = etree.Element("device", serial="A", type="T", version="1", state="failed",
                           detail=detail)
    body = b'<report protocol="1">' + etree.tostring(device) + b"</report>"
    assert parse_report(body).devices[0].detail == expected


@pytest.mark.parametrize("reference", ["&#x85;", "&#x9b;", "&#x7f;"])
def test_detail_refuses_c1_controls(reference):
    body = device_report(f'serial="A" type="T" version="1" state="failed" detail="x{reference}"')
    refused(parse_report, body, INVALID_REQUEST, "detail", "control")


# -- responses ----------------------------------------------------------------------------


def attributes_of(element) -> list[tuple[str, str]]:
    return list(element.attrib.items())


def test_spec_poll_response():
    offer = Offer("8211ABC", "GroupSeries", "6.2.2.0-100", 734003200, SHA, "gs-6.2.2.pup",
                  f"https://host:8443/packages/{SHA}")
    body = poll_response([offer, NoOffer("EE4-17", "EagleEyeIV", "up-to-date")], 3600, NOW)
    assert body.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    root = etree.fromstring(body)
    assert root.tag == "pollResponse"
    assert attributes_of(root) == [("protocol", "1"), ("pollInterval", "3600"),
                                   ("serverTime", "2026-11-27T16:00:00Z")]
    update, no_update = root
    assert update.tag == "update"
    assert attributes_of(update) == [
        ("serial", "8211ABC"), ("type", "GroupSeries"), ("version", "6.2.2.0-100"),
        ("size", "734003200"), ("sha256", SHA), ("name", "gs-6.2.2.pup"),
        ("url", f"https://host:8443/packages/{SHA}"),
    ]
    assert no_update.tag == "noUpdate"
    assert attributes_of(no_update) == [("serial", "EE4-17"), ("type", "EagleEyeIV"),
                                        ("reason", "up-to-date")]
    assert SCHEMA.validate(root), SCHEMA.error_log


@pytest.mark.parametrize(
    ("answer", "retry_at"),
    [
        (NoOffer("A", "T", "outside-window", datetime(2026, 11, 28, 2, 17, 5, 123, tzinfo=UTC)),
         "2026-11-28T02:17:05Z"),
        (NoOffer("A", "T", "no-policy"), None),
        (NoOffer("A", "T", "in-call"), None),
        (NoOffer("A", "T", "up-to-date"), None),
        (NoOffer("A", "T", "paused-by-admin"), None),
    ],
)
def test_retry_at_only_when_given(answer, retry_at):
    root = etree.fromstring(poll_response([answer], 600, NOW))
    assert root.get("serverTime").endswith("Z")
    assert root[0].get("retryAt") == retry_at
    assert root[0].get("reason") == answer.reason
    assert SCHEMA.validate(root), SCHEMA.error_log


def test_answers_keep_the_polls_order():
    answers = [NoOffer(f"S{i}", "T", "up-to-date") for i in range(10)]
    root = etree.fromstring(poll_response(answers, 60, NOW))
    assert [child.get("serial") for child in root] == [f"S{i}" for i in range(10)]


NASTY = "<>&\"' ]]> &amp; \u00e9\u4f1a😀 \t\n\r "


def test_response_values_are_escaped():
    offer = Offer(NASTY, NASTY, NASTY, 1, SHA, NASTY, f"https://h/p?a=1&b=<{NASTY}>")
    body = poll_response([offer, NoOffer(NASTY, NASTY, "in-call")], 1, NOW)
    update, no_update = etree.fromstring(body)
    for key in ("serial", "type", "version", "name"):
        assert update.get(key) == NASTY
    assert update.get("url") == f"https://h/p?a=1&b=<{NASTY}>"
    assert (no_update.get("serial"), no_update.get("type")) == (NASTY, NASTY)


def test_report_response():
    body = report_response()
    root = etree.fromstring(body)
    assert (root.tag, attributes_of(root), len(root)) == ("reportResponse", [("protocol", "1")], 0)
    assert body == b"<?xml version='1.0' encoding='UTF-8'?>\n<reportResponse protocol=\"1\"/>"
    assert SCHEMA.validate(root)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("plain", "plain"),
        (NASTY, "<>&\"' ]]> &amp; \u00e9\u4f1a😀 \\t\\n\\r "),
        ("ESC \x1b[31m red, NUL \x00, C1 \x9b", "ESC \\x1b[31m red, NUL \\x00, C1 \\x9b"),
        ("z" * 5000, "z" * 1000 + "…"),
    ],
)
def test_error_document(message, expected):
    root = etree.fromstring(error_document("invalid-request", message))
    assert (root.tag, root.get("code"), root.get("message")) == ("error", "invalid-request",
                                                                 expected)
    assert SCHEMA.validate(root)


def test_a_refusal_becomes_an_error_document():
    with pytest.raises(ProtocolError) as caught:
        parse_poll(endpoint_poll('serial="A" type="T" version="1" in-call="&lt;&#x85;&gt;"'))
    root = etree.fromstring(error_document(caught.value.code, caught.value.message))
    assert root.get("message") == "<endpoint> in-call='<\\x85>' is not true or false."


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2026, 11, 27, 16, 0, 0, tzinfo=UTC), "2026-11-27T16:00:00Z"),
        (datetime(2026, 11, 27, 16, 0, 59, 999_999, tzinfo=UTC), "2026-11-27T16:00:59Z"),
        (datetime(2026, 11, 27, 17, 30, tzinfo=timezone(timedelta(hours=1, minutes=30))),
         "2026-11-27T16:00:00Z"),
        (datetime(2026, 11, 27, 23, 0, tzinfo=timezone(timedelta(hours=-5))),
         "2026-11-28T04:00:00Z"),
        (datetime(2026, 11, 27, 16, 0, 0), "2026-11-27T16:00:00Z"),  # naive: taken as UTC
        (datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC), "0999-01-02T03:04:05Z"),
    ],
)
def test_format_time(moment, text):
    assert format_time(moment) == text


# -- properties ---------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_protocol_errors(body):
    for parse in (parse_poll, parse_report):
        try:
            parse(body)
        except ProtocolError as e:
            assert e.code in (MALFORMED_XML, INVALID_REQUEST)
            assert "\n" not in e.message


@settings(max_examples=300)
@given(st.text(max_size=200), st.sampled_from(["", "<poll protocol='1'>", '<report protocol="1">',
                                                '<poll protocol="1"><endpoint serial="']))
def test_arbitrary_text_raises_only_protocol_errors(text, prefix):
    for parse in (parse_poll, parse_report):
        for body in (text, (prefix + text).encode("utf-8", "surrogatepass")):
            try:
                parse(body)
            except ProtocolError as e:
                assert e.code in (MALFORMED_XML, INVALID_REQUEST)


@settings(max_examples=200)
@given(st.text(max_size=100))
def test_arbitrary_attribute_values_parse_or_raise_protocol_errors(value):
    element = etree.Element("endpoint", serial="A", type="T", version="1")
    for name in ("serial", "model", "in-call"):
        try:
            element.set(name, value)
        except ValueError:  # not representable in XML at all
            return
        body = b'<poll protocol="1">' + etree.tostring(element) + b"</poll>"
        try:
            poll = parse_poll(body)
        except ProtocolError as e:
            assert e.code == INVALID_REQUEST
        else:
            assert poll.endpoint.serial.isprintable()


PRINTABLE = st.characters(codec="utf-8", exclude_categories=("C", "Z"))
SERIALS = st.text(PRINTABLE, min_size=1, max_size=64).filter(str.isprintable)
NAMES = st.text(st.one_of(PRINTABLE, st.just(" ")), min_size=1, max_size=64).filter(
    lambda s: s.isprintable() and s.strip(" ") == s
)
OPTIONAL = st.none() | NAMES


@st.composite
def polls(draw) -> Poll:
    serials = draw(st.lists(SERIALS, min_size=1, max_size=5, unique=True))
    endpoint = PollEndpoint(serials[0], draw(NAMES), draw(NAMES), draw(OPTIONAL), draw(OPTIONAL),
                            draw(OPTIONAL), draw(st.booleans()))
    peripherals = tuple(Device(s, draw(NAMES), draw(NAMES)) for s in serials[1:])
    return Poll(endpoint, peripherals)


def poll_document(poll: Poll, spell_false: bool) -> bytes:
    root = etree.Element("poll", protocol="1")
    e = poll.endpoint
    endpoint = etree.SubElement(root, "endpoint", serial=e.serial, type=e.type, version=e.version)
    for key in ("model", "mac", "tz"):
        if getattr(e, key) is not None:
            endpoint.set(key, getattr(e, key))
    if e.in_call or spell_false:
        endpoint.set("in-call", "true" if e.in_call else "false")
    for p in poll.peripherals:
        etree.SubElement(root, "peripheral", serial=p.serial, type=p.type, version=p.version)
    return etree.tostring(root, encoding="UTF-8", xml_declaration=True)


@settings(max_examples=100)
@given(polls(), st.booleans())
def test_valid_polls_round_trip(poll, spell_false):
    body = poll_document(poll, spell_false)
    # Not checked against the XSD: libxml2's Unicode tables are older than Python's.
    assert parse_poll(body) == poll


@settings(max_examples=60)
@given(st.lists(st.builds(DeviceReport, SERIALS, NAMES, NAMES, st.sampled_from(protocol.STATES),
                          st.none() | st.text(PRINTABLE, min_size=1, max_size=50)),
                min_size=1, max_size=5))
def test_valid_reports_round_trip(devices):
    root = etree.Element("report", protocol="1")
    for d in devices:
        element = etree.SubElement(root, "device", serial=d.serial, type=d.type, version=d.version,
                                   state=d.state)
        if d.detail is not None:
            element.set("detail", d.detail)
    assert parse_report(etree.tostring(root)) == Report(tuple(devices))


# -- the module itself --------------------------------------------------------------------


def test_parsing_from_many_threads():
    bodies = [SPEC_POLL, BROKEN["truncated"], HOSTILE["xxe"], endpoint_poll()] * 100

    def outcome(body):
        try:
            return parse_poll(body)
        except ProtocolError as e:
            return e.code

    expected = [outcome(b) for b in bodies]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(outcome, bodies)) == expected


def test_doctests():
    assert doctest.testmod(protocol).failed == 0
