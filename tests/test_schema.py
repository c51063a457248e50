"""A shipped migration never changes: the schema each one leaves is pinned in schema.txt.

Homes migrated by an earlier release must end up with exactly the schema a
blank home gets today, so the SQL of a migration, including what a shared
helper (the generation triggers) writes for it, can never be edited once
released. The schema SQLite stores (``sqlite_master``: every table, index and
trigger with the text that created it) is compared after each migration with
the checked-in text. A new migration appends its section to schema.txt.
"""

from __future__ import annotations

from pathlib import Path

import sqlite_utils

from dynupdate.core.db import DB_NAME, migrations

PINNED = Path(__file__).with_name("schema.txt")


def _schema(db: sqlite_utils.Database) -> dict[tuple[str, str], str]:
    rows = db.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master"
        " WHERE tbl_name != ? AND sql IS NOT NULL",
        (migrations.migrations_table,),
    ).fetchall()
    return {(kind, name): f"-- {kind} {name} on {table}\n{sql};" for kind, name, table, sql in rows}


def schema_by_migration(path: Path) -> str:
    """Per migration, applied one by one: what it added to the schema, changed and dropped."""
    db = sqlite_utils.Database(path)
    names = [m.name for m in migrations._migrations]
    sections = []
    before: dict[tuple[str, str], str] = {}
    for i, name in enumerate(names):
        migrations.apply(db, stop_before=names[i + 1] if i + 1 < len(names) else None)
        after = _schema(db)
        lines = [f"==== {name}"]
        lines += [after[key] for key in sorted(after) if before.get(key) != after[key]]
        lines += [f"-- dropped {kind} {gone}" for kind, gone in sorted(before.keys() - after)]
        sections.append("\n".join(lines))
        before = after
    db.close()
    return "\n\n".join(sections) + "\n"


def test_each_shipped_migration_still_makes_the_schema_it_shipped_with(tmp_path):
    made = schema_by_migration(tmp_path / DB_NAME)
    assert made == PINNED.read_text(), (
        "A migration now makes another schema than schema.txt pins. A shipped migration "
        "must never change (write a new one); a new migration appends its section."
    )
