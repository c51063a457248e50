"""dynupdate endpoint …: the fleet as the server saw it."""

from __future__ import annotations

import typer

from dynupdate.cli._app import home_of, state_of
from dynupdate.cli._output import JSON, TYPE_FILTER, emit_list, emit_object, say, stdout
from dynupdate.core.attempts import retry_device
from dynupdate.core.durations import parse_duration
from dynupdate.core.endpoints import get_endpoint, list_endpoints
from dynupdate.core.errors import InvalidInput
from dynupdate.core.fleet import STATUSES, load_fleet_state
from dynupdate.core.registry import forget_endpoints
from dynupdate.core.times import utc_now
from dynupdate.core.vocabulary import RolloutState, Status

app = typer.Typer(help="Endpoints and peripherals: version, target, update status, history.")

COLUMNS = [
    ("serial", "Serial"),
    ("type", "Type"),
    ("version", "Version"),
    ("target_version", "Target"),
    ("status", "Status"),
    ("last_poll", "Last poll"),
    ("in_call", "In call"),
    ("parent_serial", "Parent"),
]


@app.command("list")
def list_(
    ctx: typer.Context,
    type_: str | None = TYPE_FILTER,
    status: str | None = typer.Option(
        None,
        "--status",
        "-s",
        help=f"One of {', '.join(STATUSES)}.",
    ),
    version: str | None = typer.Option(None, "--version", help="Only devices on this version."),
    stale: str | None = typer.Option(
        None, "--stale", help="Only devices that have not polled for this long, e.g. 2h, 7d."
    ),
    as_json: bool = JSON,
) -> None:
    """Endpoints with their update status. Example: dynupdate endpoint list --status failed"""
    home = home_of(ctx)
    rows = list_endpoints(
        home.db,
        load_fleet_state(home.db),
        type_=type_,
        status=status,
        version=version,
        stale=parse_duration(stale) if stale else None,
        now=utc_now(),
    )
    emit_list(rows, COLUMNS, as_json=as_json, empty="No endpoints match.")


@app.command("show")
def show(ctx: typer.Context, serial: str = typer.Argument(...), as_json: bool = JSON) -> None:
    """One endpoint's software update details, peripherals and recent history."""
    home = home_of(ctx)
    data = get_endpoint(home.db, load_fleet_state(home.db), serial)
    if as_json:
        emit_object(data, as_json=True)
        return
    shown = {key: value for key, value in data.items() if key != "rollout"}
    shown["rollout"] = rollout_in_words(data)
    emit_object(shown, as_json=False, title=f"Endpoint {serial}")
    if data["peripherals"]:
        emit_list(data["peripherals"], COLUMNS, as_json=False, title="Peripherals")
    emit_list(
        data["history"],
        [("at", "At"), ("event", "Event"), ("version", "Version"), ("detail", "Detail")],
        as_json=False,
        title="History",
        empty="No history.",
    )
    stdout.print()


def rollout_in_words(data: dict) -> str | None:
    """Where a device stands in its type's rollout, as an admin says it.

    >>> rollout = {"version": "6.3.0", "state": "running", "wave": 2,
    ...            "waves": ["1%", "10%", "100%"], "device_wave": 3, "trial": False,
    ...            "held": False, "failures": 0, "detail": None, "max_attempts": 3}
    >>> rollout_in_words({"serial": "A", "status": "waiting", "admitted": False, "attempts": 0,
    ...                   "rollout": rollout})
    '6.3.0, wave 2 of 3 (10%): staged until wave 3 (100%)'
    """
    rollout = data["rollout"]
    if rollout is None:
        return None
    waves, wave = rollout["waves"], rollout["wave"]
    head = f"{rollout['version']}, wave {wave} of {len(waves)} ({waves[wave - 1]})"
    own = rollout["device_wave"]
    own_wave = f"wave {own} ({waves[own - 1]})" if own else "no wave"
    attempts = data["attempts"]
    tried = f"; {attempts} attempt{'' if attempts == 1 else 's'}" if attempts else ""
    if rollout["detail"] and rollout["failures"]:
        tried += f", last failed: {rollout['detail']}"
    if data["admitted"] is None:  # the type's latest rollout, over
        return f"{rollout['version']} {rollout['state']}{tried}"
    if rollout["held"]:
        failed = rollout["failures"]
        return (
            f"{head}: held after {failed} failed attempt{'' if failed == 1 else 's'}"
            f" ({rollout['detail']}): dynupdate endpoint retry {data['serial']}"
        )
    where = "a trial device, in every wave" if rollout["trial"] else f"in {own_wave}"
    if data["status"] == Status.UP_TO_DATE:
        return f"{head}: on it{tried}"
    if data["admitted"]:
        return f"{head}: {where}: admitted{tried}"
    if rollout["state"] != RolloutState.RUNNING:
        return f"{head}: {where}: not offered while {rollout['state']}{tried}"
    return f"{head}: staged until {own_wave}{tried}"


@app.command("forget")
def forget(
    ctx: typer.Context,
    serials: list[str] | None = typer.Argument(
        None, metavar="SERIAL...", help="Serials of the devices to remove."
    ),
    stale: str | None = typer.Option(
        None, "--stale", help="Every device with neither a poll nor a report for this long: 90d."
    ),
) -> None:
    """Remove endpoints and their history; their peripherals go with them.

    Example: dynupdate endpoint forget 8211ABC, or dynupdate endpoint forget --stale 90d
    """
    if bool(serials) == (stale is not None):
        raise InvalidInput("Name the serials to forget, or give --stale D, not both.")
    home = home_of(ctx)
    if stale is not None:
        gone = forget_endpoints(home.db, stale=parse_duration(stale), now=utc_now())
    else:
        gone = forget_endpoints(home.db, serials or [])
    endpoints, peripherals = len(gone.endpoints), len(gone.peripherals)
    say(
        f"Forgot {endpoints} endpoint{'' if endpoints == 1 else 's'} and {peripherals}"
        f" peripheral{'' if peripherals == 1 else 's'}.",
        quiet=state_of(ctx).quiet,
    )


@app.command("retry")
def retry(ctx: typer.Context, serial: str = typer.Argument(..., metavar="SERIAL")) -> None:
    """Give a held device fresh attempts at the rollout's version (its count starts at 0)."""
    retry_device(home_of(ctx).db, serial)
    say(f"{serial} may try again.", quiet=state_of(ctx).quiet)
