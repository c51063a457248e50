"""The ``dynupdate`` command: a thin Typer layer over :mod:`dynupdate.core`."""

from __future__ import annotations

from dynupdate.cli import endpoint, overview, package, policy, serve, window
from dynupdate.cli._app import app

__all__ = ["app", "main"]

app.add_typer(package.app, name="package")
app.add_typer(policy.app, name="policy")
app.add_typer(window.app, name="window")
app.add_typer(endpoint.app, name="endpoint")
app.command("overview")(overview.overview)
app.command("serve")(serve.serve)


def main() -> None:
    app(prog_name="dynupdate")
