"""Packages: one software image for one device type at one version."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from dynupdate.core import audit
from dynupdate.core.db import write
from dynupdate.core.decision import Policy, target_package
from dynupdate.core.devices import type_key, validate_type
from dynupdate.core.errors import Conflict, InvalidInput, NotFound
from dynupdate.core.store import PackageStore
from dynupdate.core.times import format_utc, utc_now
from dynupdate.core.versions import same_version, validate_version, version_key

__all__ = [
    "Package",
    "add_package",
    "find_package",
    "get_package",
    "list_packages",
    "remove_package",
    "require_package",
]

MAX_DESCRIPTION = 1000


@dataclass(frozen=True)
class Package:
    type: str
    version: str
    name: str
    size: int
    sha256: str
    description: str | None
    uploaded: str
    # An aborted rollout's version (or one uploaded during a rollout): never an
    # allow-newer target, never offered, until a policy or rollout names it.
    blocked: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any] | sqlite3.Row) -> Package:
        values = {name: row[name] for name in cls.__dataclass_fields__}
        values["blocked"] = bool(values["blocked"])
        return cls(**values)


_COLUMNS = "type, version, name, size, sha256, description, uploaded, blocked"


def _rows(
    db: sqlite_utils.Database, where: str = "", params: tuple[Any, ...] = ()
) -> list[Package]:
    cursor = db.execute(f"SELECT {_COLUMNS} FROM packages {where}", params)
    names = [d[0] for d in cursor.description]
    return [Package.from_row(dict(zip(names, row, strict=True))) for row in cursor]


def _sorted(packages: list[Package]) -> list[Package]:
    return sorted(packages, key=lambda p: (type_key(p.type), version_key(p.version)))


def list_packages(db: sqlite_utils.Database, type_: str | None = None) -> list[Package]:
    """All packages (of one type), by type then version order."""
    if type_ is None:
        return _sorted(_rows(db))
    return _sorted(_rows(db, "WHERE type_key = ?", (type_key(type_),)))


def find_package(db: sqlite_utils.Database, type_: str, version: str) -> Package | None:
    """The package of this type at this version (any spelling: 6.2 finds 6.2.0), or None."""
    for package in _rows(db, "WHERE type_key = ?", (type_key(type_),)):
        if same_version(package.version, version):
            return package
    return None


def get_package(db: sqlite_utils.Database, type_: str, version: str) -> Package:
    package = find_package(db, type_, version)
    if package is None:
        raise NotFound(f"No package {type_} {version}. See: dynupdate package list --type {type_}")
    return package


def require_package(db: sqlite_utils.Database, type_: str, version: str) -> Package:
    """The package a policy is to use: refused, listing the versions there are, when absent."""
    validate_type(type_)
    package = find_package(db, type_, version)
    if package is None:
        available = [p.version for p in list_packages(db, type_)]
        listed = ", ".join(available) if available else "none uploaded"
        raise InvalidInput(f"No package {type_} {version} to use; available versions: {listed}.")
    return package


def _type_spelling(db: sqlite_utils.Database, type_: str) -> str:
    """The spelling a type was first given, so ``trio`` joins ``Trio``."""
    for table in ("packages", "policies"):
        row = db.execute(
            f"SELECT type FROM {table} WHERE type_key = ? LIMIT 1", (type_key(type_),)
        ).fetchone()
        if row:
            spelling: str = row[0]
            return spelling
    return type_


def add_package(
    db: sqlite_utils.Database,
    store: PackageStore,
    source: Path,
    type_: str,
    version: str,
    description: str | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    actor: str | None = None,
    then: Callable[[sqlite_utils.Database, Package, bool], None] | None = None,
) -> tuple[Package, bool]:
    """Import ``source`` as the package of ``type_`` at ``version``.

    Returns the package and whether it was new. The identical file again is a
    no-op (and appends nothing to the audit log); a different file for an
    existing type and version is refused. ``actor``: see :func:`audit.append`.
    A package uploaded while a rollout of its type is active is blocked.
    ``then(db, package, new)`` runs inside the import's transaction (``package
    add --rollout`` starts its rollout there, so no device sees V before it).
    """
    validate_type(type_)
    validate_version(version)
    if description is not None and (
        len(description) > MAX_DESCRIPTION or any(ord(c) < 32 for c in description)
    ):
        raise InvalidInput(f"Invalid description: at most {MAX_DESCRIPTION} characters, one line.")
    existing = find_package(db, type_, version)
    if existing is not None and source.is_file() and source.stat().st_size != existing.size:
        raise _different(existing)
    with store.stage(source, progress) as staged:
        with write(db):
            existing = find_package(db, type_, version)
            if existing is not None:
                if existing.sha256 != staged.sha256:
                    _forget_if_unused(db, store, staged.sha256)
                    raise _different(existing)
                store.relink(staged)
                if then is not None:
                    then(db, existing, False)
                return existing, False
            store.relink(staged)
            package = Package(
                type=_type_spelling(db, type_),
                version=version,
                name=source.name,
                size=staged.size,
                sha256=staged.sha256,
                description=description,
                uploaded=format_utc(utc_now()),
                blocked=_rollout_active(db, type_),
            )
            db.execute(
                "INSERT INTO packages (type, type_key, version, name, size, sha256, description,"
                " uploaded, blocked) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    package.type,
                    type_key(package.type),
                    package.version,
                    package.name,
                    package.size,
                    package.sha256,
                    package.description,
                    package.uploaded,
                    int(package.blocked),
                ),
            )
            detail = {
                "version": package.version,
                "sha256": package.sha256,
                "size": package.size,
                "name": package.name,
            }
            audit.append(db, actor, audit.Action.PACKAGE_ADD, package.type, detail)
            if then is not None:
                then(db, package, True)
        return package, True


def _rollout_active(db: sqlite_utils.Database, type_: str) -> bool:
    # Read here rather than through core.rollouts, which builds on packages.
    return (
        db.execute(
            "SELECT 1 FROM rollouts WHERE type_key = ? AND state IN ('running', 'paused',"
            " 'halted')",
            (type_key(type_),),
        ).fetchone()
        is not None
    )


def _different(existing: Package) -> Conflict:
    return Conflict(
        f"Package {existing.type} {existing.version} already exists with another file "
        f"(sha256 {existing.sha256[:12]}…); remove it first or use another version."
    )


def _forget_if_unused(db: sqlite_utils.Database, store: PackageStore, sha256: str) -> None:
    """Delete a stored file no row references; call inside a write transaction."""
    used = db.execute("SELECT 1 FROM packages WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone()
    if not used:
        store.delete(sha256)


def remove_package(
    db: sqlite_utils.Database,
    store: PackageStore,
    type_: str,
    version: str,
    *,
    actor: str | None = None,
) -> Package:
    """Remove a package; refused while a policy needs it (its version to use or target)."""
    with write(db):
        package = get_package(db, type_, version)
        row = db.execute(
            "SELECT type, version_to_use, allow_newer FROM policies"
            " WHERE type_key = ? AND version_to_use IS NOT NULL",
            (type_key(package.type),),
        ).fetchone()
        if row is not None:
            policy = Policy(row[0], row[1], bool(row[2]))
            target = target_package(policy, list_packages(db, package.type))
            if package.version in (policy.version_to_use, target and target.version):
                raise Conflict(
                    f"Package {package.type} {package.version} is needed by the {policy.type} "
                    f"policy (version to use {policy.version_to_use}, target "
                    f"{target and target.version}); change it first: "
                    f"dynupdate policy set {policy.type} --version …"
                )
        rollout = db.execute(
            "SELECT state, version, stable_version FROM rollouts WHERE type_key = ?"
            " AND state IN ('running', 'paused', 'halted')",
            (type_key(package.type),),
        ).fetchone()
        if rollout is not None and package.version in rollout[1:]:
            role = "the version" if package.version == rollout[1] else "the stable version"
            raise Conflict(
                f"Package {package.type} {package.version} is {role} of the {rollout[0]} rollout"
                f" of {package.type}: dynupdate rollout abort {package.type} first."
            )
        db.execute(
            "DELETE FROM packages WHERE type_key = ? AND version = ?",
            (type_key(package.type), package.version),
        )
        detail = {"version": package.version, "sha256": package.sha256}
        audit.append(db, actor, audit.Action.PACKAGE_REMOVE, package.type, detail)
    # The file goes only after the DELETE is durable: a kill in between leaves an
    # orphan file (which `check --repair` removes), never a row without its file.
    # The check and the unlink share a write transaction, so an import of the
    # same bytes cannot commit its row between them.
    with write(db):
        _forget_if_unused(db, store, package.sha256)
    return package
