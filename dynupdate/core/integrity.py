"""``dynupdate check``: is the home whole? Database, package files, leftovers."""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

from dynupdate import __version__
from dynupdate.core import audit
from dynupdate.core.db import DB_NAME, migrations, write
from dynupdate.core.home import Home
from dynupdate.core.store import claim_temp, is_sha256

__all__ = ["Finding", "Report", "check_home", "file_sha256", "schema_problems"]


@dataclass(frozen=True)
class Finding:
    # database, schema, audit-log, missing-file, wrong-size, wrong-sha256, orphan-file,
    # stale-temp, stray
    kind: str
    path: str
    detail: str
    repairable: bool
    repaired: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    packages_checked: int = 0
    files_hashed: int = 0

    @property
    def clean(self) -> bool:
        return all(f.repaired for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "packages_checked": self.packages_checked,
            "files_hashed": self.files_hashed,
            "findings": [f.to_dict() for f in self.findings],
        }


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_home(home: Home, *, repair: bool = False, hash_files: bool = True) -> Report:
    """Check the database and the store; with ``repair``, remove what is safe to remove.

    Safe to remove: store files no package row references and temp files no
    live import holds. Never removed: a package's file, even a corrupt one
    (the admin decides: ``package remove`` and upload again).
    """
    report = Report()
    problems = [row[0] for row in home.db.execute("PRAGMA integrity_check")]
    if problems != ["ok"]:
        for problem in problems:
            report.findings.append(Finding("database", str(home.path), problem, False))
    for problem in schema_problems(home.db.conn):
        report.findings.append(Finding("schema", str(home.path / DB_NAME), problem, False))
    chain = audit.verify(home.db)
    if not chain.intact:
        detail = f"entry {chain.first_bad_id}: {chain.problem}; see: dynupdate log --verify"
        report.findings.append(Finding("audit-log", str(home.path / DB_NAME), detail, False))
    rows = home.db.execute("SELECT type, version, sha256, size FROM packages").fetchall()
    referenced = {sha for _, _, sha, _ in rows}
    report.packages_checked = len(rows)
    checked: set[str] = set()
    for type_, version, sha, size in rows:
        path = home.store.path_for(sha)
        label = f"{type_} {version}"
        if not path.is_file():
            report.findings.append(Finding("missing-file", str(path), f"{label}: no file", False))
            continue
        if sha in checked:
            continue
        checked.add(sha)
        actual = path.stat().st_size
        if actual != size:
            report.findings.append(
                Finding("wrong-size", str(path), f"{label}: {actual} bytes, expected {size}", False)
            )
        elif hash_files:
            report.files_hashed += 1
            if file_sha256(path) != sha:
                report.findings.append(
                    Finding("wrong-sha256", str(path), f"{label}: content changed", False)
                )
    stale = [temp for temp in _temp_files(home) if _unused(temp)]
    if repair:
        home.store.clean_temp()
    for temp in stale:
        report.findings.append(
            Finding(
                "stale-temp", str(temp), "left by a killed import", True, repaired=not temp.exists()
            )
        )
    for folder in sorted(p for p in home.store.root.iterdir() if p.is_dir()):
        if folder == home.store.temp_dir:
            continue
        for path in sorted(folder.iterdir()):
            name = path.name
            if is_sha256(name) and folder.name == name[:2]:
                if name in referenced:
                    continue
                kind, detail = "orphan-file", "no package references it"
            else:
                kind, detail = "stray", "not a store file"
            done = False
            if repair and kind == "orphan-file":
                done = _remove_orphan(home, path, name)
            report.findings.append(Finding(kind, str(path), detail, kind == "orphan-file", done))
    return report


def schema_problems(conn: sqlite3.Connection) -> list[str]:
    """What in this database's schema dynupdate's migrations do not create, one line each.

    The expected schema is that of a blank database on which the same
    migrations ran: a trigger, view, index or table added beside them (a
    trigger rewriting ``policies``, say) or an object altered is named. A
    migration this version does not know means a newer dynupdate wrote it.
    """
    db = sqlite_utils.Database(conn, execute_plugins=False)
    applied = [m.name for m in migrations.applied(db)]
    known = [m.name for m in migrations.pending(sqlite_utils.Database(memory=True))]
    unknown = [name for name in applied if name not in known]
    if unknown:
        return [
            f"migration {unknown[0]!r} is unknown to dynupdate {__version__} "
            "(a newer version wrote this database)"
        ]
    if applied != known[: len(applied)]:
        return [f"migrations applied out of order: {', '.join(applied)}"]
    blank = sqlite_utils.Database(memory=True, execute_plugins=False)
    try:
        rest = known[len(applied) :]
        migrations.apply(blank, stop_before=rest[0] if rest else None)
        expected = _schema(blank.conn)
    finally:
        blank.close()
    actual = _schema(conn)
    problems = []
    for key, (table, sql) in actual.items():
        kind, name = key
        if key not in expected:
            problems.append(f"{kind} {name!r} is not created by dynupdate's migrations")
        elif expected[key] != (table, sql) and table != migrations.migrations_table:
            # The bookkeeping table of sqlite-utils is compared by name only: its
            # SQL text depends on the sqlite-utils version that created it.
            problems.append(f"{kind} {name!r} differs from the one dynupdate's migrations create")
    for kind, name in expected.keys() - actual.keys():
        problems.append(f"{kind} {name!r} is missing")
    return problems


# Statistics ANALYZE may leave: they steer the query planner, never a value.
_STATISTICS = {"sqlite_stat1", "sqlite_stat4"}
# Litestream's bookkeeping tables, which it creates in every database it replicates
# (docs/high-availability.md): nothing of dynupdate reads them. Only these tables are
# let through; an index, trigger or view on them is still named.
_LITESTREAM = {"_litestream_seq", "_litestream_lock"}


def _schema(conn: sqlite3.Connection) -> dict[tuple[str, str], tuple[str, str | None]]:
    rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY rowid")
    return {
        (kind, name): (table, sql)
        for kind, name, table, sql in rows
        if not (kind == "table" and name in _STATISTICS | _LITESTREAM)
    }


def _temp_files(home: Home) -> list[Path]:
    if not home.store.temp_dir.is_dir():
        return []
    return sorted(home.store.temp_dir.iterdir())


def _unused(temp: Path) -> bool:
    with claim_temp(temp) as unused:
        return unused


def _remove_orphan(home: Home, path: Path, sha256: str) -> bool:
    """Delete under the write lock, so an import committing these bytes cannot race it."""
    with write(home.db):
        used = home.db.execute(
            "SELECT 1 FROM packages WHERE sha256 = ? LIMIT 1", (sha256,)
        ).fetchone()
        if used:
            return False
        path.unlink(missing_ok=True)
    return True
