"""dynupdate serve: the HTTPS poll server."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import typer

from dynupdate.cli._app import home_of, state_of
from dynupdate.cli._output import say
from dynupdate.core.durations import parse_duration
from dynupdate.core.errors import InvalidInput
from dynupdate.core.home import open_home


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
    max_connections: int = typer.Option(10_000, "--max-connections", min=1),
    access_log: bool = typer.Option(
        True, "--access-log/--no-access-log", help="One line per request on stderr."
    ),
) -> None:
    """Serve endpoints over HTTPS: polls, status reports and package downloads.

    Example: dynupdate serve --port 8443 --public-url https://updates.example.com
    """
    from dynupdate import httpd, tls
    from dynupdate.serve import PollApp, ServeOptions

    home = home_of(ctx)
    interval = _seconds(poll_interval)
    for name, url in (("--public-url", public_url), ("--package-url", package_url)):
        if url is not None and not url.startswith(("https://", "http://")):
            raise InvalidInput(f"Invalid {name} '{url}': use an http(s):// URL.")
    if (cert is None) != (key is None):
        raise InvalidInput("Give both --cert and --key, or neither (a self-signed one is made).")
    if cert is None:
        cert, key = tls.ensure_self_signed(home.path)
    context = tls.server_context(cert, key)
    workers = workers or os.cpu_count() or 1
    shown_host = socket.gethostname() if host in ("0.0.0.0", "::") else host
    options = ServeOptions(
        poll_interval=interval,
        public_url=public_url,
        package_url=package_url,
        fallback_base=f"https://{shown_host}:{port}",
    )
    state = state_of(ctx)
    say(f"Certificate SHA-256 fingerprint (for --pin): {tls.fingerprint(cert)}", quiet=state.quiet)
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
        say(f"Serving {where} from {home_path} ({workers} workers)", quiet=state.quiet)
        sys.stderr.flush()

    def log_line(line: str) -> None:
        sys.stderr.write(line + "\n")

    httpd.run(
        app_factory,
        host,
        port,
        context,
        workers=workers,
        ready=ready,
        max_connections=max_connections,
        access_log=log_line if access_log else None,
    )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _seconds(text: str) -> int:
    value = int(text) if text.isdigit() else int(parse_duration(text).total_seconds())
    if not 1 <= value <= 7 * 86400:
        raise InvalidInput(f"Invalid --poll-interval '{text}': use 1 second to 7 days.")
    return value
