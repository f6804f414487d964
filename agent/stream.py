"""The settled stream: what the core makes of the WAL, once, for every sink.

A stream batch is what one core step produced from a range of WAL records: the run book's
changes and the rows that settled, as a list of items in a fixed order

1. ``RunItem`` for every run the step touched (its state at the end of the step; ``final``
   once the run is closed and nothing of it is left to settle),
2. ``ParamsItem``, ``MetaItem``, ``PointsItem``, ``LogsItem`` in the order their frames came,
   then ``FileItem`` (one per file frame, in frame order),
3. ``RowsItem`` for every topic whose rows settled (sorted by timestamp, one per timestamp;
   ``late`` when a row's timestamp was settled before: a correction to merge),
4. ``FlushedItem`` for every producer barrier the step passed.

A batch is packed with msgpack into the WAL's ``out`` database (``pack``/``unpack``); the
items are named tuples whose first field is their kind, so a packed item is a plain array.
Rows are stored as references to the WAL records that hold their entries, not as values: the
stream costs little to write, and the records stay until every sink has passed the batch.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import msgpack


class ItemKind(enum.IntEnum):
    """Kinds of stream items."""

    RUN = 1
    PARAMS = 2
    META = 3
    POINTS = 4
    LOGS = 5
    ROWS = 6
    FLUSHED = 7
    FILE = 8


class RunItem(NamedTuple):
    """A run's state: identity, info, status and counters (``final``: closed and all settled).

    ``local`` false: the run keeps no local files (``dash_root=None``). ``dash_url`` and
    ``token`` are where the run ships to, if it asked; the token is for the ML-Dash sink only
    and never lands in a file, a log line or a status answer.
    """

    kind: int
    run: str
    root: str
    prefix: str
    info: dict[str, Any]
    created_at: str
    status: str
    reason: str | None
    closed_at: str | None
    counters: dict[str, int]
    final: bool
    local: bool = True
    dash_url: str | None = None
    token: str | None = None


class ParamsItem(NamedTuple):
    """The run's parameters after a change: all of them, flattened, with their version."""

    kind: int
    run: str
    version: int
    data: dict[str, Any]
    created_at: str | None
    changed: dict[str, Any]


class MetaItem(NamedTuple):
    """Description, tags or metadata of a metric, series or track."""

    kind: int
    run: str
    target: str
    name: str | None
    info: dict[str, Any]


class PointsItem(NamedTuple):
    """Points of one index-based series; the first has index ``first_index``, the rest follow."""

    kind: int
    run: str
    folder: str
    name: str | None
    first_index: int
    points: list[dict[str, Any]]


class LogsItem(NamedTuple):
    """Log entries ``[time, level, message, metadata]``; the first has ``first_seq``."""

    kind: int
    run: str
    first_seq: int
    entries: list[list[Any]]


class RowsItem(NamedTuple):
    """Settled rows of one topic: ``stamps`` sorted and unique, ``rows`` their flat fields.

    ``refs`` names, per row, the WAL records holding its entries. The stored form keeps only
    stamps and refs; a batch read back from the store gets its rows merged again from those
    records (``Core.materialize``), which retention keeps until every sink has passed them.
    """

    kind: int
    run: str
    topic: str
    stamps: list[float]
    refs: list[list[int]]
    late: bool
    rows: list[dict[str, Any]] | None = None


class FileItem(NamedTuple):
    """One file operation of a run (``op``: ``put``, ``copy``, ``update``, ``delete``), in frame order.

    ``put``: ``source`` is ``["inline", bytes]``, ``["spool", abspath]`` (a file in the run's
    spool dir; the core deletes it once every sink has passed this batch) or ``["path",
    abspath, size, mtime_ns, ino, dev]`` (the caller's file and its stat at the call; only read,
    never moved). ``copy``: ``["file", source_id]``. ``meta``: ``time`` (the call) and the
    ML-Dash fields (``description``, ``tags``, ``bindrs``, ``metadata``, ``content_type``,
    ``size``); for ``update`` the fields to replace. A local run stores it at
    ``proto.stored_file_path(run, path, id, filename)``. ``pid``: the producer (whose user may
    read a ``path`` source).
    """

    kind: int
    run: str
    op: str
    id: str
    path: str
    filename: str
    source: list[Any]
    meta: dict[str, Any]
    pid: int


class FlushedItem(NamedTuple):
    """Producer ``sid``'s barrier ``seq``: everything it sent before is in this batch or earlier."""

    kind: int
    sid: int
    seq: int


Item = RunItem | ParamsItem | MetaItem | PointsItem | LogsItem | RowsItem | FileItem | FlushedItem
_TYPES: dict[int, Any] = {
    ItemKind.FILE: FileItem,
    ItemKind.RUN: RunItem,
    ItemKind.PARAMS: ParamsItem,
    ItemKind.META: MetaItem,
    ItemKind.POINTS: PointsItem,
    ItemKind.LOGS: LogsItem,
    ItemKind.ROWS: RowsItem,
    ItemKind.FLUSHED: FlushedItem,
}


class Batch(NamedTuple):
    """One core step's output: ``frames`` WAL frames (``runs``: per run) became ``items``.

    ``before_frames``/``before_bytes`` are the stream's totals before this batch, so a sink's
    lag is the difference of two totals, however long its backlog. ``low`` is the oldest WAL
    record this batch or any later one can need. ``closed`` lists the runs whose final state
    this batch holds.
    """

    seq: int
    created: float
    frames: int
    before_frames: int
    before_bytes: int
    low: int
    runs: dict[str, int]
    closed: list[str]
    items: list[Item]
    size: int

    def pack(self) -> bytes:
        """The stored form (without ``seq`` and ``size``, which the store knows; rows as references)."""
        items = [i[:6] if i.kind == ItemKind.ROWS else i for i in self.items]
        head = [self.created, self.frames, self.before_frames, self.before_bytes, self.low, self.runs, self.closed]
        return msgpack.packb([*head, items])


def unpack(seq: int, raw: bytes) -> Batch:
    """A stored batch; its rows items still need ``Core.materialize``."""
    created, frames, before_frames, before_bytes, low, runs, closed, items = msgpack.unpackb(raw, strict_map_key=False)
    types = _TYPES
    return Batch(seq, created, frames, before_frames, before_bytes, low, runs, closed, [types[i[0]](*i) for i in items], len(raw))


class Summary(NamedTuple):
    """A stored batch's head, read without its items (lag, retention, skipping)."""

    seq: int
    created: float
    frames: int
    before_frames: int
    before_bytes: int
    low: int
    runs: dict[str, int]
    closed: list[str]
    size: int


def summary(seq: int, raw: bytes) -> Summary:
    """The head of a stored batch; its items are not decoded."""
    u = msgpack.Unpacker(strict_map_key=False)
    u.feed(raw)
    u.read_array_header()
    return Summary(seq, u.unpack(), u.unpack(), u.unpack(), u.unpack(), u.unpack(), u.unpack(), u.unpack(), len(raw))
