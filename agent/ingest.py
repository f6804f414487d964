"""Ingest: PULL socket → validate → one WAL transaction per drained batch.

Runs on its own thread (a ZeroMQ socket stays on the thread that made it): wait for a
frame, drain whatever else is queued up to ``ingest_batch``, decode each, and append the
valid ones in one durable transaction. Invalid frames are counted by reason and never
stored. A full or failing WAL drops the batch and counts it; the loop keeps serving.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import zmq

from dashcar.proto import INGEST_SOCKET, Kind, ProtocolError, validate

from .errors import WALFull
from .wal import Wal

log = logging.getLogger(__name__)

WARN_INTERVAL_S = 10.0


_BARRIER_KINDS = (bytes([Kind.FLUSH]), bytes([Kind.RUN_CLOSE]))
"""Byte 2 of a v1 frame is its kind; a flush or close commits its batch without waiting."""


class Ingest:
    """The receive side: owns the PULL socket and the WAL's append path."""

    def __init__(
        self, wal: Wal, runtime_dir: Path, *, batch: int, rcvhwm: int, group_commit_s: float, on_stored: Callable[[], None]
    ) -> None:
        self.wal = wal
        self.batch = batch
        self.group_commit_s = group_commit_s
        self.on_stored = on_stored
        self.endpoint = f"ipc://{runtime_dir / INGEST_SOCKET}"
        self._sock_path = runtime_dir / INGEST_SOCKET
        self._rcvhwm = rcvhwm
        self.internal: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        """Agent-made frames (a producer ended); stored only once the socket was seen empty, so
        every frame the dead producer had sent is stored before the news of its death."""
        saved = wal.get_meta("ingest", {})
        self.counters: dict[str, Any] = {"received": 0, "stored": 0, "rejected": 0, "dropped_wal": 0}
        self.counters.update(saved if isinstance(saved, dict) else {})
        self.rejected_by: dict[str, int] = dict(wal.get_meta("rejected_by", {}) or {})  # type: ignore[call-overload]
        self.wal_error: str | None = None
        self._emptied = False
        self._warned: dict[str, float] = {}

    def _warn(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_INTERVAL_S) >= WARN_INTERVAL_S:
            self._warned[key] = now
            log.warning(msg, *args)

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, then drain what is already queued and return."""
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            os.unlink(self._sock_path)
        except FileNotFoundError:
            pass
        sock.bind(self.endpoint)
        try:
            while not stop.is_set():
                if sock.poll(50):
                    self._collect(sock)
                elif not self.internal.empty():
                    self._emptied = True
                    self._store([])
            while self._collect(sock, linger=False):
                pass
        finally:
            sock.close(linger=0)
            ctx.term()

    def _collect(self, sock: zmq.Socket[bytes], linger: bool = True) -> int:
        """Gather one batch: drain the queue, and keep gathering for up to ``group_commit_s``.

        A trickle of frames (a 1 kHz loop) then costs one fsync per interval, not one per frame;
        a flush barrier in the batch, or a full batch, commits at once.
        """
        raws: list[bytes] = []
        barrier = emptied = False
        deadline = time.monotonic() + self.group_commit_s
        while True:
            try:
                while len(raws) < self.batch:
                    raw = sock.recv(zmq.NOBLOCK)
                    raws.append(raw)
                    barrier = barrier or raw[2:3] in _BARRIER_KINDS
            except zmq.Again:
                emptied = True
            left = deadline - time.monotonic()
            if not linger or barrier or len(raws) >= self.batch or left <= 0:
                break
            sock.poll(max(1, int(left * 1000)))
        if not raws:
            return 0
        self.counters["received"] += len(raws)
        self._emptied = emptied
        good: list[bytes] = []
        for raw in raws:
            try:
                validate(raw)
            except ProtocolError as exc:
                reason = exc.reason
                self.rejected_by[reason] = self.rejected_by.get(reason, 0) + 1
                self.counters["rejected"] += 1
                self._warn("reject:" + reason, "frame rejected reason=%s detail=%s", reason, exc)
                continue
            good.append(raw)
        self._store(good)
        return len(raws)

    def _store(self, good: list[bytes]) -> None:
        wire = len(good)
        if self._emptied:
            while not self.internal.empty():
                good.append(self.internal.get_nowait())
        self.counters["stored"] += wire
        meta = {"ingest": self.counters, "rejected_by": self.rejected_by}
        try:
            self.wal.append(good, meta)
        except (WALFull, lmdb.Error) as exc:
            self.counters["stored"] -= wire
            self.counters["dropped_wal"] += wire
            self.wal_error = str(exc)
            self._warn("wal", "WAL append failed, %d frames dropped (total %d): %s", len(good), self.counters["dropped_wal"], exc)
            return
        self.wal_error = None
        if good:
            self.on_stored()
