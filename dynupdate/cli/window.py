"""dynupdate window …: when updates may happen."""

from __future__ import annotations

import typer

from dynupdate.cli._app import home_of, state_of
from dynupdate.cli._output import DRY_RUN, JSON, emit_object, emit_rehearsal, say
from dynupdate.core.maintenance import clear_window, load_window, save_window, window_view
from dynupdate.core.rehearsal import rehearse_window
from dynupdate.core.times import utc_now
from dynupdate.core.windows import make_window

app = typer.Typer(help="The maintenance window: updates are offered only inside it.")


@app.command("set")
def set_(
    ctx: typer.Context,
    start: str = typer.Option(..., "--start", help="Opening time HH:MM on the window's clock."),
    duration: str = typer.Option(..., "--duration", help="Length: 90m, 4h, 1h30m (max 24h)."),
    days: str | None = typer.Option(
        None, "--days", help="mon,tue,… ranges like mon-fri, or daily (default: every day)."
    ),
    tz: str | None = typer.Option(
        None,
        "--tz",
        help="IANA zone (Europe/Berlin), or 'endpoint' for each endpoint's clock. Default UTC.",
    ),
    dry_run: bool = DRY_RUN,
    as_json: bool = JSON,
) -> None:
    """Set the maintenance window.

    Example: dynupdate window set --start 22:00 --duration 4h --days mon-fri --tz Europe/Berlin
    """
    window = make_window(days, start, duration, tz)
    if dry_run:
        emit_rehearsal(rehearse_window(home_of(ctx).db, window), as_json=as_json)
        return
    window = save_window(home_of(ctx).db, window)
    view = window_view(window, utc_now())
    if as_json:
        emit_object(view, as_json=True)
    opening = view["next_opening"]
    after = f"; next opening {opening['start']}" if opening else ""
    say(
        f"Window set: {','.join(view['days'])} {view['start']} for "
        f"{view['duration_minutes']} min ({view['tz']}){after}.",
        quiet=state_of(ctx).quiet,
    )


@app.command("show")
def show(ctx: typer.Context, as_json: bool = JSON) -> None:
    """The window and its next opening (UTC); 'set: no' means updates any time."""
    emit_object(window_view(load_window(home_of(ctx).db), utc_now()), as_json=as_json)


@app.command("clear")
def clear(ctx: typer.Context) -> None:
    """Remove the window: updates may happen at any time."""
    had = clear_window(home_of(ctx).db)
    say("Window cleared." if had else "No window was set.", quiet=state_of(ctx).quiet)
