"""dynupdate trial …: the devices that take every new version first (SPEC section 6)."""

from __future__ import annotations

import typer

from dynupdate.cli._app import home_of, state_of
from dynupdate.cli._output import JSON, emit_list, say
from dynupdate.core.trial import add_trial, list_trial, remove_trial

app = typer.Typer(help="Trial devices: in every wave of every rollout, and alone in 'trial'.")

SERIALS = typer.Argument(..., metavar="SERIAL...", help="Endpoint serials, known or not yet.")


@app.command("add")
def add(ctx: typer.Context, serials: list[str] = SERIALS) -> None:
    """Name trial devices (an endpoint's peripherals come with it).

    Example: dynupdate trial add 8211ABC 9300XYZ
    """
    added = add_trial(home_of(ctx).db, serials)
    say(f"Trial devices: {len(added)} added, {len(serials) - len(added)} already named.",
        quiet=state_of(ctx).quiet)  # fmt: skip


@app.command("remove")
def remove(ctx: typer.Context, serials: list[str] = SERIALS) -> None:
    """Remove trial devices; an unknown one refuses the whole command."""
    removed = remove_trial(home_of(ctx).db, serials)
    say(f"Trial devices: {len(removed)} removed.", quiet=state_of(ctx).quiet)


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = JSON) -> None:
    """The trial devices: serial, type (once it has polled), added."""
    emit_list(
        list_trial(home_of(ctx).db),
        [("serial", "Serial"), ("type", "Type"), ("added_at", "Added")],
        as_json=as_json,
        empty="No trial devices: dynupdate trial add SERIAL…",
    )
