"""The ``dynupdate`` command: a thin Typer layer over :mod:`dynupdate.core`."""

from __future__ import annotations

from dynupdate.cli import (
    backup,
    endpoint,
    integrity,
    key,
    log,
    overview,
    package,
    policy,
    serve,
    simulate,
    window,
)
from dynupdate.cli._app import app

__all__ = ["app", "main"]

app.add_typer(package.app, name="package")
app.add_typer(policy.app, name="policy")
app.add_typer(window.app, name="window")
app.add_typer(endpoint.app, name="endpoint")
app.add_typer(key.app, name="key")
app.command("overview")(overview.overview)
app.command("serve")(serve.serve)
app.command("simulate")(simulate.simulate)
app.command("check")(integrity.check)
app.command("backup")(backup.backup)
app.command("restore")(backup.restore)
app.command("log")(log.log)


def main() -> None:
    app(prog_name="dynupdate")
