"""dynupdate policy …: the dynamic software update per device type."""

from __future__ import annotations

import typer

from dynupdate.cli._app import home_of, state_of
from dynupdate.cli._output import DRY_RUN, JSON, emit_list, emit_object, emit_rehearsal, say
from dynupdate.core.policies import disable_policy, get_policy, list_policies, set_policy
from dynupdate.core.rehearsal import rehearse_policy

app = typer.Typer(help="Dynamic software update policies: which version each type runs.")

COLUMNS = [
    ("type", "Type"),
    ("active", "Active"),
    ("version_to_use", "Version to use"),
    ("allow_newer", "Allow newer"),
    ("target_version", "Target"),
    ("packages", "Packages"),
]


def _describe(view) -> str:
    if not view.active:
        return f"{view.type}: update not activated."
    mode = "or newer" if view.allow_newer else "exactly"
    return (
        f"{view.type}: version to use {view.version_to_use} ({mode}); target {view.target_version}."
    )


@app.command("set")
def set_(
    ctx: typer.Context,
    type_: str = typer.Argument(..., metavar="TYPE"),
    version: str = typer.Option(..., "--version", "-v", help="An uploaded version of TYPE."),
    allow_newer: bool | None = typer.Option(
        None,
        "--allow-newer/--exact",
        help="Also take newer uploaded versions (never downgrade), or force exactly this one. "
        "Default: keep the current setting (exact for a new policy).",
    ),
    dry_run: bool = DRY_RUN,
    as_json: bool = JSON,
) -> None:
    """Set the version to use for a device type.

    Example: dynupdate policy set GroupSeries --version 6.2.2.0-100 --allow-newer
    """
    if dry_run:
        rehearsal = rehearse_policy(home_of(ctx).db, type_, version, allow_newer)
        emit_rehearsal(rehearsal, as_json=as_json)
        return
    view = set_policy(home_of(ctx).db, type_, version, allow_newer)
    if as_json:
        emit_object(view.to_dict(), as_json=True)
    say(_describe(view), quiet=state_of(ctx).quiet)


@app.command("disable")
def disable(ctx: typer.Context, type_: str = typer.Argument(..., metavar="TYPE")) -> None:
    """Unset the version to use: the update is not activated for TYPE."""
    view = disable_policy(home_of(ctx).db, type_)
    say(_describe(view), quiet=state_of(ctx).quiet)


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = JSON) -> None:
    """The dynamic software update view: one row per device type."""
    rows = [v.to_dict() for v in list_policies(home_of(ctx).db)]
    emit_list(rows, COLUMNS, as_json=as_json, empty="No device types yet: add a package first.")


@app.command("show")
def show(
    ctx: typer.Context, type_: str = typer.Argument(..., metavar="TYPE"), as_json: bool = JSON
) -> None:
    """One device type's policy and its current target."""
    emit_object(get_policy(home_of(ctx).db, type_).to_dict(), as_json=as_json)
