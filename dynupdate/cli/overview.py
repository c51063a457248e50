"""dynupdate overview: the dynamic software update view of the whole fleet."""

from __future__ import annotations

import time

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from dynupdate.cli._app import home_of
from dynupdate.cli._output import JSON, emit_list, literal, stdout
from dynupdate.core.durations import parse_duration
from dynupdate.core.endpoints import overview as fleet_overview
from dynupdate.core.fleet import STATUSES, load_fleet_state
from dynupdate.core.times import format_utc, utc_now
from dynupdate.core.vocabulary import RolloutState, Status


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


def _table(rows: list[dict]) -> Group:
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
    for header in (*headers, *statuses, "On target", "Versions"):
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
            bar,
            spread or "—",
        )
        # Types and versions are as devices sent them: every cell is literal text.
        table.add_row(*(cell if isinstance(cell, Text) else literal(cell) for cell in cells))
    return Group(table)


def overview(
    ctx: typer.Context,
    watch: bool = typer.Option(False, "--watch", "-w", help="Follow the rollout live."),
    interval: str = typer.Option("2s", "--interval", help="Refresh period with --watch."),
    as_json: bool = JSON,
) -> None:
    """Per device type: the policy, endpoint counts by status and the version spread."""
    home = home_of(ctx)

    def rows() -> list[dict]:
        return fleet_overview(home.db, load_fleet_state(home.db))

    if as_json or not watch:
        data = rows()
        if as_json:
            emit_list(data, [], as_json=True)
        elif not data:
            stdout.print("No device types yet: add a package, or let endpoints poll.")
        else:
            stdout.print(_table(data))
        return
    period = parse_duration(interval).total_seconds()
    with Live(_table(rows()), console=stdout, auto_refresh=False) as live:
        while True:
            time.sleep(period)
            live.update(_table(rows()), refresh=True)
