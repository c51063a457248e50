"""The one place that turns results into output: Rich tables, or JSON for scripts.

Whatever a device sent (serial, type, version, model, detail…) is shown as
the text it is: cells, titles and messages are :func:`literal` ``Text``
objects, which Rich never parses for markup (``[link=…]``) or emoji codes
(``:smile:``), and characters a terminal would obey instead of show (ESC,
BEL, C1 controls, bidi overrides…) are written as Python escapes such as
``\\x1b``. Both consoles also have markup, emoji codes and highlighting off,
so a plain string printed by mistake is not interpreted either.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dynupdate.core.rehearsal import Rehearsal
from dynupdate.core.times import parse_utc

__all__ = [
    "DRY_RUN",
    "JSON",
    "STALE_FILTER",
    "TYPE_FILTER",
    "WATCH",
    "WATCH_INTERVAL",
    "Column",
    "emit_list",
    "emit_object",
    "emit_rehearsal",
    "literal",
    "minute_utc",
    "say",
    "stderr",
    "stdout",
    "visible",
]


def _console(file_is_tty: bool, **options: Any) -> Console:
    # Piped output is read by people in mail and logs too: do not squeeze tables into
    # the 80 columns Rich assumes when there is no terminal.
    return Console(
        soft_wrap=True,
        width=None if file_is_tty else 200,
        markup=False,
        emoji=False,
        highlight=False,
        **options,
    )


stdout = _console(sys.stdout.isatty())
stderr = _console(sys.stderr.isatty(), stderr=True)

Column = tuple[str, str]  # (key in the data, header shown)

# The options every command that shows data, or rehearses a change, takes.
JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")
DRY_RUN = typer.Option(False, "--dry-run", help="Change nothing: show what the change would do.")
TYPE_FILTER = typer.Option(None, "--type", "-t", help="Only this device type.")
# The fleet views' filter (endpoint list, overview): one option, so both say "stale" alike.
STALE_FILTER = typer.Option(
    None,
    "--stale",
    help="Only devices not heard from (no poll, no report) for this long, e.g. 2h, 7d.",
)
# The live views (overview, rollout status) follow a rollout the same way.
WATCH = typer.Option(False, "--watch", "-w", help="Follow the rollout live.")
WATCH_INTERVAL = typer.Option("2s", "--interval", help="Refresh period with --watch.")


def minute_utc(moment: str | datetime) -> str:
    """A time in sentences to admins: ``2026-12-02 21:00 UTC`` (stored text or a datetime)."""
    when = parse_utc(moment) if isinstance(moment, str) else moment
    return when.strftime("%Y-%m-%d %H:%M UTC")


def visible(text: str) -> str:
    r"""``text`` with every character :meth:`str.isprintable` refuses written as an escape.

    Those are the C0 and C1 controls (ESC starts every terminal sequence,
    U+009B is a one-character CSI), DEL, format characters such as the bidi
    overrides, separators other than the space, surrogates, private-use and
    unassigned code points. Everything else, non-ASCII letters included, is
    kept; a backslash stays a backslash, so ``--json`` is the way to the exact
    value.

    >>> visible("E9\x1b]8;;https://evil.example/\x07")
    'E9\\x1b]8;;https://evil.example/\\x07'
    >>> visible("gnp\u202e.exe"), visible("Zürich [/x] :smile:")
    ('gnp\\u202e.exe', 'Zürich [/x] :smile:')
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def literal(value: Any, style: str = "") -> Text:
    """``value`` as a Rich ``Text`` shown exactly as it reads: see :func:`visible`."""
    return Text(visible(value if isinstance(value, str) else str(value)), style=style)


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


# JSON escapes C0 controls itself; these it leaves raw with ensure_ascii=False.
_RAW_IN_JSON = re.compile(r"[^\x00-\x7e]")


def _json_char(match: re.Match) -> str:
    char = match[0]
    return char if char.isprintable() else json.dumps(char)[1:-1]


def _print_json(data: Any) -> None:
    text = json.dumps(data, ensure_ascii=False, indent=2)
    # The same value for a parser, but DEL, C1 controls and bidi overrides reach a
    # terminal (or a pager) as \u escapes rather than as themselves.
    text = text.replace("\x7f", "\\u007f") if text.isascii() else _RAW_IN_JSON.sub(_json_char, text)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _table(title: str | None, **options: Any) -> Table:
    shown = literal(title, "table.title") if title else None  # a title may name a device
    return Table(title=shown, title_justify="left", **options)


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
            stderr.print(literal(empty))
        return
    table = _table(title, header_style="bold")
    for _, header in columns:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(literal(_cell(row.get(key))) for key, _ in columns))
    stdout.print(table)


def emit_object(data: dict, *, as_json: bool, title: str | None = None) -> None:
    """One object: a JSON object, or a two-column table of its fields."""
    if as_json:
        _print_json(data)
        return
    table = _table(title, show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in data.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            continue  # nested lists of objects get their own tables from the command
        table.add_row(literal(key.replace("_", " ")), literal(_cell(value)))
    stdout.print(table)


def say(message: str, *, quiet: bool = False) -> None:
    """A one-line confirmation on stderr, so stdout stays data only.

    One line: a newline in it is shown as ``\\n`` (it may come from a value a
    device sent); call it again for another line.
    """
    if not quiet:
        stderr.print(literal(message))


REHEARSAL_COLUMNS = [
    ("type", "Type"),
    ("version", "Version now"),
    ("devices", "Devices"),
    ("offered_version", "Offered"),
    ("offered_now", "Now"),
    ("offered_at_next_opening", "At next opening"),
    ("in_call", "In call"),
    ("up_to_date", "Up to date"),
    ("offered_version_before", "Offered before"),
]


def emit_rehearsal(rehearsal: Rehearsal, *, as_json: bool) -> None:
    """A dry run: per type and current version, what would be offered, when, and who waits."""
    data = rehearsal.to_dict()
    if as_json:
        emit_object(data, as_json=True)
        return
    emit_list(
        data["groups"],
        REHEARSAL_COLUMNS,
        as_json=False,
        title="Dry run (nothing changed)",
        empty="No endpoint concerned has polled yet.",
    )
    totals = data["totals"]
    opening = f" ({data['next_opening']})" if data["next_opening"] else ""
    say(
        f"Dry run: {totals['offered_now']} devices would be offered an update now, "
        f"{totals['offered_at_next_opening']} at the next window opening{opening}; "
        f"{totals['in_call']} excluded as in a call at their last poll; "
        f"{totals['changed']} would get another answer to their next poll than today."
    )
