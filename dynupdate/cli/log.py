"""dynupdate log: who changed what, when; and whether anyone rewrote it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlite_utils
import typer

from dynupdate.cli._app import home_of, state_of
from dynupdate.cli._output import JSON, emit_list, emit_object, say, stderr, stdout
from dynupdate.core.audit import Entry, list_entries, verify
from dynupdate.core.durations import parse_duration
from dynupdate.core.errors import InvalidInput
from dynupdate.core.store import is_sha256
from dynupdate.core.times import parse_utc, utc_now

ATTENTION = 3  # exit status of a broken chain, as `check`
COLUMNS = [
    ("time", "Time"),
    ("actor", "Actor"),
    ("action", "Action"),
    ("type", "Type"),
    ("summary", "Detail"),
]
SUMMARY_ITEMS = 3  # pairs shown of a long list (a key import names thousands)


def _local(time: str) -> str:
    moment = parse_utc(time)
    assert moment is not None
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _value(value: Any) -> str:
    if isinstance(value, list):
        if not value:
            return "none"
        if all(isinstance(v, list) for v in value):
            shown = ", ".join(" ".join(map(str, v)) for v in value[:SUMMARY_ITEMS])
            more = len(value) - SUMMARY_ITEMS
            return f"{len(value)} ({shown}{f', +{more}' if more > 0 else ''})"
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return "{" + summary(value) + "}"
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str) and is_sha256(value):
        return value[:12] + "…"
    return str(value)


def summary(detail: dict[str, Any]) -> str:
    """One line of an entry's detail: ``key value`` pairs, long lists counted."""
    return "  ".join(f"{key.replace('_', ' ')} {_value(v)}" for key, v in detail.items())


def _row(entry: Entry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "time": _local(entry.time),
        "actor": entry.actor,
        "action": entry.action,
        "type": entry.type,
        "summary": summary(entry.detail),
    }


def log(
    ctx: typer.Context,
    type_: str | None = typer.Option(
        None, "--type", "-t", help="Only entries about this device type (any case)."
    ),
    limit: int = typer.Option(
        50, "--limit", "-n", min=0, help="At most this many entries, newest first; 0: all."
    ),
    since: str | None = typer.Option(None, "--since", help="Only the last D, e.g. 2h, 7d."),
    verify_: bool = typer.Option(
        False,
        "--verify",
        help="Check the hash chain: exit 0 when intact, 3 naming the first bad entry; "
        "prints the newest entry's SHA-256 to keep elsewhere.",
    ),
    as_json: bool = JSON,
) -> None:
    """The audit log: every change made through the CLI or by the server, newest first.

    Example: dynupdate log --type GroupSeries --since 7d
    """
    db = home_of(ctx).db
    if verify_:
        _verify(db, as_json, quiet=state_of(ctx).quiet)
        return
    cutoff = None
    if since is not None:
        try:
            cutoff = utc_now() - parse_duration(since)
        except OverflowError:
            cutoff = datetime.min.replace(tzinfo=UTC)
    if type_ is not None and not type_.strip():
        raise InvalidInput("Invalid --type '': name a device type, e.g. GroupSeries.")
    entries = list_entries(db, type_=type_, limit=limit or None, since=cutoff)
    if as_json:
        rows = [entry.to_dict() for entry in entries]
        emit_list(rows, [], as_json=True)
        return
    emit_list(
        [_row(entry) for entry in entries],
        [("id", "#"), *COLUMNS],
        as_json=False,
        empty="No entries.",
    )


def _verify(db: sqlite_utils.Database, as_json: bool, *, quiet: bool) -> None:
    result = verify(db)
    if as_json:
        emit_object(result.to_dict(), as_json=True)
    elif result.intact:
        # The hash on stdout alone, for scripts to keep; the words on stderr.
        if result.newest_sha256:
            stdout.print(result.newest_sha256, markup=False, highlight=False)
        newest = f", the newest is #{result.entries} (its SHA-256 above)" if result.entries else ""
        say(f"Audit log intact: {result.entries} entries{newest}.", quiet=quiet)
    else:
        message = f"Audit log broken at entry {result.first_bad_id}: {result.problem}."
        stderr.print(message, markup=False, highlight=False)
    if not result.intact:
        raise typer.Exit(ATTENTION)
