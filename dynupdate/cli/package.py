"""dynupdate package …: upload, list, show and remove software packages."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

import dynupdate.cli.rollout as rollout_cli
from dynupdate.cli._app import home_of, state_of
from dynupdate.cli._output import JSON, TYPE_FILTER, emit_list, emit_object, say, stderr, visible
from dynupdate.cli._types import new_type_notice
from dynupdate.core.gates import RolloutOptions
from dynupdate.core.packages import (
    Package,
    add_package,
    get_package,
    list_packages,
    remove_package,
)
from dynupdate.core.rollout_records import Rollout
from dynupdate.core.rollouts import StartOnImport

app = typer.Typer(help="Software packages: one image per device type and version.")

COLUMNS = [
    ("type", "Type"),
    ("version", "Version"),
    ("name", "Name"),
    ("size", "Size"),
    ("sha256", "SHA-256"),
    ("uploaded", "Uploaded"),
    ("description", "Description"),
    ("blocked", "Blocked"),
]


@app.command("add")
def add(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="The package file to import."),
    type_: str = typer.Option(..., "--type", "-t", help="Device type, e.g. GroupSeries."),
    version: str = typer.Option(..., "--version", "-v", help="Its software version."),
    description: str | None = typer.Option(None, "--description", "-d"),
    rollout: bool = typer.Option(
        False,
        "--rollout",
        help="Start a rollout of it in the same transaction: no device sees "
        "it before the rollout exists. Options not given come from TYPE's latest rollout.",
    ),
    waves: str | None = rollout_cli.WAVES,
    soak: str | None = rollout_cli.SOAK,
    min_devices: int | None = rollout_cli.MIN_DEVICES,
    min_success: str | None = rollout_cli.MIN_SUCCESS,
    max_failures: int | None = rollout_cli.MAX_FAILURES,
    max_failure_rate: str | None = rollout_cli.MAX_FAILURE_RATE,
    max_in_flight: int | None = rollout_cli.MAX_IN_FLIGHT,
    max_per_hour: int | None = rollout_cli.MAX_PER_HOUR,
    max_attempts: int | None = rollout_cli.MAX_ATTEMPTS,
    install_timeout: str | None = rollout_cli.INSTALL_TIMEOUT,
    manual: bool | None = rollout_cli.MANUAL,
    as_json: bool = JSON,
) -> None:
    """Import a package file (streamed and hashed); the same file again is a no-op.

    Example: dynupdate package add gs-6.2.2.pup --type GroupSeries --version 6.2.2.0-100
    """
    home = home_of(ctx)
    given = rollout_cli.given_options(
        waves=waves, soak=soak, min_devices=min_devices, min_success=min_success,
        max_failures=max_failures, max_failure_rate=max_failure_rate,
        max_in_flight=max_in_flight, max_per_hour=max_per_hour, max_attempts=max_attempts,
        install_timeout=install_timeout, manual=manual,
    )  # fmt: skip
    if given and not rollout:
        raise typer.BadParameter(f"--{next(iter(given)).replace('_', '-')} needs --rollout.")
    if rollout:
        # Refused options are refused before the import, not after hashing gigabytes.
        RolloutOptions().given(**given)
    new_type = new_type_notice(home.db, type_)  # known before the import makes it known

    def run(progress: Callable[[int], None] | None) -> tuple[Package, bool, Rollout | None]:
        start = StartOnImport(given) if rollout else None
        package, created = add_package(
            home.db, home.store, file, type_, version, description, progress=progress, then=start
        )
        return package, created, start.started if start else None

    if sys.stderr.isatty():
        total = file.stat().st_size if file.is_file() else None
        with Progress(
            TextColumn("{task.description}", style="progress.description", markup=False),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            transient=True,
        ) as bar:
            task = bar.add_task(visible(f"Importing {file.name}"), total=total)
            package, created, started = run(lambda n: bar.advance(task, n))
    else:
        package, created, started = run(None)
    if as_json:
        emit_object(package.to_dict(), as_json=True)
    if created and new_type is not None:
        notice, warning = new_type
        say(notice, quiet=state_of(ctx).quiet and not warning)
    verb = "Added" if created else "Already present:"
    blocked = " (blocked: a rollout of its type is active)" if package.blocked else ""
    say(
        f"{verb} {package.type} {package.version} ({package.sha256[:12]}, {package.size} bytes)"
        f"{blocked}.",
        quiet=state_of(ctx).quiet,
    )
    if started is not None:
        rollout_cli.warn(started.options)
        say(
            f"Rollout of {started.type} {started.version} started: wave 1 of "
            f"{len(started.waves)} ({started.current_wave.label}) open.",
            quiet=state_of(ctx).quiet,
        )


@app.command("list")
def list_(ctx: typer.Context, type_: str | None = TYPE_FILTER, as_json: bool = JSON) -> None:
    """The packages view: type, version, name, size, SHA-256, upload time, description."""
    rows = [p.to_dict() for p in list_packages(home_of(ctx).db, type_)]
    emit_list(rows, COLUMNS, as_json=as_json, empty="No packages. Add one: dynupdate package add")


@app.command("show")
def show(
    ctx: typer.Context,
    type_: str = typer.Argument(..., metavar="TYPE"),
    version: str = typer.Argument(...),
    as_json: bool = JSON,
) -> None:
    """One package. Example: dynupdate package show GroupSeries 6.2.2.0-100"""
    home = home_of(ctx)
    package = get_package(home.db, type_, version)
    data = package.to_dict() | {"path": str(home.store.path_for(package.sha256))}
    emit_object(data, as_json=as_json)


@app.command("remove")
def remove(
    ctx: typer.Context,
    type_: str = typer.Argument(..., metavar="TYPE"),
    version: str = typer.Argument(...),
) -> None:
    """Remove a package (refused while a policy needs it)."""
    home = home_of(ctx)
    package = remove_package(home.db, home.store, type_, version)
    say(f"Removed {package.type} {package.version}.", quiet=state_of(ctx).quiet)
