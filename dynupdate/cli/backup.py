"""dynupdate backup / restore: a consistent copy of the home, taken while it is in use."""

from __future__ import annotations

from pathlib import Path

import typer

from dynupdate.cli._app import home_of, state_of
from dynupdate.cli._output import emit_object, say
from dynupdate.core.backup import backup_home, restore_home
from dynupdate.core.home import default_home


def backup(
    ctx: typer.Context,
    dest: Path = typer.Argument(..., help="A new (or empty) folder for the backup."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Copy the database (SQLite backup API) and the package store, while the server runs.

    Example: dynupdate backup /var/backups/dynupdate-2026-11-27
    """
    manifest = backup_home(home_of(ctx), dest)
    if as_json:
        emit_object(manifest, as_json=True)
    say(
        f"Backed up {manifest['packages']} package files and {manifest['endpoints']} endpoints "
        f"to {dest}.",
        quiet=state_of(ctx).quiet,
    )


def restore(
    ctx: typer.Context,
    source: Path = typer.Argument(..., help="A folder written by dynupdate backup."),
    force: bool = typer.Option(False, "--force", help="Replace the home's existing database."),
) -> None:
    """Restore a backup into the home (stop the server first); the backup is verified first."""
    state = state_of(ctx)
    home_path = (state.home_path or default_home()).expanduser()
    manifest = restore_home(source, home_path, force=force)
    say(f"Restored the backup of {manifest['created']} into {home_path}.", quiet=state.quiet)
