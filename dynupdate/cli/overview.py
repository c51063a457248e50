"""dynupdate overview: the dynamic software update view of the whole fleet."""

from __future__ import annotations

import re
import time
from datetime import timedelta

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from dynupdate.cli._app import home_of
from dynupdate.cli._output import (
    JSON,
    STALE_FILTER,
    TYPE_FILTER,
    WATCH,
    WATCH_INTERVAL,
    emit_list,
    literal,
    minute_utc,
    stdout,
)
from dynupdate.cli._types import warn_if_no_devices
from dynupdate.core.durations import format_duration, parse_duration
from dynupdate.core.fleet import STATUSES, load_fleet_state
from dynupdate.core.maintenance import window_view
from dynupdate.core.overview import overview as fleet_overview
from dynupdate.core.times import format_utc, utc_now
from dynupdate.core.vocabulary import RolloutState, Status
from dynupdate.core.windows import ENDPOINT

# Devices silent this long are left out of on_target_percent: longer than a long
# weekend, so rooms switched off over one still count, while retired serials no
# longer hold back a cron job that waits for a share.
SILENT_AFTER = "7d"


def _bar(percent: float | None, width: int = 12) -> str:
    """A text bar: readable in mail and logs, unlike a colour-only one."""
    if percent is None:
        return "—"
    full = round(width * percent / 100)
    return f"{'█' * full}{'░' * (width - full)} {percent:.0f}%"


def rollout_brief(rollout: dict | None) -> Text:
    """A type's active rollout in a cell of two lines: version and state, then the wave.

    >>> print(rollout_brief({"version": "6.3.0", "state": "halted", "wave": 2,
    ...                      "waves": ["1%", "10%"]}))
    6.3.0 halted
    wave 2/2 (10%)
    """
    if rollout is None:
        return literal("—")
    wave, waves = rollout["wave"], rollout["waves"]
    state = literal(rollout["state"], "bold red" if rollout["state"] == RolloutState.HALTED else "")
    return Text.assemble(
        literal(f"{rollout['version']} "), state, f"\nwave {wave}/{len(waves)} ({waves[wave - 1]})"
    )


def window_line(window: dict) -> str:
    """The maintenance window in one line, as ``overview`` prints it under its table.

    >>> window_line({"set": False})
    'No maintenance window: updates are offered at any time.'
    >>> window_line({"set": True, "days": ["mon", "tue"], "start": "22:00",
    ...              "duration_minutes": 240, "tz": "Europe/Berlin", "open_now": False,
    ...              "current_opening": None,
    ...              "next_opening": {"start": "2026-12-02T21:00:00Z", "end": "x"}})
    'Maintenance window mon,tue 22:00 for 4h (Europe/Berlin): closed; next opening \
2026-12-02 21:00 UTC.'
    """
    if not window["set"]:
        return "No maintenance window: updates are offered at any time."
    length = format_duration(timedelta(minutes=window["duration_minutes"]))
    head = f"Maintenance window {','.join(window['days'])} {window['start']} for {length}"
    clock = " (on each endpoint's clock; times for one on UTC)" if window["tz"] == ENDPOINT else ""
    head += f" ({window['tz']}){clock}"
    if window["open_now"]:
        return f"{head}: open until {minute_utc(window['current_opening']['end'])}."
    return f"{head}: closed; next opening {minute_utc(window['next_opening']['start'])}."


def left_out_line(rows: list[dict]) -> str | None:
    """Which devices ``on_target_percent`` leaves out, and how to list them; None if none."""
    gone = [(row["type"], row["left_out"]) for row in rows if row["left_out"]]
    counted = [(name, left["devices"]) for name, left in gone if left["devices"]]
    if not counted:
        return None
    after = gone[0][1]["silent_after"]
    total = sum(n for _, n in counted)
    per_type = ", ".join(f"{name} {n}" for name, n in counted)
    return (
        f"On target leaves out {total} device{'' if total == 1 else 's'} not heard from for"
        f" {after} ({per_type}): dynupdate endpoint list --stale {after}"
    )


def _table(rows: list[dict], window: dict) -> Group:
    table = Table(
        title=literal(f"Dynamic software update — {format_utc(utc_now())}", "table.title"),
        title_justify="left",
        header_style="bold",
    )
    # The rollout columns only while some type has a rollout: waiting and held
    # exist only then, and the table stays narrow enough for a terminal.
    rolling = any(row["rollout"] for row in rows)
    statuses = [s for s in STATUSES if rolling or s not in (Status.WAITING, Status.HELD)]
    headers = ["Type", "Policy", "Target", *(["Rollout"] if rolling else []), "Endpoints"]
    # Only with a window, or devices still told to wait for one since cleared.
    waiting = window["set"] or any(row["pending_for_window"] for row in rows)
    window_headers = ["Pending for window"] if waiting else []
    for header in (*headers, *statuses, *window_headers, "On target", "Versions"):
        table.add_column(header, overflow="fold")
    for row in rows:
        if row["active"]:
            policy = f"{row['version_to_use']} {'or newer' if row['allow_newer'] else 'exactly'}"
        else:
            policy = "not activated"
        bar = _bar(row["on_target_percent"])
        spread = ", ".join(f"{v['version']} ({v['count']})" for v in row["versions"][:4])
        if len(row["versions"]) > 4:
            spread += f", +{len(row['versions']) - 4} more"
        cells = (
            row["type"],
            policy,
            row["target_version"] or "—",
            *([rollout_brief(row["rollout"])] if rolling else []),
            row["endpoints"],
            *(row["counts"][s] for s in statuses),
            *([row["pending_for_window"]] if waiting else []),
            bar,
            spread or "—",
        )
        # Types and versions are as devices sent them: every cell is literal text.
        table.add_row(*(cell if isinstance(cell, Text) else literal(cell) for cell in cells))
    notes = [window_line(window)]
    left_out = left_out_line(rows)
    if left_out:
        notes.append(left_out)
    return Group(table, *(literal(note) for note in notes))


def _silent_after(text: str) -> timedelta | None:
    """``--silent-after``: a duration, or 0 to count every device."""
    return None if re.fullmatch(r"0+[smhd]?", text.strip()) else parse_duration(text)


def overview(
    ctx: typer.Context,
    type_: str | None = TYPE_FILTER,
    stale: str | None = STALE_FILTER,
    silent_after: str = typer.Option(
        SILENT_AFTER,
        "--silent-after",
        help="Leave devices not heard from for this long out of On target (0: count all).",
    ),
    watch: bool = WATCH,
    interval: str = WATCH_INTERVAL,
    as_json: bool = JSON,
) -> None:
    """Per device type: the policy, endpoint counts by status and the version spread."""
    home = home_of(ctx)
    only_stale = parse_duration(stale) if stale is not None else None
    left_out = _silent_after(silent_after)
    period = parse_duration(interval).total_seconds()

    def rows() -> tuple[list[dict], dict]:
        fleet = load_fleet_state(home.db)
        now = utc_now()
        data = fleet_overview(
            home.db, fleet, type_=type_, stale=only_stale, silent_after=left_out, now=now
        )
        return data, window_view(fleet.window, now)

    if as_json or not watch:
        data, window = rows()
        if type_ is not None and not any(row["endpoints"] for row in data):
            warn_if_no_devices(home.db, type_)
        if as_json:
            emit_list(data, [], as_json=True)
        elif not data:
            stdout.print("No device types yet: add a package, or let endpoints poll.")
        else:
            stdout.print(_table(data, window))
        return
    with Live(_table(*rows()), console=stdout, auto_refresh=False) as live:
        while True:
            time.sleep(period)
            live.update(_table(*rows()), refresh=True)
