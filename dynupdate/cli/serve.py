"""dynupdate serve: the HTTPS poll server."""

from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path

import typer

from dynupdate.cli._app import home_of, state_of
from dynupdate.cli._output import say
from dynupdate.core.durations import parse_duration
from dynupdate.core.errors import InvalidInput
from dynupdate.core.home import home_locked, open_home


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
) -> None:
    """Serve endpoints over HTTPS: polls, status reports and package downloads.

    Example: dynupdate serve --port 8443 --public-url https://updates.example.com
    """
    from dynupdate import fingerprints
    from dynupdate.serve import PollApp, ServeOptions
    from dynupdate.server import listener, tls
    from dynupdate.server import workers as server_workers

    home = home_of(ctx)
    interval = _seconds(poll_interval)
    timeout = _timeout(request_timeout)
    if bind_serial and client_ca is None:
        raise InvalidInput(
            "--bind-serial needs --client-ca FILE: the serial comes from the endpoint's "
            "client certificate."
        )
    for name, url in (("--public-url", public_url), ("--package-url", package_url)):
        if url is not None and not url.startswith(("https://", "http://")):
            raise InvalidInput(f"Invalid {name} '{url}': use an http(s):// URL.")
    if (cert is None) != (key is None):
        raise InvalidInput("Give both --cert and --key, or neither (a self-signed one is made).")
    # Held while the server runs; the workers it forks share it (see lock_home).
    ctx.with_resource(home_locked(home.path, "serve", "stop it first, or use another --home."))
    if cert is None:
        cert, key = tls.ensure_self_signed(home.path)
    context = tls.server_context(cert, key, client_ca)
    workers = workers or os.cpu_count() or 1
    shown_host = socket.gethostname() if host in ("0.0.0.0", "::") else host
    options = ServeOptions(
        poll_interval=interval,
        public_url=public_url,
        package_url=package_url,
        fallback_base=f"https://{shown_host}:{port}",
        bind_serial=bind_serial,
    )
    state = state_of(ctx)
    files = listener.open_file_limit()
    if max_connections > files - listener.FD_RESERVE:
        lowered = max(1, files - listener.FD_RESERVE)
        # Always shown, --quiet or not: the server then holds fewer devices than asked.
        say(
            f"--max-connections {max_connections} lowered to {lowered}: the limit of open "
            f"files is {files}. Raise it (ulimit -n, or LimitNOFILE= in a systemd unit) "
            "to hold more connections."
        )
        max_connections = lowered
    shown = fingerprints.fingerprint(cert)
    say(f"Certificate SHA-256 fingerprint (for --pin): {shown}", quiet=state.quiet)
    if client_ca is not None:
        bound = "; each speaks only for its own serial" if bind_serial else ""
        say(f"Endpoints need a client certificate from {client_ca}{bound}", quiet=state.quiet)
    home_path = home.path
    # Each worker opens its own connection: none may inherit this one across fork.
    home.close()
    state.home = None

    def app_factory():
        app = PollApp(open_home(home_path), options)
        app.start()
        return app

    def ready(addresses: list[tuple[str, int]]) -> None:
        where = ", ".join(f"https://{_url_host(h)}:{p}" for h, p in addresses)
        processes = f"{workers} worker" + ("s" if workers != 1 else "")
        say(f"Serving {where} from {home_path} ({processes})", quiet=state.quiet)
        sys.stderr.flush()

    def log_line(line: str) -> None:
        sys.stderr.write(line + "\n")

    server_workers.run(
        app_factory,
        host,
        port,
        context,
        workers=workers,
        ready=ready,
        max_connections=max_connections,
        max_per_client=max_per_client or None,
        request_timeout=timeout,
        access_log=log_line if access_log else None,
        connection_log=log_line,
    )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        try:
            value = parse_duration(text).total_seconds()
        except InvalidInput:
            value = math.nan
    if not 1 <= value <= 3600:  # NaN fails too
        raise InvalidInput(
            f"Invalid --request-timeout '{text}': use 1 second to 1 hour, e.g. 30 or 2m."
        )
    return value


def _seconds(text: str) -> int:
    value = int(text) if text.isdigit() else int(parse_duration(text).total_seconds())
    if not 1 <= value <= 7 * 86400:
        raise InvalidInput(f"Invalid --poll-interval '{text}': use 1 second to 7 days.")
    return value
