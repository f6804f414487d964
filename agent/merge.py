"""Pure functions of track merging: flatten like ML-Dash, merge rows that share a timestamp.

Invariants (checked by property tests)
- Every input field survives: a merged row holds every key any of its entries had.
- At most one row per (topic, ts): ``merge_rows`` returns rows sorted by ts, unique.
- Later entries win a clash (same key, different value), and each clash is counted.
- Merging is idempotent: merging the same entries again changes nothing and counts no clash.
- Nested dicts are flattened with dots *before* merging, so a merge is deep:
  ``{"a": {"x": 1}}`` then ``{"a": {"y": 2}}`` gives ``{"a.x": 1, "a.y": 2}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def flatten(fields: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts with dot-joined keys, as ML-Dash's local writer does.

    A flat top-level ``dict`` comes back as the same object (the caller owns it).
    """
    if not prefix and type(fields) is dict:
        for v in fields.values():
            if type(v) is dict:
                break
        else:
            return fields
    out: dict[str, Any] = {}
    for k, v in fields.items():
        name = f"{prefix}.{k}" if prefix else k
        if type(v) is dict:
            if v:
                out.update(flatten(v, name))
            else:
                out[name] = v
        else:
            out[name] = v
    return out


def merge_into(row: dict[str, Any], fields: Mapping[str, Any]) -> int:
    """Merge flat ``fields`` into ``row`` (later wins); returns the number of clashes."""
    clashes = 0
    for k, v in fields.items():
        if k in row:
            old = row[k]
            if old != v and not (old != old and v != v):
                clashes += 1
        row[k] = v
    return clashes


def merge_rows(rows: Iterable[tuple[float, Mapping[str, Any]]]) -> tuple[list[tuple[float, dict[str, Any]]], int]:
    """Merge ``(ts, flat fields)`` entries in order into sorted unique rows, and count clashes."""
    merged: dict[float, dict[str, Any]] = {}
    clashes = 0
    for ts, fields in rows:
        row = merged.get(ts)
        if row is None:
            merged[ts] = dict(fields)
        else:
            clashes += merge_into(row, fields)
    return sorted(merged.items(), key=lambda item: item[0]), clashes
