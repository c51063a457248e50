"""dynupdate endpoint …: the fleet as the server saw it."""

from __future__ import annotations

from datetime import datetime

import typer

from dynupdate.cli._app import home_of, state_of
from dynupdate.cli._output import (
    JSON,
    STALE_FILTER,
    TYPE_FILTER,
    emit_list,
    emit_object,
    minute_utc,
    say,
    stdout,
)
from dynupdate.cli._types import warn_if_no_devices
from dynupdate.core.attempts import retry_device
from dynupdate.core.durations import parse_duration
from dynupdate.core.endpoints import get_endpoint, list_endpoints
from dynupdate.core.errors import InvalidInput
from dynupdate.core.fleet import STATUSES, load_fleet_state
from dynupdate.core.registry import forget_endpoints
from dynupdate.core.times import parse_utc, utc_now
from dynupdate.core.vocabulary import UPDATE_OFFERED, Reason, RolloutState, Status
from dynupdate.core.windows import Window, current_opening, next_opening

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
    stale: str | None = STALE_FILTER,
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
        stale=parse_duration(stale) if stale is not None else None,
        now=utc_now(),
    )
    if type_ is not None and not rows:
        warn_if_no_devices(home.db, type_)
    emit_list(rows, COLUMNS, as_json=as_json, empty="No endpoints match.")


@app.command("show")
def show(ctx: typer.Context, serial: str = typer.Argument(...), as_json: bool = JSON) -> None:
    """One endpoint's software update details, peripherals and recent history."""
    home = home_of(ctx)
    fleet = load_fleet_state(home.db)
    data = get_endpoint(home.db, fleet, serial)
    if as_json:
        emit_object(data, as_json=True)
        return
    shown = {key: value for key, value in data.items() if key != "rollout"}
    shown["rollout"] = rollout_in_words(data)
    shown["last_answer"] = answer_in_words(data, fleet.window, utc_now())
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


# What each answer means for the admin, after the reason itself.
_MEANING = {
    Reason.IN_CALL: "the update waits for its first poll out of a call",
    Reason.STAGED: "the rollout has not opened its wave (see rollout)",
    Reason.RATE_LIMITED: "the rollout's --max-in-flight or --max-per-hour was full",
    Reason.NO_POLICY: "its type has no active policy",
    Reason.UP_TO_DATE: "nothing to install",
}


def answer_in_words(data: dict, window: Window | None, now: datetime) -> str:
    """What the device's last poll was told and why it waits, as an admin says it.

    >>> from dynupdate.core.windows import make_window
    >>> window = make_window("mon-fri", "22:00", "4h", "Europe/Berlin")
    >>> device = {"serial": "A", "status": "pending", "tz": None, "offered_version": None,
    ...           "last_reason": "outside-window", "retry_at": "2026-12-02T21:37:12Z"}
    >>> answer_in_words(device, window, parse_utc("2026-12-02T12:00:00Z"))
    'outside-window: waiting for the maintenance window: next opening 2026-12-02 21:00 UTC; \
told to poll again at 2026-12-02 21:37 UTC'
    """
    reason, retry = data["last_reason"], data["retry_at"]
    if reason is None:
        return "none recorded: its last poll came before dynupdate recorded answers"
    if retry is None:
        again = ""
    elif parse_utc(retry) > now:
        again = f"; told to poll again at {minute_utc(retry)}"
    else:  # any poll since would have replaced it
        again = f"; told to poll again at {minute_utc(retry)}, not heard from since"
    if reason == UPDATE_OFFERED:
        meaning = f"offered {data['offered_version']} at its last poll"
    elif reason == Reason.UP_TO_DATE:
        meaning = _MEANING[reason]
    elif data["status"] == Status.UP_TO_DATE:
        meaning = "up to date now: nothing to wait for"
    elif reason == Reason.OUTSIDE_WINDOW:
        if window is None:
            meaning = "it was outside the maintenance window, since cleared"
        elif opening := current_opening(window, now, data["tz"]):
            until = minute_utc(opening[1])
            meaning = f"waiting for its time in the maintenance window, open until {until}"
        else:
            start, _ = next_opening(window, now, data["tz"])
            meaning = f"waiting for the maintenance window: next opening {minute_utc(start)}"
    elif reason == Reason.HELD:
        meaning = f"its attempts are used up: dynupdate endpoint retry {data['serial']}"
    else:
        meaning = _MEANING.get(reason, "")
    return f"{reason}: {meaning}{again}" if meaning else f"{reason}{again}"


@app.command("forget")
def forget(
    ctx: typer.Context,
    serials: list[str] | None = typer.Argument(
        None, metavar="SERIAL...", help="Serials of the devices to remove."
    ),
    stale: str | None = typer.Option(
        None, "--stale", help="Every device with neither a poll nor a report for this long: 90d."
    ),
    prefix: str | None = typer.Option(
        None, "--prefix", help="Every device whose serial starts with this: a rehearsal's SIM."
    ),
) -> None:
    """Remove endpoints and their history; their peripherals go with them.

    Example: dynupdate endpoint forget 8211ABC, dynupdate endpoint forget --stale 90d,
    or dynupdate endpoint forget --prefix SIM
    """
    if bool(serials) == (stale is not None or prefix is not None):
        raise InvalidInput("Name the serials to forget, or give --stale D and/or --prefix P.")
    home = home_of(ctx)
    if serials:
        gone = forget_endpoints(home.db, serials)
    else:
        gone = forget_endpoints(
            home.db,
            stale=parse_duration(stale) if stale is not None else None,
            prefix=prefix,
            now=utc_now(),
        )
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
