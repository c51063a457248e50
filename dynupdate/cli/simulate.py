"""dynupdate simulate: a fleet of reference endpoints against a running server."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import signal
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from dynupdate.cli._output import emit_list, emit_object, literal, say, stderr, visible
from dynupdate.core.vocabulary import Status

if TYPE_CHECKING:
    from dynupdate.endpoint.simulation import Simulation

__all__ = ["simulate"]

TYPE_COLUMNS = [
    ("type", "Type"),
    ("devices", "Devices"),
    (Status.UP_TO_DATE, "On target"),
    (Status.PENDING, "Pending"),
    (Status.IN_PROGRESS, "In progress"),
    (Status.FAILED, "Failed"),
    (Status.NO_POLICY, "No policy"),
    ("not_polled", "Not polled yet"),
    (Status.WAITING, "Waiting"),
    (Status.HELD, "Held"),
]


class Download(enum.StrEnum):
    full = "full"
    head = "head"


def simulate(
    ctx: typer.Context,
    url: str = typer.Option(..., "--url", help="The server, e.g. https://updates:8443."),
    cafile: Path | None = typer.Option(None, "--cafile", help="Trust the server by this CA file."),
    pin: str | None = typer.Option(
        None, "--pin", help="Trust the server by its certificate's SHA-256 (as serve prints it)."
    ),
    endpoints: int = typer.Option(100, "--endpoints", "-n", min=1, max=1_000_000),
    fleet: str = typer.Option(
        ..., "--fleet", help="Types and starting versions: GroupSeries=6.2.1:70%,Trio=7.1.0:30%."
    ),
    peripherals: int = typer.Option(0, "--peripherals", min=0, max=64, help="Per endpoint."),
    peripheral_fleet: str = typer.Option(
        "EagleEyeIV=1.0.0", "--peripheral-fleet", help="Peripheral types, like --fleet."
    ),
    in_call: str = typer.Option("0%", "--in-call", help="Share of endpoints in a call at start."),
    call_length: str = typer.Option("1m", "--call-length", help="Longest call (each 50-100%)."),
    fail: str = typer.Option("0%", "--fail", help="Share of devices whose install fails."),
    fail_version: str | None = typer.Option(
        None, "--fail-version", help="Installs of V fail on P% of T's devices: T=V:P%,…"
    ),
    revert_version: str | None = typer.Option(
        None,
        "--revert-version",
        help="P% of T's devices report V installed, then poll on their old version: T=V:P%,…",
    ),
    brick_version: str | None = typer.Option(
        None,
        "--brick-version",
        help="P% of T's devices report installing V, then go silent for good: T=V:P%,…",
    ),
    poll_interval: str | None = typer.Option(
        None, "--poll-interval", help="Override the server's pollInterval: 5s, 0.5 (seconds)."
    ),
    download: Download = typer.Option(
        Download.full, "--download", help="full: fetch and verify every byte; head: headers only."
    ),
    duration: str | None = typer.Option(None, "--duration", help="Stop after this long: 10m."),
    until_done: bool = typer.Option(
        False, "--until-done", help="Stop once every device is on target, failed or unmanaged."
    ),
    concurrency: int = typer.Option(200, "--concurrency", min=1, help="Connections at once."),
    ramp: str | None = typer.Option(None, "--ramp", help="Spread first polls over this long."),
    timeout: str = typer.Option("30s", "--timeout", help="Per connection and read."),
    prefix: str = typer.Option("SIM", "--serial-prefix", help="Serials are PREFIX000001…"),
    seed: int | None = typer.Option(None, "--seed", help="Same seed, same fleet."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Rehearse a rollout: thousands of virtual endpoints poll, download and install.

    Example: dynupdate simulate --url https://host:8443 --pin 3f5c… --fleet Trio=7.1 --until-done
    """
    # Imported here: TLS and HTTP client code every other command can do without.
    from dynupdate.endpoint.simulation import Simulation, parse_seconds

    limit = parse_seconds(duration, "--duration") if duration else None
    with tempfile.TemporaryDirectory(prefix="dynupdate-simulate-") as work:
        simulation = Simulation.from_options(
            url,
            cafile=cafile,
            pin=pin,
            endpoints=endpoints,
            fleet=fleet,
            peripherals=peripherals,
            peripheral_fleet=peripheral_fleet,
            in_call=in_call,
            call_length=call_length,
            fail=fail,
            fail_version=fail_version,
            revert_version=revert_version,
            brick_version=brick_version,
            poll_interval=poll_interval,
            download=download.value,
            concurrency=concurrency,
            ramp=ramp,
            timeout=timeout,
            prefix=prefix,
            seed=seed,
            workdir=Path(work),
        )
        # Even with --quiet: a rehearsal against the production server stays in its fleet.
        warning = (
            f"Warning: these {endpoints} virtual endpoints"
            f"{' and their peripherals' if peripherals else ''} register in the server's"
            f" database like real devices (serials {prefix}…); remove them after the rehearsal:"
            f" dynupdate endpoint forget --prefix {prefix}"
        )
        summary = asyncio.run(_run(simulation, until_done, limit, warning))
    if as_json:
        emit_object(summary, as_json=True)
    else:
        shown = {k: v for k, v in summary.items() if k != "types"}
        shown["errors"] = shown["errors"] or "none"
        emit_object(shown, as_json=False, title="Rehearsal")
        rows = [_flat(row) for row in summary["types"]]
        emit_list(rows, TYPE_COLUMNS, as_json=False, title="Devices by type")
    if until_done and not summary["done"]:
        left = summary["to_update"]
        say(f"Not done after {summary['elapsed_seconds']:g} s: {left} devices still to update.")
        raise typer.Exit(1)


def _flat(row: dict) -> dict:
    """A type's row with its counts beside its other columns, for a table."""
    return {**{k: v for k, v in row.items() if k != "counts"}, **row["counts"]}


async def _run(
    simulation: Simulation, until_done: bool, limit: float | None, warning: str
) -> dict:
    """Run with a live view on a terminal; Ctrl-C stops it and still gives the summary.

    ``warning`` is said once the server answered, before any device polls.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await simulation.client.probe()  # a wrong URL or trust fails once, clearly
        say(warning)
        if not stderr.is_terminal:
            return await simulation.run(until_done=until_done, duration=limit, stop=stop)
        with Live(_view(simulation), console=stderr, auto_refresh=False, transient=True) as live:
            task = asyncio.create_task(
                simulation.run(until_done=until_done, duration=limit, stop=stop)
            )
            while not task.done():
                await asyncio.wait([task], timeout=0.5)
                live.update(_view(simulation), refresh=True)
            return task.result()
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)


def _view(simulation: Simulation) -> Group:
    stats = simulation.client.stats
    percent = simulation.on_target_percent()
    errors = ", ".join(f"{kind} {n}" for kind, n in sorted(stats.errors.items())) or "none"
    head = Text.assemble(
        ("Rehearsal ", "bold"),
        visible(f"{simulation.client.url}  {simulation.elapsed():6.1f} s  "),
        f"polls {stats.polls} ({simulation.polls_per_second():.0f}/s)  ",
        f"downloaded {stats.bytes_downloaded / 1e6:.1f} MB  ",
        (visible(f"errors: {errors}"), "red" if stats.errors else ""),
    )
    bar = "—" if percent is None else f"{'█' * round(percent / 5)}{'░' * (20 - round(percent / 5))}"
    shown = "" if percent is None else f" {percent:.0f}% on target"
    table = Table(header_style="bold", box=None)
    for key, header in TYPE_COLUMNS:
        table.add_column(header, justify="left" if key == "type" else "right")
    for row in map(_flat, simulation.types()):
        table.add_row(*(literal(row[key]) for key, _ in TYPE_COLUMNS))
    return Group(head, Text(bar + shown), table)
