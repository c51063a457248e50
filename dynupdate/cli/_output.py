"""The one place that turns results into output: Rich tables, or JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["Column", "emit_list", "emit_object", "say", "stderr", "stdout"]

# Piped output is read by people in mail and logs too: do not squeeze tables into
# the 80 columns Rich assumes when there is no terminal.
stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 200)

Column = tuple[str, str]  # (key in the data, header shown)


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return "  ".join(f"{k} {_cell(v)}" for k, v in value.items())
    return str(value)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    sys.stdout.flush()


def emit_list(
    rows: Sequence[dict],
    columns: Sequence[Column],
    *,
    as_json: bool,
    title: str | None = None,
    empty: str = "Nothing to show.",
) -> None:
    """A list: a JSON array of objects, or a table of the chosen columns."""
    if as_json:
        _print_json(list(rows))
        return
    if not rows:
        if empty:
            stderr.print(empty, markup=False, highlight=False)
        return
    table = Table(title=title, title_justify="left", header_style="bold")
    for _, header in columns:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(key)) for key, _ in columns))
    stdout.print(table)


def emit_object(data: dict, *, as_json: bool, title: str | None = None) -> None:
    """One object: a JSON object, or a two-column table of its fields."""
    if as_json:
        _print_json(data)
        return
    table = Table(title=title, title_justify="left", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in data.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            continue  # nested lists of objects get their own tables from the command
        table.add_row(key.replace("_", " "), _cell(value))
    stdout.print(table)


def say(message: str, *, quiet: bool = False) -> None:
    """A one-line confirmation on stderr, so stdout stays data only."""
    if not quiet:
        stderr.print(message, markup=False, highlight=False)
