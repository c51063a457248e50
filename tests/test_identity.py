"""The --bind-serial rules, as pure functions (the serve wiring is still to come)."""

from __future__ import annotations

import pytest

from dynupdate.server.identity import Forbidden, certificate_names, check_poll, check_report


def test_certificate_names_and_rules():
    cert = {
        "subject": ((("commonName", "8211ABC"),),),
        "subjectAltName": (
            ("DNS", "alias.example"),
            ("IP Address", "10.0.0.1"),
            ("othername", "<unsupported>"),  # what ssl shows for any otherName: not a name
        ),
    }
    names = certificate_names(cert)
    assert names == {"8211ABC", "alias.example"}
    assert certificate_names(None) == frozenset()
    assert check_poll(names, "8211ABC", [("CAM", None), ("CAM2", "8211ABC")]) == frozenset()
    with pytest.raises(Forbidden):
        check_poll(names, "10.0.0.1", [])
    # Another's peripheral, or another endpoint, is refused on its own, not the whole poll.
    peripherals = [("CAM", "OTHER"), ("EP2", "EP2"), ("alias.example", "OTHER"), ("CAM3", None)]
    assert check_poll(names, "8211ABC", peripherals) == {"CAM", "EP2"}
    check_report(names, [("8211ABC", None), ("CAM", "8211ABC")])
    with pytest.raises(Forbidden):
        check_report(names, [("CAM", None)])
