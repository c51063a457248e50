"""The reference endpoint: a correct device-side implementation of SPEC section 3.

Device integrators can read it as the protocol done right; ``dynupdate
simulate`` runs thousands of them to rehearse a rollout.

    import asyncio
    from dynupdate.endpoint import Device, Endpoint, EndpointClient

    async def main():
        client = EndpointClient("https://updates.example.com:8443", pin="3f5c…")
        endpoint = Endpoint("8211ABC", "GroupSeries", "6.2.1.1-600021",
                            peripherals=[Device("EE4-17", "EagleEyeIV", "1.4.0")],
                            tz="Europe/Berlin", workdir=Path("/var/lib/endpoint"))
        answer = await endpoint.poll_once(client)   # one poll, and the updates it offers
        print(endpoint.device.status, endpoint.device.version)
        await endpoint.run(client)                  # or keep polling, as a device does

    asyncio.run(main())

Modules: :mod:`~dynupdate.endpoint.client` (the protocol's requests; a
client and its sessions), :mod:`~dynupdate.endpoint.transport` (HTTP/TLS,
trust), :mod:`~dynupdate.endpoint.files` (the download's files),
:mod:`~dynupdate.endpoint.device` (the endpoint's behaviour) and
:mod:`~dynupdate.endpoint.simulation` (a fleet of them); the documents are
:mod:`dynupdate.protocol_client`. None imports typer or rich.
"""

from dynupdate.endpoint.client import (
    ClientSession,
    ClientStats,
    EndpointClient,
    EndpointError,
    Exchange,
    PollAnswer,
    parse_poll_response,
)
from dynupdate.endpoint.device import DOWNLOAD_MODES, STATUSES, Device, Endpoint, Installer
from dynupdate.protocol import NoOffer, Offer

__all__ = [
    "DOWNLOAD_MODES",
    "STATUSES",
    "ClientSession",
    "ClientStats",
    "Device",
    "Endpoint",
    "EndpointClient",
    "EndpointError",
    "Exchange",
    "Installer",
    "NoOffer",
    "Offer",
    "PollAnswer",
    "parse_poll_response",
]
