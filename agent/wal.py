"""The write-ahead buffer: every accepted frame, durable before anything else happens to it.

Invariants
- Records live in the ``wal`` database of the WAL environment under big-endian ``u64`` keys
  (bytewise order is numeric order), starting at 1 and rising by one per record; a key is
  never reused (the last one is kept in ``meta`` once garbage collection empties the db).
- ``append`` writes one batch in one write transaction; with ``sync=True`` (the default) it
  is fsynced before ``append`` returns, so a returned batch survives ``kill -9`` and a power
  cut (promise 3). Batches form by themselves while a commit is in flight (group commit).
- Sinks keep their state (cursor, file offsets, open rows) in a separate state environment,
  committed in one transaction per batch (``commit``). Keeping it apart means a full WAL can
  never stop a sink from committing, and so from making room.
- A record is deleted (``gc``) only after every sink's committed cursor has passed it. A
  crash between a sink commit and the deletion leaves records that are deleted next time;
  recovery never reads below the committed cursor, so none is applied twice.

Failure behaviour
- The WAL map is ``max_bytes`` of address space from the start (the file grows only as pages
  are used), so it never has to be resized under live transactions. ``append`` refuses
  (``WALFull``) once the pages in use would pass ``APPEND_SHARE`` of the cap, keeping the rest
  for garbage collection, whose deletes need fresh pages (LMDB copies on write). The caller
  drops and counts the batch; nothing committed is touched, and freed pages are reused, so
  appends resume by themselves as the sinks catch up.
- Two processes open the WAL: the ingest process appends, the agent's sink reads and
  deletes; LMDB serialises their write transactions. ``last_seq`` is exact only in the
  appending process.
- LMDB is opened once per process, after any fork; each write transaction opens, commits
  and closes on one thread inside a ``with`` block; read transactions are short.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Final

import lmdb
import msgpack

from .errors import WALCorrupt, WALError, WALFull

_U64: Final = struct.Struct(">Q")
APPEND_SHARE: Final = 0.85
STATE_MAP_BYTES: Final = 64 * 1024**3
"""Address space of the sink state environment; its file holds only live state."""


def key(seq: int) -> bytes:
    """The WAL key of record ``seq``."""
    return _U64.pack(seq)


def _open(path: Path, map_size: int, sync: bool) -> lmdb.Environment:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        return lmdb.open(str(path), map_size=map_size, max_dbs=4, sync=sync, metasync=sync, readahead=False)
    except lmdb.Error as exc:
        raise WALCorrupt(f"cannot open {path}: {exc}") from exc


class Wal:
    """The WAL environment (records, agent counters) and the sinks' state environment."""

    def __init__(self, path: Path, max_bytes: int, sync: bool = True, *, state: bool = True) -> None:
        """Open the WAL, and the sink state unless ``state`` is false (the ingest process)."""
        self.path = path
        self.max_bytes = max_bytes
        self.env = _open(path, max_bytes, sync)
        self.wal = self.env.open_db(b"wal")
        self.meta = self.env.open_db(b"meta")
        if state:
            self.state_env = _open(path.parent / (path.name + "-state"), STATE_MAP_BYTES, sync)
            self.sink = self.state_env.open_db(b"sink")
        self.last_seq = self._stored_last_seq()

    def _stored_last_seq(self) -> int:
        with self.env.begin(db=self.wal) as txn:
            cur = txn.cursor()
            if cur.last():
                return int(_U64.unpack(cur.key())[0])
        return int(self.get_meta("last_seq", 0))  # type: ignore[call-overload]

    def close(self) -> None:
        """Close the environments (all transactions must be finished)."""
        self.env.close()
        if hasattr(self, "state_env"):
            self.state_env.close()

    def _write(self, env: lmdb.Environment, fn: Callable[[lmdb.Transaction], None]) -> None:
        """Run ``fn(txn)`` in one write transaction of ``env``; a full map is ``WALFull``."""
        try:
            with env.begin(write=True) as txn:
                fn(txn)
        except lmdb.MapFullError as exc:
            raise WALFull(f"{env.path()} reached its cap of {env.info()['map_size']} bytes") from exc

    def append(self, records: list[bytes], meta: Mapping[str, object]) -> int:
        """Append ``records`` and update ``meta`` in one durable transaction; returns the last seq."""
        first = self.last_seq + 1
        incoming = 2 * sum(len(r) for r in records)
        if records and self.used_bytes() + incoming > self.max_bytes * APPEND_SHARE:
            raise WALFull(f"WAL at {self.path} is at {APPEND_SHARE:.0%} of its {self.max_bytes}-byte cap")

        def put(txn: lmdb.Transaction) -> None:
            pack = _U64.pack
            _, added = txn.cursor(db=self.wal).putmulti([(pack(seq), rec) for seq, rec in enumerate(records, first)], append=True)
            if added != len(records):
                raise WALError(f"WAL at {self.path} already holds seq {first}: another process appends to it")
            for name, value in meta.items():
                txn.put(name.encode(), msgpack.packb(value), db=self.meta)
            txn.put(b"last_seq", msgpack.packb(first + len(records) - 1), db=self.meta)

        try:
            self._write(self.env, put)
        except WALError:
            self.last_seq = self._stored_last_seq()
            raise
        self.last_seq = first + len(records) - 1
        return self.last_seq

    def read(self, after: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` records with seq greater than ``after``, in order."""
        out: list[tuple[int, bytes]] = []
        with self.env.begin(db=self.wal) as txn:
            cur = txn.cursor()
            if not cur.set_range(_U64.pack(after + 1)):
                return out
            for k, v in cur:
                out.append((_U64.unpack(k)[0], bytes(v)))
                if len(out) >= limit:
                    break
        return out

    def get_records(self, seqs: Iterable[int]) -> list[tuple[int, bytes]]:
        """The records with these seqs that still exist, in the order asked."""
        out: list[tuple[int, bytes]] = []
        with self.env.begin(db=self.wal) as txn:
            for seq in seqs:
                raw = txn.get(_U64.pack(seq))
                if raw is not None:
                    out.append((seq, bytes(raw)))
        return out

    def get_meta(self, name: str, default: object = None) -> object:
        """One value of the WAL's ``meta`` database."""
        with self.env.begin(db=self.meta) as txn:
            raw = txn.get(name.encode())
        return default if raw is None else msgpack.unpackb(raw)

    def get_sink(self, k: bytes, default: object = None) -> object:
        """One value of the sink state."""
        with self.state_env.begin(db=self.sink) as txn:
            raw = txn.get(k)
        return default if raw is None else msgpack.unpackb(raw, strict_map_key=False)

    def sink_items(self, prefix: bytes) -> list[tuple[bytes, object]]:
        """Every sink-state entry whose key starts with ``prefix``."""
        out: list[tuple[bytes, object]] = []
        with self.state_env.begin(db=self.sink) as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                for k, v in cur:
                    if not k.startswith(prefix):
                        break
                    out.append((bytes(k), msgpack.unpackb(v, strict_map_key=False)))
        return out

    def commit(self, puts: Mapping[bytes, object], deletes: Iterable[bytes]) -> None:
        """Commit sink state (puts and deletes) in one durable transaction."""

        def put(txn: lmdb.Transaction) -> None:
            for k in deletes:
                txn.delete(k, db=self.sink)
            for k, v in puts.items():
                txn.put(k, msgpack.packb(v), db=self.sink)

        self._write(self.state_env, put)

    def gc(self, upto: int) -> int:
        """Delete records at or below ``upto`` (every sink has committed past them); returns how many."""
        deleted = 0

        def drop(txn: lmdb.Transaction) -> None:
            nonlocal deleted
            cur = txn.cursor(db=self.wal)
            if cur.first():
                while cur.key() and _U64.unpack(cur.key())[0] <= upto:
                    if not cur.delete():
                        break
                    deleted += 1

        self._write(self.env, drop)
        return deleted

    def used_bytes(self) -> int:
        """Bytes in live pages of the WAL (free pages waiting for reuse not counted)."""
        with self.env.begin() as txn:
            pages = 0
            for db in (None, self.wal, self.meta):
                st = txn.stat(db) if db is not None else self.env.stat()
                pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
            return int(pages * self.env.stat()["psize"])
