"""The write-ahead buffer: every accepted frame, durable before anything else happens to it.

Invariants
- Records live in the ``wal`` database under big-endian ``u64`` keys (bytewise order is
  numeric order), starting at 1 and rising by one per record; a key is never reused.
- ``append`` writes one batch in one write transaction; with ``sync=True`` (the default) the
  transaction is fsynced before ``append`` returns, so a returned batch survives ``kill -9``
  and a power cut (promise 3). Batches form by themselves while a commit is in flight
  (group commit).
- Sinks keep their state in the ``sink`` database of the same environment, so a sink's
  cursor, file offsets and open rows commit together in one transaction (``commit``), and
  that same transaction deletes every record at or below the cursor (garbage collection:
  a record is deleted only once every sink has passed it).
- ``meta`` holds the agent's counters, committed with the records they count.

Failure behaviour
- The map is ``max_bytes`` of address space from the start (the file itself grows only as
  pages are used), so it never has to be resized under live transactions; beyond it
  ``append`` raises ``WALFull`` and the caller drops and counts the batch. Nothing already
  committed is touched, and space freed by garbage collection is reused.
- LMDB is opened once per process, after any fork; each write transaction opens, commits
  and closes on one thread inside a ``with`` block; read transactions are short.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

import lmdb
import msgpack

from .errors import WALCorrupt, WALFull

_U64: Final = struct.Struct(">Q")


def key(seq: int) -> bytes:
    """The WAL key of record ``seq``."""
    return _U64.pack(seq)


class Wal:
    """An LMDB environment holding the WAL, the agent's counters and the sinks' state."""

    def __init__(self, path: Path, max_bytes: int, sync: bool = True) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        try:
            self.env = lmdb.open(
                str(path), map_size=max_bytes, max_dbs=4, sync=sync, metasync=sync, subdir=True, lock=True, readahead=False,
            )
        except lmdb.Error as exc:
            raise WALCorrupt(f"cannot open the WAL at {path}: {exc}") from exc
        self.wal = self.env.open_db(b"wal")
        self.meta = self.env.open_db(b"meta")
        self.sink = self.env.open_db(b"sink")
        with self.env.begin(db=self.wal) as txn:
            cur = txn.cursor()
            self.last_seq = _U64.unpack(cur.key())[0] if cur.last() else 0
        if self.last_seq == 0:
            self.last_seq = self.get_meta("last_seq", 0)

    def close(self) -> None:
        """Close the environment (all transactions must be finished)."""
        self.env.close()

    def _write(self, fn: object, *args: object) -> None:
        """Run ``fn(txn, *args)`` in one write transaction; a full map is ``WALFull``."""
        try:
            with self.env.begin(write=True) as txn:
                fn(txn, *args)  # type: ignore[operator]
        except lmdb.MapFullError as exc:
            raise WALFull(f"WAL at {self.path} reached its cap of {self.max_bytes} bytes") from exc

    def append(self, records: list[bytes], meta: Mapping[str, object]) -> int:
        """Append ``records`` and update ``meta`` in one durable transaction; returns the last seq."""
        first = self.last_seq + 1

        def put(txn: lmdb.Transaction) -> None:
            seq = first
            for rec in records:
                txn.put(_U64.pack(seq), rec, db=self.wal, append=True)
                seq += 1
            for name, value in meta.items():
                txn.put(name.encode(), msgpack.packb(value), db=self.meta)
            txn.put(b"last_seq", msgpack.packb(first + len(records) - 1), db=self.meta)

        self._write(put)
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

    def get_meta(self, name: str, default: object = None) -> object:
        """One value of the ``meta`` database."""
        with self.env.begin(db=self.meta) as txn:
            raw = txn.get(name.encode())
        return default if raw is None else msgpack.unpackb(raw)

    def get_sink(self, k: bytes, default: object = None) -> object:
        """One value of the sink-state database."""
        with self.env.begin(db=self.sink) as txn:
            raw = txn.get(k)
        return default if raw is None else msgpack.unpackb(raw, strict_map_key=False)

    def sink_items(self, prefix: bytes) -> list[tuple[bytes, object]]:
        """Every sink-state entry whose key starts with ``prefix``."""
        out: list[tuple[bytes, object]] = []
        with self.env.begin(db=self.sink) as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                for k, v in cur:
                    if not k.startswith(prefix):
                        break
                    out.append((bytes(k), msgpack.unpackb(v, strict_map_key=False)))
        return out

    def commit(self, puts: Mapping[bytes, object], deletes: Iterable[bytes], gc_upto: int) -> None:
        """Commit sink state and drop WAL records at or below ``gc_upto``, in one transaction."""

        def put(txn: lmdb.Transaction) -> None:
            for k in deletes:
                txn.delete(k, db=self.sink)
            for k, v in puts.items():
                txn.put(k, msgpack.packb(v), db=self.sink)
            cur = txn.cursor(db=self.wal)
            if cur.first():
                while cur.key() and _U64.unpack(cur.key())[0] <= gc_upto:
                    if not cur.delete():
                        break

        self._write(put)

    def backlog(self, cursor: int) -> int:
        """Records appended but not yet passed by a sink at ``cursor``."""
        return max(0, self.last_seq - cursor)

    def used_bytes(self) -> int:
        """Bytes of the map in use (pages times page size)."""
        info, stat = self.env.info(), self.env.stat()
        return int((info["last_pgno"] + 1) * stat["psize"])
