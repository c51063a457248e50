"""dynupdate check: is the home whole?"""

from __future__ import annotations

import typer

from dynupdate.cli._app import home_of
from dynupdate.cli._output import JSON, emit_list, emit_object, say
from dynupdate.core.integrity import check_home

ATTENTION = 3  # exit status when something needs an admin


def check(
    ctx: typer.Context,
    repair: bool = typer.Option(
        False, "--repair", help="Remove what is safe to remove: orphan store files, stale temps."
    ),
    quick: bool = typer.Option(False, "--quick", help="Check sizes only, do not hash files."),
    as_json: bool = JSON,
) -> None:
    """Check the database and every package file; exit 0 when clean, 3 when attention is needed.

    Example: dynupdate check --repair
    """
    report = check_home(home_of(ctx), repair=repair, hash_files=not quick)
    if as_json:
        emit_object(report.to_dict(), as_json=True)
    else:
        rows = [f.to_dict() for f in report.findings]
        emit_list(
            rows,
            [
                ("kind", "Kind"),
                ("path", "Path"),
                ("detail", "Detail"),
                ("repairable", "Repairable"),
                ("repaired", "Repaired"),
            ],
            as_json=False,
            empty="",
        )
        verdict = "clean" if report.clean else "needs attention"
        say(
            f"Checked the database and {report.packages_checked} packages "
            f"({report.files_hashed} files hashed): {verdict}."
        )
    if not report.clean:
        raise typer.Exit(ATTENTION)
