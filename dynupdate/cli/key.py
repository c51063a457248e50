"""dynupdate key …: activation keys, issued per device serial and software version."""

from __future__ import annotations

from pathlib import Path

import typer

from dynupdate.cli._app import home_of, state_of
from dynupdate.cli._output import JSON, emit_list, emit_object, say
from dynupdate.core.keys import import_keys, list_keys, remove_key

app = typer.Typer(help="Activation keys: sent with an update to the device they were issued for.")

COLUMNS = [("serial", "Serial"), ("version", "Version"), ("key", "Key"), ("imported", "Imported")]


@app.command("import")
def import_(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="CSV with the header serial,version,key (UTF-8)."),
    as_json: bool = JSON,
) -> None:
    """Add or replace keys from a CSV file; one bad line refuses the whole file.

    Example: dynupdate key import keys-2026-12.csv
    """
    result = import_keys(home_of(ctx).db, file)
    if as_json:
        emit_object(
            {"added": result.added, "replaced": result.replaced, "unchanged": result.unchanged},
            as_json=True,
        )
    say(
        f"Imported {file.name}: {result.added} keys added, {result.replaced} replaced, "
        f"{result.unchanged} unchanged.",
        quiet=state_of(ctx).quiet,
    )


@app.command("list")
def list_(
    ctx: typer.Context,
    serial: str | None = typer.Option(None, "--serial", "-s", help="Only this device serial."),
    as_json: bool = JSON,
) -> None:
    """The activation keys: serial, version, key, when imported."""
    rows = [k.to_dict() for k in list_keys(home_of(ctx).db, serial)]
    empty = "No activation keys. Import some: dynupdate key import FILE"
    emit_list(rows, COLUMNS, as_json=as_json, empty=empty)


@app.command("remove")
def remove(
    ctx: typer.Context,
    serial: str = typer.Argument(...),
    version: str = typer.Argument(...),
) -> None:
    """Remove the key of a device serial for a version.

    Example: dynupdate key remove 8211ABC 6.2.2.0-100
    """
    key = remove_key(home_of(ctx).db, serial, version)
    say(f"Removed the key of {key.serial} for {key.version}.", quiet=state_of(ctx).quiet)
