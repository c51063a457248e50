"""Whole files with validators and single ranges (RFC 9110 sections 13 and 14)."""

from __future__ import annotations

import os
from email.utils import formatdate
from pathlib import Path
from typing import Any

from dynupdate.server.messages import FileBody, Request, Response, error_response

__all__ = ["file_response"]


def file_response(
    request: Request, path: Path, etag: str, content_type: str = "application/octet-stream"
) -> Response:
    """Answer a GET or HEAD with the file at ``path``: 200, 206, 304 or 416.

    ``etag`` is the file's strong validator (quotes added when missing). Honours
    If-None-Match (weak comparison, lists, ``*``), a single ``Range`` of bytes
    (``a-b``, ``a-``, ``-n``) and If-Range. A multi-range or malformed Range is
    ignored, as RFC 9110 allows: the whole file is sent. Raises OSError
    (FileNotFoundError...) when the file cannot be stat'ed.
    """
    st = os.stat(path)
    size = st.st_size
    tag = etag if etag.startswith(('"', 'W/"')) else f'"{etag}"'
    modified = formatdate(st.st_mtime, usegmt=True)
    headers = request.headers
    none_match = headers.get("if-none-match")
    if none_match is not None and _etag_in(none_match, tag):
        return Response(304, [("ETag", tag), ("Last-Modified", modified)])
    base = [
        ("Content-Type", content_type),
        ("ETag", tag),
        ("Accept-Ranges", "bytes"),
        ("Last-Modified", modified),
    ]
    spec = headers.get("range") if request.method == "GET" else None
    if spec is not None:
        if_range = headers.get("if-range")
        if if_range is not None and not _if_range_holds(if_range.strip(), tag, modified):
            spec = None
    span = _parse_range(spec, size) if spec is not None else None
    if span is None:
        return Response(200, base, file=FileBody(Path(path), 0, size))
    if span is _UNSATISFIABLE:
        assert spec is not None  # a span comes from a spec
        message = f"The range {spec[:100]!r} is outside the {size}-byte file."
        answer = error_response(416, message)
        answer.headers.append(("Content-Range", f"bytes */{size}"))
        return answer
    start, end = span
    base.append(("Content-Range", f"bytes {start}-{end}/{size}"))
    return Response(206, base, file=FileBody(Path(path), start, end - start + 1))


_UNSATISFIABLE: Any = object()


def _etag_in(field: str, tag: str) -> bool:
    """Weak comparison of ``tag`` with an If-None-Match list."""
    if field.strip() == "*":
        return True
    ours = tag[2:] if tag.startswith("W/") else tag
    for item in field.split(","):
        item = item.strip()
        if item[:2] == "W/":
            item = item[2:]
        if item == ours:
            return True
    return False


def _if_range_holds(value: str, tag: str, modified: str) -> bool:
    if value.startswith('"'):
        return value == tag  # strong comparison; a weak tag of ours starts with W/
    if value.startswith("W/"):
        return False
    return value == modified


def _parse_range(spec: str, size: int) -> tuple[int, int] | Any | None:
    """(first, last) for a single satisfiable byte range, _UNSATISFIABLE, or None to ignore."""
    unit, eq, ranges = spec.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    ranges = ranges.strip()
    first, dash, last = ranges.partition("-")
    if not dash or "," in ranges or not _is_digits(last, empty_ok=bool(first)):
        return None
    if first:
        if not _is_digits(first, empty_ok=False):
            return None
        start = int(first)
        end = int(last) if last else size - 1
        if end < start and last:
            return None  # an invalid range-spec makes the whole field invalid
        if start >= size:
            return _UNSATISFIABLE
        return start, min(end, size - 1)
    suffix = int(last)
    if suffix == 0 or size == 0:
        return _UNSATISFIABLE
    return max(0, size - suffix), size - 1


def _is_digits(text: str, *, empty_ok: bool) -> bool:
    if not text:
        return empty_ok
    return len(text) <= 30 and text.isascii() and text.isdigit()
