"""The audit log: who changed what, when, in a hash chain nobody can quietly rewrite.

Every change appends one entry *in the transaction of the change* (call
:func:`append` inside the caller's ``write(db)`` block), so a change without
its entry, or an entry without its change, cannot be committed.

Each entry stores ``prev``, the SHA-256 of its predecessor (64 zeros for the
first), and ``sha256``, the SHA-256 of its own canonical content: the UTF-8
bytes of the JSON object of ``id``, ``time``, ``actor``, ``action``,
``type``, ``detail`` and ``prev``, keys sorted, no spaces, non-ASCII kept
as is (Python: ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=False)``). ``detail`` is stored as exactly that JSON text of
its object, so the content can be rebuilt from a row without parsing it.
Triggers refuse ``UPDATE`` and ``DELETE``; a
deliberate ``sqlite3`` session can drop them, which :func:`verify` finds:
a changed, removed or inserted row breaks the chain at that row, and a log
cut short shows in the newest SHA-256 (keep it elsewhere).

>>> canonical(1, "2026-12-02T12:00:00Z", "ada", "window.clear", None, {}, ZERO)[:40]
b'{"action":"window.clear","actor":"ada","'
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import pwd
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlite_utils

from dynupdate.core.db import connect, migrations, write
from dynupdate.core.devices import type_key
from dynupdate.core.times import format_utc, utc_now

__all__ = [
    "SERVER",
    "ZERO",
    "Action",
    "Entry",
    "Verification",
    "append",
    "append_to_file",
    "canonical",
    "list_entries",
    "os_actor",
    "verify",
]

SERVER = "server"  # the actor of what the server decides by itself
ZERO = "0" * 64  # the predecessor of the first entry


class Action(StrEnum):
    """Every action the log knows (SPEC section 7), by its name in the log."""

    PACKAGE_ADD = "package.add"
    PACKAGE_REMOVE = "package.remove"
    POLICY_SET = "policy.set"
    POLICY_DISABLE = "policy.disable"
    WINDOW_SET = "window.set"
    WINDOW_CLEAR = "window.clear"
    ROLLOUT_START = "rollout.start"
    ROLLOUT_PAUSE = "rollout.pause"
    ROLLOUT_RESUME = "rollout.resume"
    ROLLOUT_ADVANCE = "rollout.advance"
    ROLLOUT_ABORT = "rollout.abort"
    ROLLOUT_WAVE_OPENED = "rollout.wave-opened"
    ROLLOUT_HALTED = "rollout.halted"
    ROLLOUT_COMPLETED = "rollout.completed"
    TRIAL_ADD = "trial.add"
    TRIAL_REMOVE = "trial.remove"
    KEY_IMPORT = "key.import"
    KEY_REMOVE = "key.remove"
    ENDPOINT_RETRY = "endpoint.retry"
    ENDPOINT_FORGET = "endpoint.forget"
    RESTORE = "restore"


@dataclass(frozen=True)
class Entry:
    id: int
    time: str
    actor: str
    action: str
    type: str | None
    detail: dict[str, Any]
    prev: str
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        """The keys of ``log --json`` (SPEC section 7), plus the chain's two hashes."""
        return asdict(self)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(
    id_: int,
    time: str,
    actor: str,
    action: str,
    type_: str | None,
    detail: dict[str, Any],
    prev: str,
) -> bytes:
    """The bytes an entry's SHA-256 is taken of (see the module's docstring)."""
    content = {
        "id": id_,
        "time": time,
        "actor": actor,
        "action": action,
        "type": type_,
        "detail": detail,
        "prev": prev,
    }
    return _json(content).encode("utf-8")


_encode = json.JSONEncoder(ensure_ascii=False).encode


def _stored_canonical(
    id_: int, time: str, actor: str, action: str, type_: str | None, detail: str, prev: str
) -> bytes:
    """:func:`canonical` from a stored row, whose ``detail`` is already canonical JSON text.

    Five times faster than parsing and dumping the detail again (``log --verify``
    of a million entries); equal to :func:`canonical` for every appended entry.
    A detail rewritten to other but equivalent JSON text counts as changed.
    """
    return (
        f'{{"action":{_encode(action)},"actor":{_encode(actor)},"detail":{detail},'
        f'"id":{id_},"prev":{_encode(prev)},"time":{_encode(time)},"type":{_encode(type_)}}}'
    ).encode()


def os_actor() -> tuple[str, str | None]:
    """Who runs this process: (actor, effective user when it differs, under sudo).

    Under ``sudo`` the actor is the invoking user (``SUDO_USER``): the log is
    about people, and root is everyone who may use sudo.
    """
    try:
        effective = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        effective = f"uid {os.geteuid()}"
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user:
        return sudo_user, effective
    try:
        return getpass.getuser(), None
    except (OSError, KeyError):  # no login name in the environment or passwd
        return effective, None


def append(
    db: sqlite_utils.Database,
    actor: str | None,
    action: Action,
    type_: str | None,
    detail: dict[str, Any],
) -> Entry:
    """Append an entry; call it inside the ``write(db)`` transaction of the change.

    ``actor=None`` is the OS user running this process (:func:`os_actor`);
    under sudo its effective user goes into ``detail`` as ``effective_user``.
    """
    if not db.conn.in_transaction:
        # Outside a transaction the entry would commit apart from its change.
        raise RuntimeError("audit.append needs the change's write transaction")
    action = Action(action)
    if actor is None:
        actor, effective = os_actor()
        if effective is not None:
            detail = {**detail, "effective_user": effective}
    # Normalised through JSON so what is hashed is exactly what is read back.
    detail = json.loads(_json(detail))
    last = db.execute("SELECT id, sha256 FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
    id_, prev = (last[0] + 1, last[1]) if last else (1, ZERO)
    time = format_utc(utc_now())
    assert time is not None
    sha = hashlib.sha256(canonical(id_, time, actor, action, type_, detail, prev)).hexdigest()
    db.execute(
        "INSERT INTO audit_log (id, time, actor, action, type, detail, prev, sha256)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (id_, time, actor, str(action), type_, _json(detail), prev, sha),
    )
    return Entry(id_, time, actor, str(action), type_, detail, prev, sha)


def append_to_file(
    path: Path,
    actor: str | None,
    action: Action,
    type_: str | None,
    detail: dict[str, Any],
) -> Entry:
    """Append an entry to the database file ``path`` that nothing else has open.

    For a database about to replace another (``restore``): the entry lands in
    its own chain before the file is put in place, so the restored database
    and its ``restore`` entry appear together. An older schema is migrated.
    """
    db = connect(path)
    try:
        with write(db):
            if migrations.pending(db):
                migrations.apply(db)
            return append(db, actor, action, type_, detail)
    finally:
        db.close()


_COLUMNS = "id, time, actor, action, type, detail, prev, sha256"


def _entry(row: tuple[Any, ...]) -> Entry:
    id_, time, actor, action, type_, detail, prev, sha = row
    return Entry(id_, time, actor, action, type_, json.loads(detail), prev, sha)


def list_entries(
    db: sqlite_utils.Database,
    *,
    type_: str | None = None,
    limit: int | None = None,
    since: datetime | None = None,
) -> list[Entry]:
    """Entries newest first: of one device type (any case), at or after ``since``."""
    where: list[str] = []
    params: list[str | int | None] = []
    if type_ is not None:
        # Types are ASCII (validate_type), where NOCASE and casefold agree.
        where.append("type = ? COLLATE NOCASE")
        params.append(type_key(type_))
    if since is not None:
        where.append("time >= ?")
        params.append(format_utc(since))
    sql = f"SELECT {_COLUMNS} FROM audit_log"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [_entry(row) for row in db.execute(sql, params)]


@dataclass(frozen=True)
class Verification:
    """The outcome of :func:`verify`."""

    entries: int
    first_bad_id: int | None
    problem: str | None
    newest_sha256: str | None  # to keep elsewhere: a log cut short shows here

    @property
    def intact(self) -> bool:
        return self.first_bad_id is None

    def to_dict(self) -> dict[str, Any]:
        return {"intact": self.intact, **asdict(self)}


def _rows(db: sqlite_utils.Database) -> Iterator[tuple[Any, ...]]:
    return iter(db.execute(f"SELECT {_COLUMNS} FROM audit_log ORDER BY id"))


def verify(db: sqlite_utils.Database) -> Verification:
    """Walk the chain from the first entry; stop at the first one that does not fit."""
    expected, prev, count = 1, ZERO, 0
    sha256 = hashlib.sha256
    rows = _rows(db)
    while True:
        try:
            row = next(rows, None)
        except sqlite3.OperationalError:  # bytes written that are not UTF-8 text
            return Verification(
                count, expected, "its content is not UTF-8 text: it was changed", None
            )
        if row is None:
            break
        id_, time, actor, action, type_, detail, stored_prev, stored_sha = row
        problem = None
        if id_ != expected:
            problem = f"entries {expected} to {id_ - 1} are missing"
            if id_ == expected + 1:
                problem = f"entry {expected} is missing"
            elif id_ < expected:  # cannot happen with an INTEGER PRIMARY KEY; kept total
                problem = f"entry {id_} is out of order"
            id_ = expected
        elif stored_prev != prev:
            problem = "its predecessor's SHA-256 does not match: an entry before it was changed"
            problem += ", removed or inserted"
        else:
            content = _stored_canonical(id_, time, actor, action, type_, detail, stored_prev)
            if sha256(content).hexdigest() != stored_sha:
                problem = "its content does not match its SHA-256: it was changed"
        if problem is not None:
            return Verification(count, id_, problem, None)
        expected, prev, count = expected + 1, stored_sha, count + 1
    return Verification(count, None, None, prev if count else None)
