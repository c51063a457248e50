"""dynupdate serve: the HTTPS poll server."""

from __future__ import annotations

from pathlib import Path

import typer

from dynupdate.cli._app import state_of
from dynupdate.cli._output import say
from dynupdate.core.durations import parse_seconds
from dynupdate.server.logs import LogFormat


def serve(
    ctx: typer.Context,
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on."),
    port: int = typer.Option(8443, "--port", min=0, max=65535),
    cert: Path | None = typer.Option(None, "--cert", help="PEM certificate (chain)."),
    key: Path | None = typer.Option(None, "--key", help="PEM private key of --cert."),
    poll_interval: str = typer.Option(
        "3600", "--poll-interval", help="Seconds (or 30s, 90m, 1h) endpoints wait between polls."
    ),
    public_url: str | None = typer.Option(
        None, "--public-url", help="Base URL of package downloads, e.g. behind a proxy."
    ),
    package_url: str | None = typer.Option(
        None,
        "--package-url",
        help="Base URL of another server holding a copy of the package store (BASE/ab/<sha256>).",
    ),
    workers: int = typer.Option(
        0, "--workers", min=0, help="Processes sharing the port (0: one per core)."
    ),
    max_connections: int = typer.Option(
        10_000,
        "--max-connections",
        min=1,
        help="Open connections per worker; lowered at start to what the open-file limit allows.",
    ),
    max_per_client: int = typer.Option(
        1_000,
        "--max-per-client",
        min=0,
        help="Open connections per worker from one client address, an IPv6 /64 counting as "
        "one (0: no cap). Devices behind one NAT address share it.",
    ),
    request_timeout: str = typer.Option(
        "30",
        "--request-timeout",
        help="Seconds (or 30s, 2m) a client gets to send a whole request, slow senders included.",
    ),
    client_ca: Path | None = typer.Option(
        None,
        "--client-ca",
        help="PEM CA bundle: endpoints must present a client certificate it signed (mutual TLS).",
    ),
    bind_serial: bool = typer.Option(
        False,
        "--bind-serial",
        help="An endpoint polls and reports only for the serial its client certificate names "
        "(CN or a SAN) and its own peripherals; needs --client-ca.",
    ),
    access_log: bool = typer.Option(
        True,
        "--access-log/--no-access-log",
        help="One line per request on stderr (failed connections are logged either way).",
    ),
    log_format: LogFormat = typer.Option(
        LogFormat.TEXT,
        "--log-format",
        help="text: one line per event led by its UTC time; json: one JSON object per line.",
    ),
    metrics: str | None = typer.Option(
        None,
        "--metrics",
        metavar="[HOST:]PORT",
        help="Serve Prometheus metrics at http://HOST:PORT/metrics (plain HTTP; PORT or :PORT: "
        "on 127.0.0.1).",
    ),
) -> None:
    """Serve endpoints over HTTPS: polls, status reports and package downloads.

    SIGHUP re-reads --cert and --key (a renewed certificate) without dropping connections.

    Example: dynupdate serve --port 8443 --public-url https://updates.example.com
    """
    from dynupdate.serve import ServeConfig, run_server
    from dynupdate.server.metered import parse_address

    config = ServeConfig(
        host=host,
        port=port,
        cert=cert,
        key=key,
        client_ca=client_ca,
        bind_serial=bind_serial,
        poll_interval=int(
            parse_seconds(poll_interval, "--poll-interval", least=1, most=7 * 86400, whole=True)
        ),
        public_url=public_url,
        package_url=package_url,
        workers=workers,
        max_connections=max_connections,
        max_per_client=max_per_client or None,
        request_timeout=parse_seconds(request_timeout, "--request-timeout", least=1, most=3600),
        access_log=access_log,
        log_format=log_format.value,
        metrics=parse_address(metrics) if metrics is not None else None,
    )
    state = state_of(ctx)
    run_server(state.home_path, config, say=say, quiet=state.quiet)
