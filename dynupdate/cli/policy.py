"""dynupdate policy …: the dynamic software update per device type."""

from __future__ import annotations

import typer

from dynupdate.cli._app import home_of, state_of
from dynupdate.cli._output import emit_list, emit_object, say
from dynupdate.core.policies import disable_policy, get_policy, list_policies, set_policy
from dynupdate.core.rehearsal import Rehearsal, rehearse_policy

app = typer.Typer(help="Dynamic software update policies: which version each type runs.")

COLUMNS = [
    ("type", "Type"),
    ("active", "Active"),
    ("version_to_use", "Version to use"),
    ("allow_newer", "Allow newer"),
    ("target_version", "Target"),
    ("packages", "Packages"),
]
JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")
DRY_RUN = typer.Option(False, "--dry-run", help="Change nothing: show what the change would do.")
REHEARSAL_COLUMNS = [
    ("type", "Type"),
    ("version", "Version now"),
    ("devices", "Devices"),
    ("offered_version", "Offered"),
    ("offered_now", "Now"),
    ("offered_at_next_opening", "At next opening"),
    ("in_call", "In call"),
    ("up_to_date", "Up to date"),
    ("offered_version_before", "Offered before"),
]


def emit_rehearsal(rehearsal: Rehearsal, *, as_json: bool) -> None:
    """A dry run: per type and current version, what would be offered, when, and who waits."""
    data = rehearsal.to_dict()
    if as_json:
        emit_object(data, as_json=True)
        return
    emit_list(
        data["groups"],
        REHEARSAL_COLUMNS,
        as_json=False,
        title="Dry run (nothing changed)",
        empty="No endpoint concerned has polled yet.",
    )
    totals = data["totals"]
    opening = f" ({data['next_opening']})" if data["next_opening"] else ""
    say(
        f"Dry run: {totals['offered_now']} devices would be offered an update now, "
        f"{totals['offered_at_next_opening']} at the next window opening{opening}; "
        f"{totals['in_call']} excluded as in a call at their last poll; "
        f"{totals['changed']} would get another answer to their next poll than today."
    )


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
