"""The reference endpoint during a staged rollout: the reasons staged, rate-limited, held.

The server on this branch does not decide rollouts yet, so it cannot send these
reasons: the answers are real ``<pollResponse>`` documents, parsed by the
client's parser and taken in by the endpoint's own answer handling.
"""

from __future__ import annotations

import asyncio
import json
import os
import random

import pytest
from typer.testing import CliRunner

from dynupdate.cli import app
from dynupdate.core.vocabulary import Reason, Status
from dynupdate.endpoint import Device, Endpoint, EndpointClient, parse_poll_response

NOW = "2026-11-27T16:00:00Z"
SHA = "ab" * 32


def response(interval: int, *children: str) -> bytes:
    return (
        f'<pollResponse protocol="1" pollInterval="{interval}" serverTime="{NOW}">'
        + "".join(children)
        + "</pollResponse>"
    ).encode()


def no_update(serial: str, reason: str, retry_at: str | None = None) -> str:
    retry = f' retryAt="{retry_at}"' if retry_at else ""
    return f'<noUpdate serial="{serial}" type="GroupSeries" reason="{reason}"{retry}/>'


def update(serial: str, version: str = "6.2.2") -> str:
    return (
        f'<update serial="{serial}" type="GroupSeries" version="{version}" size="10"'
        f' sha256="{SHA}" name="gs.pup" url="https://127.0.0.1:1/packages/{SHA}"/>'
    )


@pytest.mark.parametrize(
    ("reason", "retry_at", "status"),
    [
        (Reason.STAGED, None, Status.WAITING),
        (Reason.HELD, None, Status.HELD),
        (Reason.RATE_LIMITED, "2026-11-27T16:05:00Z", Status.PENDING),
        (Reason.UP_TO_DATE, None, Status.UP_TO_DATE),
        (Reason.NO_POLICY, None, Status.NO_POLICY),
        (Reason.OUTSIDE_WINDOW, "2026-11-27T22:00:00Z", Status.PENDING),
        (Reason.IN_CALL, None, Status.PENDING),
    ],
)
def test_each_reason_gives_the_status_the_server_would_show(reason, retry_at, status):
    endpoint = Endpoint("S1", "GroupSeries", "6.2.1")
    answer = parse_poll_response(response(60, no_update("S1", reason, retry_at)))
    offers = endpoint._answered(answer)
    assert offers == [], "a noUpdate is never acted on"
    assert endpoint.device.status == status
    assert endpoint.device.version == "6.2.1"


def test_a_device_staged_after_a_failure_keeps_its_detail_and_goes_on_when_offered():
    camera = Device("S1-CAM", "EagleEyeIV", "1.0")
    endpoint = Endpoint("S1", "GroupSeries", "6.2.1", peripherals=[camera])
    endpoint.device.detail = "Install failed: flash full"
    answer = parse_poll_response(
        response(60, no_update("S1", "held"), no_update("S1-CAM", "staged"))
    )
    endpoint._answered(answer)
    assert [d.status for d in endpoint.devices] == ["held", "waiting"]
    assert endpoint.device.detail == "Install failed: flash full", "why it is held stays shown"
    [(device, offer)] = endpoint._answered(
        parse_poll_response(response(60, update("S1"), no_update("S1-CAM", "staged")))
    )
    assert (device, offer.version, device.status) == (endpoint.device, "6.2.2", "pending")


def delays(answer: bytes, *, poll_interval: float | None = None, n: int = 300) -> list[float]:
    endpoint = Endpoint("S1", "GroupSeries", "6.2.1", poll_interval=poll_interval,
                        rng=random.Random(5))  # fmt: skip
    parsed = parse_poll_response(answer)
    return [endpoint._next_delay(parsed) for _ in range(n)]


def test_rate_limited_comes_back_at_retry_at_never_sooner_even_with_a_short_interval():
    # Polling every 30 s would be refused every time until the slot frees at 16:02.
    waits = delays(response(30, no_update("S1", "rate-limited", "2026-11-27T16:02:00Z")))
    assert min(waits) >= 120 and max(waits) <= 120 * 1.1
    assert len({round(w, 3) for w in waits}) > 200, "spread, not all at once"
    faster = delays(
        response(3600, no_update("S1", "rate-limited", "2026-11-27T16:02:00Z")), poll_interval=0.2
    )
    assert min(faster) >= 120, "an overridden interval does not hurry it either"


def test_rate_limited_spreads_a_crowd_given_one_slot_over_seconds():
    # retryAt one minute on: the fleet told so comes back over 6 s, not in one instant.
    waits = delays(response(3600, no_update("S1", "rate-limited", "2026-11-27T16:01:00Z")))
    assert 60 <= min(waits) < 61 and 65 < max(waits) <= 66


def test_rate_limited_sooner_than_the_interval_is_taken():
    waits = delays(response(3600, no_update("S1", "rate-limited", "2026-11-27T16:10:00Z")))
    assert min(waits) >= 600 and max(waits) <= 660


@pytest.mark.parametrize("reason", ["staged", "held"])
def test_staged_and_held_keep_polling_at_the_poll_interval(reason):
    waits = delays(response(600, no_update("S1", reason)))
    assert min(waits) >= 540 and max(waits) <= 660


def test_a_peripheral_rate_limited_holds_back_the_endpoints_poll():
    # One poll carries every device: a window opening sooner does not make it early.
    answer = response(
        3600,
        no_update("S1", "outside-window", "2026-11-27T16:00:30Z"),
        no_update("S1-CAM", "rate-limited", "2026-11-27T16:03:00Z"),
    )
    assert min(delays(answer)) >= 180


# -- a device that falls back to its old image, against the real server -----------------------


def test_an_installer_that_falls_back_reports_installed_then_polls_on_the_old_version(
    start_server, tmp_path
):
    home = tmp_path / "server"
    server = start_server(home, "--poll-interval", "60", "--no-access-log")
    package = tmp_path / "gs.pup"
    package.write_bytes(os.urandom(3000))
    admin(home, "package", "add", package, "--type", "GroupSeries", "--version", "6.2.2")
    admin(home, "policy", "set", "GroupSeries", "--version", "6.2.2")

    async def falls_back(device, offer, path):
        return device.version  # the new image did not boot: the old one runs again

    endpoint = Endpoint("FALLBACK-1", "GroupSeries", "6.2.1", installer=falls_back,
                        workdir=tmp_path / "w")  # fmt: skip
    client = EndpointClient(f"https://127.0.0.1:{server.port}", cafile=server.cafile)
    asyncio.run(endpoint.poll_once(client))
    assert (endpoint.device.version, endpoint.device.status) == ("6.2.1", "pending")
    assert json.loads(admin(home, "endpoint", "show", "FALLBACK-1", "--json"))["version"] == "6.2.2"
    asyncio.run(endpoint.poll_once(client))  # says 6.2.1 again, and is offered 6.2.2 again
    shown = json.loads(admin(home, "endpoint", "show", "FALLBACK-1", "--json"))
    events = [(h["event"], h["version"]) for h in reversed(shown["history"])]
    assert events[:5] == [
        ("first-seen", "6.2.1"),
        ("offered", "6.2.2"),
        ("downloading", "6.2.2"),
        ("installing", "6.2.2"),
        ("installed", "6.2.2"),
    ]
    assert ("version-changed", "6.2.1") in events[5:], events


def admin(home, *args) -> str:
    result = CliRunner().invoke(app, ["--home", str(home), *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout
