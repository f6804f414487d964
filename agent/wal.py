"""The write-ahead buffer: every received message, durable before anything else happens to it.

Layout (one LMDB environment, ``<state_dir>/wal``, capped at ``max_bytes``)
- ``wal``: one record per received message (one frame, or a coalesced group), under
  big-endian ``u64`` keys (bytewise order is numeric order) from 1, rising by one per
  record; a key is never reused (``meta`` keeps the last once garbage collection empties
  the db). Ingest appends; the core reads and deletes.
- ``out``: the settled stream, one packed batch per core step under its own ``u64`` keys.
  The core appends; a batch is deleted once every sink has committed past it.
- ``core``: the core's state (its cursor in ``wal``, the last ``out`` key, the run book, the
  open rows' references), written in the same transaction as the ``out`` batch it explains.
- ``meta``: ingest's counters, written with each append.

Sinks keep their cursors into ``out`` and their own state in a second environment
(``<state_dir>/wal-state``), one key namespace per sink (``SinkState``). Keeping it apart
means a full WAL can never stop a sink from committing, and so from making room.

Invariants
- ``append`` writes one batch in one write transaction; with ``sync=True`` (the default) it
  is fsynced before ``append`` returns, so a returned batch survives ``kill -9`` and a power
  cut (promise 3). Batches form by themselves while a commit is in flight (group commit).
- ``commit_core`` writes an ``out`` batch, the core state that produced it, and the deletion
  of every ``wal`` record the new state no longer needs and every ``out`` batch all sinks
  passed, in one transaction: after a crash the core state and the stream always agree.
- A ``wal`` record goes only once the core has passed it and no open row needs it; an
  ``out`` batch only once every sink has committed past it (retention).

Failure behaviour
- The map is ``max_bytes`` of address space from the start (the file grows only as pages
  are used), so it never has to be resized under live transactions. ``append`` refuses
  (``WALFull``) once the pages in use would pass ``APPEND_SHARE`` of the cap; the core stops
  writing ``out`` batches at ``CORE_SHARE`` and lets sinks that may skip jump ahead from
  ``SKIP_SHARE`` on; the rest is kept for deletions, which need fresh pages (LMDB copies on
  write). Freed pages are reused, so appends resume by themselves as sinks catch up.
- Two processes open the WAL: the ingest process appends, the agent reads, writes the
  stream and deletes; LMDB serialises their write transactions. ``last_seq`` is exact only
  in the appending process.
- LMDB is opened once per process, after any fork; each write transaction opens, commits
  and closes on one thread inside a ``with`` block; read transactions are short.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, cast

import lmdb
import msgpack

from .errors import WALCorrupt, WALError, WALFull

_U64: Final = struct.Struct(">Q")
APPEND_SHARE: Final = 0.85
"""Ingest stops appending once the WAL's live pages would pass this share of its cap."""
CORE_SHARE: Final = 0.92
"""The core stops writing stream batches past this share (a blocking sink is behind)."""
SKIP_SHARE: Final = 0.50
"""Past this share, sinks whose ``when_full`` is ``skip`` jump ahead, oldest batches first."""
STATE_MAP_BYTES: Final = 64 * 1024**3
"""Address space of the sink state environment; its file holds only live state."""


def key(seq: int) -> bytes:
    """The key of record (or stream batch) ``seq``."""
    return _U64.pack(seq)


def unkey(k: bytes) -> int:
    """The seq of a key made by ``key``."""
    return int(_U64.unpack(k)[0])


def pack(value: object) -> bytes:
    """How state values are stored."""
    return msgpack.packb(value)


def unpack(raw: bytes) -> Any:
    """A stored state value."""
    return msgpack.unpackb(raw, strict_map_key=False)


def _open(path: Path, map_size: int, sync: bool) -> lmdb.Environment:
    """Open an environment whose files only this user can read: the WAL and the state hold
    whatever producers send, and the sink state holds the tokens of remote servers."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        env = lmdb.open(str(path), map_size=map_size, max_dbs=6, sync=sync, metasync=sync, readahead=False, mode=0o600)
    except lmdb.Error as exc:
        raise WALCorrupt(f"cannot open {path}: {exc}") from exc
    for name in ("data.mdb", "lock.mdb"):
        try:
            os.chmod(path / name, 0o600)
        except FileNotFoundError:
            pass
    return env


def _write(env: lmdb.Environment, fn: Callable[[lmdb.Transaction[bytes]], None]) -> None:
    """Run ``fn(txn)`` in one write transaction of ``env``; a full map is ``WALFull``."""
    try:
        with env.begin(write=True) as txn:
            fn(txn)
    except lmdb.MapFullError as exc:
        raise WALFull(f"{env.path()} reached its cap of {env.info()['map_size']} bytes") from exc


def _range(env: lmdb.Environment, db: Any, after: int, limit: int, max_bytes: int) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    size = 0
    with env.begin(db=db) as txn:
        cur = txn.cursor()
        if not cur.set_range(_U64.pack(after + 1)):
            return out
        from_bytes = int.from_bytes
        append = out.append
        for k, v in cur:
            append((from_bytes(k, "big"), v))
            size += len(v)
            if len(out) >= limit or size >= max_bytes:
                break
    return out


def _delete_upto(txn: lmdb.Transaction[bytes], db: Any, upto: int) -> int:
    """Delete the keys at or below ``upto`` (big-endian keys: bytewise order is numeric order)."""
    deleted = 0
    end = _U64.pack(upto)
    cur = txn.cursor(db=db)
    if cur.first():
        key_of, delete = cur.key, cur.delete
        while key_of() <= end and delete():
            deleted += 1
    return deleted


class Wal:
    """The WAL environment (records, stream, core state, ingest counters) and the sink state."""

    def __init__(self, path: Path, max_bytes: int, sync: bool = True, *, state: bool = True) -> None:
        """Open the WAL, and the sink state unless ``state`` is false (the ingest process)."""
        self.path = path
        self.max_bytes = max_bytes
        self.env = _open(path, max_bytes, sync)
        self.wal = self.env.open_db(b"wal")
        self.meta = self.env.open_db(b"meta")
        self.out = self.env.open_db(b"out")
        self.core = self.env.open_db(b"core")
        self.state_env: lmdb.Environment | None = None
        if state:
            self.state_env = _open(path.parent / (path.name + "-state"), STATE_MAP_BYTES, sync)
            self.sink = self.state_env.open_db(b"sink")
        self.last_seq = self._stored_last_seq()

    def _stored_last_seq(self) -> int:
        with self.env.begin(db=self.wal) as txn:
            cur = txn.cursor()
            if cur.last():
                return unkey(cur.key())
        return int(cast(int, self.get_meta("last_seq", 0)))

    def close(self) -> None:
        """Close the environments (all transactions must be finished)."""
        self.env.close()
        if self.state_env is not None:
            self.state_env.close()

    # ------------------------------------------------------------------ ingest
    def append(self, records: list[bytes], meta: Mapping[str, object]) -> int:
        """Append ``records`` and update ``meta`` in one durable transaction; returns the last seq."""
        first = self.last_seq + 1
        incoming = 2 * sum(len(r) for r in records)
        if records and self.used_bytes() + incoming > self.max_bytes * APPEND_SHARE:
            raise WALFull(f"WAL at {self.path} is at {APPEND_SHARE:.0%} of its {self.max_bytes}-byte cap")

        def put(txn: lmdb.Transaction[bytes]) -> None:
            pack_key = _U64.pack
            _, added = txn.cursor(db=self.wal).putmulti(
                [(pack_key(seq), rec) for seq, rec in enumerate(records, first)], append=True
            )
            if added != len(records):
                raise WALError(f"WAL at {self.path} already holds seq {first}: another process appends to it")
            for name, value in meta.items():
                txn.put(name.encode(), pack(value), db=self.meta)
            txn.put(b"last_seq", pack(first + len(records) - 1), db=self.meta)

        try:
            _write(self.env, put)
        except WALError:
            self.last_seq = self._stored_last_seq()
            raise
        self.last_seq = first + len(records) - 1
        return self.last_seq

    def get_meta(self, name: str, default: object = None) -> object:
        """One value of the WAL's ``meta`` database."""
        with self.env.begin(db=self.meta) as txn:
            raw = txn.get(name.encode())
        return default if raw is None else unpack(raw)

    # -------------------------------------------------------------------- core
    def read(self, after: int, limit: int, max_bytes: int = 1 << 62) -> list[tuple[int, bytes]]:
        """Up to ``limit`` records (and about ``max_bytes``) with seq greater than ``after``, in order."""
        return _range(self.env, self.wal, after, limit, max_bytes)

    def get_records(self, seqs: Iterable[int]) -> list[tuple[int, bytes]]:
        """The records with these seqs that still exist, in the order asked."""
        out: list[tuple[int, bytes]] = []
        with self.env.begin(db=self.wal) as txn:
            for seq in seqs:
                raw = txn.get(_U64.pack(seq))
                if raw is not None:
                    out.append((seq, bytes(raw)))
        return out

    def first_seq(self) -> int | None:
        """The oldest record still in the WAL, or None if it is empty."""
        with self.env.begin(db=self.wal) as txn:
            cur = txn.cursor()
            return unkey(cur.key()) if cur.first() else None

    def core_get(self, name: bytes, default: object = None) -> Any:
        """One value of the core state."""
        with self.env.begin(db=self.core) as txn:
            raw = txn.get(name)
        return default if raw is None else unpack(raw)

    def core_items(self, prefix: bytes) -> list[tuple[bytes, Any]]:
        """Every core-state entry whose key starts with ``prefix``."""
        return _items(self.env, self.core, prefix)

    def commit_core(
        self,
        batch: tuple[int, bytes] | None,
        puts: Mapping[bytes, object],
        deletes: Iterable[bytes],
        *,
        wal_upto: int = 0,
        out_upto: int = 0,
    ) -> None:
        """Write a stream batch with the core state behind it, and drop what nobody needs, at once.

        ``wal_upto``: records at or below it go; ``out_upto``: stream batches at or below it go.
        """

        def put(txn: lmdb.Transaction[bytes]) -> None:
            if batch is not None and not txn.put(_U64.pack(batch[0]), batch[1], db=self.out, overwrite=False):
                raise WALError(f"stream batch {batch[0]} already exists in {self.path}")
            for k in deletes:
                txn.delete(k, db=self.core)
            for k, v in puts.items():
                txn.put(k, pack(v), db=self.core)
            if wal_upto:
                _delete_upto(txn, self.wal, wal_upto)
            if out_upto:
                _delete_upto(txn, self.out, out_upto)

        _write(self.env, put)

    def read_out(self, after: int, limit: int, max_bytes: int = 1 << 62) -> list[tuple[int, bytes]]:
        """Stream batches after ``after``, in order."""
        return _range(self.env, self.out, after, limit, max_bytes)

    def out_sizes(self, after: int) -> list[tuple[int, int]]:
        """``(seq, packed size)`` of every stream batch after ``after`` (for lag and skipping)."""
        out: list[tuple[int, int]] = []
        with self.env.begin(db=self.out) as txn:
            cur = txn.cursor()
            if cur.set_range(_U64.pack(after + 1)):
                for k, v in cur:
                    out.append((unkey(k), len(v)))
        return out

    def truncate_out(self, after: int) -> int:
        """Delete stream batches past ``after`` (written, but their core state never committed)."""
        doomed: list[bytes] = []
        with self.env.begin(db=self.out) as txn:
            cur = txn.cursor()
            if cur.set_range(_U64.pack(after + 1)):
                doomed = [bytes(k) for k in cur.iternext(keys=True, values=False)]

        def drop(txn: lmdb.Transaction[bytes]) -> None:
            for k in doomed:
                txn.delete(k, db=self.out)

        if doomed:
            _write(self.env, drop)
        return len(doomed)

    def used_bytes(self) -> int:
        """Bytes in live pages of the WAL (free pages waiting for reuse not counted)."""
        with self.env.begin() as txn:
            pages = 0
            for db in (None, self.wal, self.meta, self.out, self.core):
                st = txn.stat(db) if db is not None else self.env.stat()
                pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
            return int(pages * self.env.stat()["psize"])

    def state(self, namespace: str) -> SinkState:
        """The state of one sink (its own key namespace in the state environment)."""
        assert self.state_env is not None, "this WAL was opened without sink state"
        return SinkState(self.state_env, self.sink, namespace)


def _items(env: lmdb.Environment, db: Any, prefix: bytes, limit: int | None = None) -> list[tuple[bytes, Any]]:
    out: list[tuple[bytes, Any]] = []
    with env.begin(db=db) as txn:
        cur = txn.cursor()
        if cur.set_range(prefix):
            for k, v in cur:
                if not k.startswith(prefix):
                    break
                out.append((bytes(k), unpack(v)))
                if limit is not None and len(out) >= limit:
                    break
    return out


class SinkState:
    """One sink's durable state: its keys, prefixed ``<name>\\0``, in the state environment.

    Keys given to and returned by these methods are without the prefix. Changes are staged
    with ``put``/``delete`` and committed together with the sink's cursor by ``commit``.
    """

    def __init__(self, env: lmdb.Environment, db: Any, namespace: str) -> None:
        self.env = env
        self.db = db
        self.prefix = namespace.encode() + b"\0"
        self.puts: dict[bytes, object] = {}
        self.deletes: set[bytes] = set()

    def get(self, k: bytes, default: object = None) -> Any:
        """The committed value of ``k``."""
        with self.env.begin(db=self.db) as txn:
            raw = txn.get(self.prefix + k)
        return default if raw is None else unpack(raw)

    def items(self, prefix: bytes = b"", limit: int | None = None) -> list[tuple[bytes, Any]]:
        """Committed entries whose key starts with ``prefix`` (the first ``limit`` of them, in key order)."""
        n = len(self.prefix)
        return [(k[n:], v) for k, v in _items(self.env, self.db, self.prefix + prefix, limit)]

    def put(self, k: bytes, value: object) -> None:
        """Stage ``k = value`` for the next commit."""
        self.deletes.discard(k)
        self.puts[k] = value

    def delete(self, k: bytes) -> None:
        """Stage the removal of ``k`` for the next commit."""
        self.puts.pop(k, None)
        self.deletes.add(k)

    def discard(self) -> None:
        """Forget staged changes (the batch failed; the sink recovers from what is committed)."""
        self.puts.clear()
        self.deletes.clear()

    def commit(self, extra: Mapping[bytes, object] | None = None) -> None:
        """Write the staged changes (and ``extra``) in one durable transaction."""
        puts = dict(self.puts)
        if extra:
            puts.update(extra)
        p = self.prefix

        def put(txn: lmdb.Transaction[bytes]) -> None:
            for k in self.deletes:
                if k not in puts:
                    txn.delete(p + k, db=self.db)
            for k, v in puts.items():
                txn.put(p + k, pack(v), db=self.db)

        _write(self.env, put)
        self.discard()
