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

import math
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


class Row:
    """An open track row: merged fields of every entry seen so far at one timestamp."""

    __slots__ = ("fields", "opened", "wseqs")

    def __init__(self, fields: dict[str, Any], opened: float, wseq: int) -> None:
        self.fields = fields
        self.opened = opened
        self.wseqs = [wseq]
        """WAL records holding the entries merged into the row; recovery re-reads exactly these."""


TopicKey = tuple[str, str]


class OpenRows:
    """Track rows that have not settled yet, per ``(run, topic)``, keyed by timestamp.

    Settling rules (DESIGN §3): a row settles once it has been open ``window_s``; a run's rows
    settle at once on a barrier, a close or a producer's death; everything settles when more
    than ``max_rows`` are open. Settling a timestamp also settles every open row of its topic
    with a smaller one, so a topic's file grows in order and late rows stay rare.
    """

    def __init__(self, window_s: float, max_rows: int) -> None:
        self.window_s = window_s
        self.max_rows = max_rows
        self.topics: dict[TopicKey, dict[float, Row]] = {}
        self.count = 0

    def add(self, key: TopicKey, entries: Iterable[tuple[float, dict[str, Any], int]], now: float) -> int:
        """Merge ``(ts, flat fields, wseq)`` entries into the topic's open rows; returns clashes.

        A new row takes ``fields`` as it is (the caller hands over a dict it no longer uses).
        """
        rows = self.topics.get(key)
        if rows is None:
            rows = self.topics[key] = {}
        clashes = 0
        before = len(rows)
        for ts, fields, wseq in entries:
            row = rows.get(ts)
            if row is None:
                rows[ts] = Row(fields, now, wseq)
            else:
                if row.wseqs[-1] != wseq:
                    row.wseqs.append(wseq)
                clashes += merge_into(row.fields, fields)
        self.count += len(rows) - before
        return clashes

    def restore(self, key: TopicKey, ts: float, fields: dict[str, Any], wseqs: list[int], now: float) -> None:
        """Put back a row rebuilt after a restart, with the WAL records that hold its entries."""
        rows = self.topics.setdefault(key, {})
        if ts not in rows:
            self.count += 1
        row = rows[ts] = Row(fields, now, wseqs[0])
        row.wseqs = list(wseqs)

    def has_run(self, run: str) -> bool:
        """True if any row of ``run`` is open."""
        return any(k[0] == run for k in self.topics)

    def due(self, now: float, settle_runs: set[str], settle_all: bool) -> list[tuple[TopicKey, float]]:
        """``(topic, settle up to this ts)`` for every topic with rows to settle now."""
        everything = settle_all or self.count > self.max_rows
        deadline = now - self.window_s
        out: list[tuple[TopicKey, float]] = []
        for key, rows in self.topics.items():
            if everything or key[0] in settle_runs:
                out.append((key, math.inf))
                continue
            upto = None
            for ts, row in rows.items():
                if row.opened > deadline:
                    break
                if upto is None or ts > upto:
                    upto = ts
            if upto is not None:
                out.append((key, upto))
        return out

    def settle(self, key: TopicKey, upto: float) -> tuple[list[float], list[dict[str, Any]], list[list[int]]]:
        """Remove the topic's rows at or below ``upto``: their stamps (sorted), fields and WAL records."""
        rows = self.topics[key]
        if upto == math.inf:
            stamps = sorted(rows)
            done = [rows[ts] for ts in stamps]
            rows.clear()
        else:
            stamps = sorted(ts for ts in rows if ts <= upto)
            done = [rows.pop(ts) for ts in stamps]
        if not rows:
            del self.topics[key]
        self.count -= len(done)
        return stamps, [r.fields for r in done], [r.wseqs for r in done]

    def refs(self, key: TopicKey) -> list[Any] | None:
        """What a commit stores of a topic's open rows: their stamps and WAL seqs (None: none open)."""
        rows = self.topics.get(key)
        if not rows:
            return None
        return [list(rows), [r.wseqs for r in rows.values()]]

    def min_wseq(self) -> int | None:
        """The oldest WAL record an open row still needs."""
        low = None
        for rows in self.topics.values():
            for row in rows.values():
                w = row.wseqs[0]
                if low is None or w < low:
                    low = w
        return low
