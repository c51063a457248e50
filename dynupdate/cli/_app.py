"""The root command, its global options, and the one place errors become exit codes."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from dynupdate import __version__
from dynupdate.cli._output import literal, stderr
from dynupdate.core.errors import DynupdateError, one_line
from dynupdate.core.home import Home, open_home

__all__ = ["State", "app", "home_of", "state_of"]


class DynupdateGroup(TyperGroup):
    """Maps every expected failure to one line on stderr and exit 1."""

    # TyperGroup takes the click Context typer vendors privately; typer.Context is that one.
    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (DynupdateError, OSError, sqlite3.Error) as e:
            if os.environ.get("DYNUPDATE_DEBUG") == "1":
                raise
            stderr.print(literal(f"Error: {_message(e)}"))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            stderr.print("Interrupted.")
            raise typer.Exit(130) from None
        except (typer.TyperException, typer.Exit, typer.Abort):
            raise  # usage errors (exit 2) and deliberate exits
        except Exception as e:
            # A bug, not bad input; still no traceback for the admin.
            if os.environ.get("DYNUPDATE_DEBUG") == "1":
                raise
            stderr.print(
                literal(
                    f"Error: unexpected {type(e).__name__}: {_message(e)} "
                    "(run with DYNUPDATE_DEBUG=1 for the traceback)."
                )
            )
            raise typer.Exit(1) from None
        finally:
            state = ctx.obj
            if isinstance(state, State) and state.home is not None:
                state.home.close()


def _message(error: Exception) -> str:
    """What the admin reads about an error: one line, saying what to do where possible."""
    if isinstance(error, DynupdateError):
        text = str(error)
    elif isinstance(error, OSError):
        where = f" '{error.filename}'" if error.filename else ""
        text = f"{error.strerror or error}{where}."
    elif "locked" in str(error) or "busy" in str(error):
        text = f"The database is busy ({error}); try again."
    elif isinstance(error, sqlite3.Error):
        text = f"Database error: {error}."
    else:
        text = str(error)
    return one_line(text)


@dataclass
class State:
    home_path: Path | None
    quiet: bool
    home: Home | None = None


app = typer.Typer(
    cls=DynupdateGroup,
    help="Roll out software updates to a fleet of video-conferencing endpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
)


def _print_version(wanted: bool) -> None:
    if wanted:
        typer.echo(f"dynupdate {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    home: Path | None = typer.Option(
        None,
        "--home",
        envvar="DYNUPDATE_HOME",
        file_okay=False,
        help="Folder with the database, package store and TLS material.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No confirmation messages."),
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,  # before the missing command or a bad --home is noticed
        expose_value=False,
        help="Print the version and exit.",
    ),
) -> None:
    """Roll out software updates to a fleet of video-conferencing endpoints."""
    ctx.obj = State(home_path=home, quiet=quiet)


def state_of(ctx: typer.Context) -> State:
    return ctx.find_root().obj


def home_of(ctx: typer.Context) -> Home:
    """The opened home (created on first use), shared by the command's calls."""
    state = state_of(ctx)
    if state.home is None:
        state.home = open_home(state.home_path)
        if state.home.created:
            # Even with --quiet: a cron job or sudo with another $HOME lands here.
            stderr.print(literal(f"Created a new home at {state.home.path}"))
    return state.home
