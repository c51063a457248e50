"""dynupdate rollout …: move a device type to a new version wave by wave (SPEC section 6)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from dynupdate.cli._app import home_of, state_of
from dynupdate.cli._output import (
    JSON,
    TYPE_FILTER,
    WATCH,
    WATCH_INTERVAL,
    emit_list,
    emit_object,
    literal,
    say,
    stderr,
    stdout,
)
from dynupdate.core import rollout_records, rollouts
from dynupdate.core.durations import parse_duration
from dynupdate.core.gates import RolloutOptions
from dynupdate.core.rollout_records import RolloutSummary
from dynupdate.core.times import format_utc, utc_now
from dynupdate.core.vocabulary import RolloutState
from dynupdate.core.waves import format_percent

app = typer.Typer(help="Staged rollouts: a new version wave by wave, halting by itself.")

TYPE = typer.Argument(..., metavar="TYPE", help="The device type, e.g. GroupSeries.")

# Every option of a start, shared with `package add --rollout`: None means not given.
WAVES = typer.Option(
    None, "--waves", help="Cumulative shares, e.g. 1%,10%,50%,100% (default); 'trial' first: "
    "the trial devices alone.",
)  # fmt: skip
SOAK = typer.Option(None, "--soak", help="Least time a wave stays open (default 1h).")
MIN_DEVICES = typer.Option(
    None, "--min-devices", min=1, help="Outcomes needed before a wave passes (default 10)."
)
MIN_SUCCESS = typer.Option(
    None, "--min-success", help="Successes needed among outcomes and attempts (default 95%)."
)
MAX_FAILURES = typer.Option(None, "--max-failures", min=1, help="Halt at this many (default 5).")
MAX_FAILURE_RATE = typer.Option(
    None, "--max-failure-rate", help="Halt above this share of outcomes (default 10%)."
)
MAX_IN_FLIGHT = typer.Option(None, "--max-in-flight", min=1, help="Open attempts at once.")
MAX_PER_HOUR = typer.Option(None, "--max-per-hour", min=1, help="Attempts opened per hour.")
MAX_ATTEMPTS = typer.Option(
    None, "--max-attempts", min=1, help="Attempts per device before it is held (default 3)."
)
INSTALL_TIMEOUT = typer.Option(
    None, "--install-timeout", help="An attempt not verified by then has failed (default 2h)."
)
MANUAL = typer.Option(None, "--manual", help="Waves open only by `rollout advance`.")

COLUMNS = [
    ("type", "Type"),
    ("version", "Version"),
    ("stable_version", "Stable"),
    ("state", "State"),
    ("wave_label", "Wave"),
    ("offered", "Offered"),
    ("in_flight", "In flight"),
    ("succeeded", "Succeeded"),
    ("failed", "Failed"),
    ("held", "Held"),
    ("why", "Next wave"),
]


def given_options(**given: Any) -> dict[str, Any]:
    """The options an admin gave (for :meth:`RolloutOptions.given`)."""
    return {name: value for name, value in given.items() if value is not None}


def warn(options: RolloutOptions) -> None:
    if options.warning:
        stderr.print(literal(f"Warning: {options.warning}"))


def _row(summary: RolloutSummary) -> dict[str, Any]:
    data = summary.to_dict()
    labels = data["waves"]
    data["wave_label"] = f"{data['wave']}/{len(labels)} ({labels[data['wave'] - 1]})"
    gate = data["gate"]
    if data["state"] == RolloutState.HALTED:
        data["why"] = f"halted: {data['halt_reason']}"
    elif gate is None:
        data["why"] = data["state"]
    else:
        data["why"] = gate["blocked_by"] or "passes at the next evaluation"
    return data


@app.command("start")
def start(
    ctx: typer.Context,
    type_: str = TYPE,
    version: str = typer.Option(..., "--version", "-v", help="An uploaded version of TYPE."),
    waves: str | None = WAVES,
    soak: str | None = SOAK,
    min_devices: int | None = MIN_DEVICES,
    min_success: str | None = MIN_SUCCESS,
    max_failures: int | None = MAX_FAILURES,
    max_failure_rate: str | None = MAX_FAILURE_RATE,
    max_in_flight: int | None = MAX_IN_FLIGHT,
    max_per_hour: int | None = MAX_PER_HOUR,
    max_attempts: int | None = MAX_ATTEMPTS,
    install_timeout: str | None = INSTALL_TIMEOUT,
    manual: bool | None = MANUAL,
    dry_run: bool = typer.Option(False, "--dry-run", help="Change nothing: show the waves."),
    as_json: bool = JSON,
) -> None:
    """Start moving TYPE to VERSION wave by wave; wave 1 opens now.

    Example: dynupdate rollout start GroupSeries --version 6.2.2.0-100 --waves trial,10%,100%
    """
    home = home_of(ctx)
    options = RolloutOptions().given(
        **given_options(
            waves=waves, soak=soak, min_devices=min_devices, min_success=min_success,
            max_failures=max_failures, max_failure_rate=max_failure_rate,
            max_in_flight=max_in_flight, max_per_hour=max_per_hour, max_attempts=max_attempts,
            install_timeout=install_timeout, manual=manual,
        )
    )  # fmt: skip
    if dry_run:
        plan = rollouts.plan_rollout(home.db, type_, version, options)
        if as_json:
            emit_list(plan.waves, [], as_json=True)
            return
        emit_list(
            plan.waves,
            [("wave", "Wave"), ("devices", "Devices admitted (cumulative)")],
            as_json=False,
            title=f"Dry run (nothing changed): {plan.type} {plan.stable_version or '—'} → "
            f"{plan.version}",
        )
        stderr.print(literal(plan.estimate()))
        warn(options)
        return
    rollout = rollouts.start_rollout(home.db, type_, version, options)
    warn(options)
    if as_json:
        emit_object(rollout_records.rollout_views(home.db, rollout.type)[0].to_dict(), as_json=True)
    say(
        f"Rollout of {rollout.type} {rollout.version} started (stable "
        f"{rollout.stable_version or 'none'}): wave 1 of {len(rollout.waves)} "
        f"({rollout.current_wave.label}) open.",
        quiet=state_of(ctx).quiet,
    )


def _one_line(
    ctx: typer.Context, command: Any, type_: str, done: Callable[[Any], str]
) -> None:
    rollout = command(home_of(ctx).db, type_)
    say(f"Rollout of {rollout.type} {rollout.version} {done(rollout)}.", quiet=state_of(ctx).quiet)


@app.command("pause")
def pause(ctx: typer.Context, type_: str = TYPE) -> None:
    """Stop offering the new version (attempts in flight go on)."""
    _one_line(ctx, rollouts.pause_rollout, type_, lambda r: "paused")


@app.command("resume")
def resume(ctx: typer.Context, type_: str = TYPE) -> None:
    """Run a paused or halted rollout again (after a halt, its rules count afresh)."""
    _one_line(ctx, rollouts.resume_rollout, type_, lambda r: f"running (wave {r.wave})")


@app.command("advance")
def advance(ctx: typer.Context, type_: str = TYPE) -> None:
    """Open the next wave now, gate skipped; on the last wave, complete the rollout."""
    _one_line(
        ctx,
        rollouts.advance_rollout,
        type_,
        lambda r: "completed" if r.state == RolloutState.COMPLETED else f"wave {r.wave} opened",
    )


@app.command("abort")
def abort(ctx: typer.Context, type_: str = TYPE) -> None:
    """End the rollout: its version is blocked, devices go back to the stable version."""
    _one_line(
        ctx,
        rollouts.abort_rollout,
        type_,
        lambda r: f"aborted: {r.version} blocked, target {r.stable_version or 'none'}",
    )


@app.command("list")
def list_(ctx: typer.Context, type_: str | None = TYPE_FILTER, as_json: bool = JSON) -> None:
    """Every rollout, newest first."""
    rows = [_row(s) for s in rollout_records.list_rollouts(home_of(ctx).db, type_)]
    if as_json:
        emit_list([s for s in (_json(r) for r in rows)], [], as_json=True)
        return
    emit_list(rows, COLUMNS, as_json=False, empty="No rollouts yet.")


def _json(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("wave_label", "why")}


@app.command("status")
def status(
    ctx: typer.Context,
    type_: str | None = typer.Argument(None, metavar="[TYPE]"),
    watch: bool = WATCH,
    interval: str = WATCH_INTERVAL,
    as_json: bool = JSON,
) -> None:
    """Active rollouts and the latest of each type, with the gate in words."""
    home = home_of(ctx)
    if as_json:
        emit_list(
            [s.to_dict() for s in rollout_records.rollout_views(home.db, type_)], [], as_json=True
        )
        return
    if not watch:
        rows = [_row(s) for s in rollout_records.rollout_views(home.db, type_)]
        emit_list(rows, COLUMNS, as_json=False, empty="No rollouts yet.")
        return
    period = parse_duration(interval).total_seconds()

    def view() -> Group:
        return _live_view(home.db, rollout_records.rollout_views(home.db, type_))

    with Live(view(), console=stdout, auto_refresh=False) as live:
        while True:
            time.sleep(period)
            live.update(view(), refresh=True)


def _bar(done: int, total: int, width: int = 20) -> str:
    """A text bar, readable in mail and logs too.

    >>> _bar(3, 12, width=8)
    '██░░░░░░ 3/12'
    """
    share = done / total if total else 0.0
    full = round(width * share)
    return f"{'█' * full}{'░' * (width - full)} {done}/{total}"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def gate_in_words(summary: RolloutSummary) -> str:
    """What opens the next wave (or completes the rollout), and what it waits for now.

    From the ``gate`` object, e.g. "Next wave (50%) from 2026-12-02T14:05:00Z if
    ≥ 95% of ≥ 10 outcomes succeed; waiting for: 7 of 10 outcomes; 3 attempts in
    flight". Empty for a rollout that is over.
    """
    rollout, gate = summary.rollout, summary.gate
    type_ = rollout.type
    if rollout.state == RolloutState.PAUSED:
        return f"Paused: {rollout.version} is offered to nobody; dynupdate rollout resume {type_}"
    if gate is None:  # completed or aborted
        return ""
    step = "Completes" if rollout.last_wave else f"Next wave ({rollout.waves[rollout.wave].label})"
    if rollout.options.manual:
        return f"{step} by hand: dynupdate rollout advance {type_}"
    success = format_percent(rollout.options.min_success)
    if gate.needed:
        evidence = f" if ≥ {success} of ≥ {_plural(gate.needed, 'outcome')} succeed"
    else:
        evidence = " (no live device of its own)"  # it passes after its soak
    rule = f"{step} from {format_utc(rollout.next_wave_at())}{evidence}"
    if gate.blocked_by is None:
        return f"{rule}: passes at the next evaluation"
    return f"{rule}; waiting for: {gate.blocked_by}"


def _live_view(db: Any, summaries: list[RolloutSummary]) -> Group:
    parts: list[Any] = [literal(f"Rollouts — {format_utc(utc_now())}", "table.title")]
    if not summaries:
        parts.append(literal("No rollouts yet."))
    for summary in summaries:
        parts.extend(_one_rollout(db, summary))
        parts.append(Text(""))
    return Group(*parts)


def _one_rollout(db: Any, summary: RolloutSummary) -> list[Any]:
    """One rollout of the live view: head, a bar per wave, counts, the gate or the halt."""
    data, rollout = summary.to_dict(), summary.rollout
    state = str(rollout.state)
    halted = state == RolloutState.HALTED
    wave = rollout.current_wave
    head = Text.assemble(
        literal(f"{rollout.type} {rollout.stable_version or '—'} → {rollout.version}  ", "bold"),
        literal(state.upper() if halted else state, "bold red" if halted else "bold"),
        literal(f"  wave {rollout.wave} of {len(rollout.waves)} ({wave.label})"),
        literal(f"  started {format_utc(rollout.started_at)}"),
        literal(f"  finished {format_utc(rollout.finished_at)}" if rollout.finished_at else ""),
    )
    table = Table(show_header=True, header_style="bold", box=None, padding=(0, 1))
    for header in ("Wave", "", f"Own devices on {rollout.version}"):
        table.add_column(literal(header))
    for index, progress in enumerate(rollout_records.wave_progress(db, rollout), 1):
        if index == rollout.wave and rollout.state.active:
            mark = "▶"
        else:
            mark = "✓" if progress["open"] else ""
        table.add_row(
            literal(progress["wave"]),
            literal(mark),
            literal(_bar(progress["succeeded"], progress["devices"])),
        )
    counts = "  ".join(
        f"{label} {data[key]}"
        for key, label in (
            ("offered", "offered"),
            ("in_flight", "in flight"),
            ("succeeded", "succeeded"),
            ("failed", "failed"),
            ("held", "held"),
        )
    )
    parts: list[Any] = [head, table, literal(counts)]
    if halted:
        parts.append(literal(f"Halted: {rollout.halt_reason}", "bold red"))
        for failure in rollout_records.failures(db, rollout):
            tries = _plural(failure["attempts"], "attempt")
            # The detail is what the device said: literal, whatever it holds.
            parts.append(
                literal(
                    f"  {failure['serial']}  {failure['failed_at']}  {tries}  "
                    f"{failure['detail'] or ''}",
                    "red",
                )
            )
        parts.append(
            literal(
                f"Then: dynupdate rollout resume {rollout.type} (the halt rules count afresh)"
                f"  or  dynupdate rollout abort {rollout.type}"
            )
        )
    elif words := gate_in_words(summary):
        parts.append(literal(words))
    return parts
