"""The one loop that drives every sink: stream cursor → send → commit | back off | dead-letter.

Each sink runs on its own thread. The runner keeps the sink's cursor (the last stream batch
it committed) and its totals in the sink's namespace of the state environment, and commits
them in the same transaction as the state the sink staged while sending, so a crash between
``send`` and the commit only repeats ``send`` after ``open`` repaired what it left.

- ``SinkRetryable`` (or any unexpected error): nothing is committed, the sink is reopened and
  the same batches are sent again after ``backoff(attempt)`` (exponential with jitter, at
  least what the other side asked for in ``retry_after_s``); status shows the error and when
  the next attempt is due.
- ``SinkRejected``, or items ``send`` returns as refused: they are written to the sink's
  dead-letter file (``<state_dir>/deadletter/<sink>.jsonl``, one JSON line each with the
  reason) and counted per run, and the cursor moves on.
- ``skip_to``: when the WAL nears its cap, the agent asks a sink whose ``when_full`` is
  ``skip`` to jump ahead; what it skipped is counted per run and stays in its state.

A sink may ask for more (optional attributes, see ``sinks.Sink``): ``hold_frames``/``hold_s``
make the runner gather batches until that many frames wait, the oldest has waited that long,
a run ends, the agent stops or a flush waits for them (an archive rolls objects so), and
``max_frames``/``max_batches`` bound one send (default 8192 frames, 64 batches); ``pending()`` has the runner call
``send([])`` while no batch comes (a sink with retries of its own); ``interrupt()`` (a remote sink)
is called when the agent stops, so a send waiting on the network gives up at once. A send that staged nothing
is committed at most once a second: ``cursor`` is what was delivered, ``durable`` what a
restart resumes after; retention follows ``durable``. A sink with an outbox of its own (the
ML-Dash sink) says with ``delivered()`` and ``backlog()`` how far the other side really is:
``wait_passed`` (``flush --remote``) waits for it, and its lag counts the outbox; its own
``error`` and ``retry`` show in status while the runner has none.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import orjson

from ..core import Core
from ..errors import SinkRejected, SinkRetryable
from ..stream import Batch, FlushedItem, Item
from ..wal import SinkState, Wal
from . import Rejected, Sink

log = logging.getLogger(__name__)

BACKOFF_BASE_S: Final = 0.05
BACKOFF_CAP_S: Final = 30.0
BATCHES_PER_SEND: Final = 64
FRAMES_PER_SEND: Final = 8192
"""A send gets at most this many frames' worth of batches (one batch, if it alone has more):
decoded, stream batches take many times their stored size."""
IDLE_WAIT_S: Final = 0.5
LAZY_COMMIT_S: Final = 1.0
WARN_INTERVAL_S: Final = 60.0
"""A sink that keeps failing is reported at WARNING once a minute (each attempt at DEBUG)."""


def backoff(attempt: int, *, base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_CAP_S, rand: float | None = None) -> float:
    """Seconds to wait before attempt ``attempt + 1``: doubling from ``base_s`` up to ``cap_s``, with jitter.

    The jitter (a factor in [0.5, 1]) keeps many agents behind one server from retrying in step.
    """
    r = random.random() if rand is None else rand
    return float(min(cap_s, base_s * 2 ** min(attempt, 30)) * (0.5 + r / 2))


def _run_of(item: Item) -> str | None:
    return getattr(item, "run", None)


class Runner:
    """Drives one sink on its own thread."""

    def __init__(
        self,
        sink: Sink,
        core: Core,
        wal: Wal,
        state_dir: Path,
        *,
        on_progress: Callable[[], None] = lambda: None,
        prepare_thread: Callable[[], None] = lambda: None,
    ) -> None:
        self.sink = sink
        self.name = sink.name
        self.core = core
        self.state: SinkState = wal.state(sink.name)
        self.deadletter_path = state_dir / "deadletter" / f"{sink.name}.jsonl"
        self.on_progress = on_progress
        self.prepare_thread = prepare_thread
        self.cond = threading.Condition()
        """Notified on every commit (cursor, flush acks)."""
        self.stopping = threading.Event()
        self._wake = threading.Event()
        """Cuts a backoff wait short: a stop, or a request to skip."""
        self.cursor = 0
        """The last stream batch delivered (committed, or delivered with nothing to commit)."""
        self.durable = 0
        """The last stream batch committed: what a restart resumes after, and what retention may drop."""
        self.passed_frames = 0
        self.passed_bytes = 0
        self.counters: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.dead_letters: dict[str, int] = {}
        self.flushed: dict[int, int] = {}
        self.error: str | None = None
        self.attempt = 0
        self.retry_at: float | None = None
        self._skip_to = 0
        self._gathered: list[Batch] = []
        """Batches kept while holding (see ``_keep``), from ``cursor + 1`` on."""
        self._gathered_frames = 0
        self._gather_lock = threading.Lock()
        self._warned_at = 0.0
        self._committed_at = 0.0
        self._scanned = 0
        self._closing = False
        self._opened = False
        self._starved = False
        self.hold_frames: int = getattr(sink, "hold_frames", 0)
        self.hold_s: float = getattr(sink, "hold_s", 0.0)
        self.max_frames: int = getattr(sink, "max_frames", FRAMES_PER_SEND)
        self.max_batches: int = getattr(sink, "max_batches", BATCHES_PER_SEND)
        self._release = 0
        """A flush waits for this stream batch: nothing up to it is held (``wait_passed``)."""
        self._pending: Callable[[], float | None] = getattr(sink, "pending", lambda: None)
        if self.hold_frames or self.hold_s:
            core.subscribe(self._keep)
        self._delivered: Callable[[], int] | None = getattr(sink, "delivered", None)
        self._backlog: Callable[[], tuple[int, int, float | None]] | None = getattr(sink, "backlog", None)
        self._load()

    def _load(self) -> None:
        st = self.state
        self.cursor = self.durable = int(st.get(b"cursor", 0))
        self.passed_frames, self.passed_bytes = st.get(b"passed", [0, 0])
        self.counters = dict(st.get(b"counters", {}))
        self.skipped = dict(st.get(b"skipped", {}))
        self.dead_letters = dict(st.get(b"dead", {}))

    # ------------------------------------------------------------------- thread
    def run(self) -> None:
        """Follow the stream until ``stop``; returns once caught up with the core after the stop."""
        self.prepare_thread()
        try:
            self._follow()
        finally:
            self.flush_cursor()

    def _follow(self) -> None:
        while True:
            if self.stopping.is_set() and not self.sink.barrier:
                return
            if self.retry_at is not None:
                self._wake.wait(max(0.0, self.retry_at - time.time()))
                self._wake.clear()
            if self.step():
                continue
            if self.stopping.is_set() and (self.core.out_seq <= self.cursor or self.error is not None):
                if self.error is not None:
                    log.warning("sink=%s stopping with its backlog in the WAL for the next start", self.name)
                return
            if self.durable < self.cursor and time.monotonic() - self._committed_at >= LAZY_COMMIT_S:
                self.flush_cursor()
            wait = self._idle_wait()
            if wait is None:
                continue
            with self.core.cond:
                # A batch the core numbered but had not committed when ``step`` looked is announced
                # on this condition: wait for it instead of asking again and again.
                if not self.stopping.is_set() and not (self._starved and self.cursor + 1 in self.core.recent):
                    self.core.cond.wait(wait)
            if self._opened and (due := self._pending()) is not None and due <= 0:
                self._deliver([])

    def step(self) -> bool:
        """Open the sink if needed, skip if asked, deliver what the core has made; True if the cursor moved.

        A failure is recorded with the time of the next attempt (``backoff``), which ``run`` waits for.
        """
        if not self._opened and not self._open():
            return False
        if self._skip_to > self.cursor:
            self._skip()
        self._starved = False
        if self._holding():
            return False
        batches = self._take()
        self._starved = not batches
        return bool(batches) and self._deliver(batches)

    def _keep(self, batch: Batch) -> None:
        """Called by the core with each new batch: a runner that holds keeps it decoded (up to one
        send's worth), so the send does not read it back and merge its rows again from the WAL."""
        with self._gather_lock:
            gathered = self._gathered
            expected = gathered[-1].seq + 1 if gathered else self.cursor + 1
            if batch.seq == expected and self._gathered_frames < self.max_frames:
                gathered.append(batch)
                self._gathered_frames += batch.frames

    def _take(self) -> list[Batch]:
        """The next batches to send: those kept in memory, then the rest from the stream."""
        with self._gather_lock:
            gathered = [b for b in self._gathered if b.seq > self.cursor]
            self._gathered, self._gathered_frames = [], 0
        if not gathered or gathered[0].seq != self.cursor + 1:
            return self.core.batches(self.cursor, self.max_batches, self.max_frames)
        frames = 0
        out: list[Batch] = []
        for b in gathered:
            if out and (frames + b.frames > self.max_frames or len(out) >= self.max_batches):
                return out
            out.append(b)
            frames += b.frames
        if frames < self.max_frames and len(out) < self.max_batches:
            for b in self.core.batches(out[-1].seq, self.max_batches - len(out), self.max_frames - frames):
                if frames + b.frames > self.max_frames:
                    break
                out.append(b)
                frames += b.frames
        return out

    def _holding(self) -> bool:
        """True while the sink wants more batches before a send (``hold_frames``/``hold_s``)."""
        if not (self.hold_frames or self.hold_s) or self.stopping.is_set() or self.core.out_seq <= self.cursor:
            return False
        if self.cursor < self._release:
            return False
        if self.core.total_frames - self.passed_frames >= self.hold_frames > 0:
            return False
        if self._scanned < self.cursor:
            self._scanned, self._closing = self.cursor, False
        heads = self.core.summaries(self._scanned, self.core.out_seq - self._scanned)
        if heads:
            self._scanned = heads[-1].seq
            self._closing = self._closing or any(h.closed for h in heads)
        if self._closing:
            return False
        oldest = self.core.summaries(self.cursor, 1)
        return not oldest or time.time() - oldest[0].created < self.hold_s

    def _idle_wait(self) -> float | None:
        """How long to wait for the next batch (None: do not wait, a held send is due now)."""
        wait = IDLE_WAIT_S
        if self.hold_s and self.core.out_seq > self.cursor:
            oldest = self.core.summaries(self.cursor, 1)
            if oldest:
                due = oldest[0].created + self.hold_s - time.time()
                if due <= 0:
                    return None
                wait = min(wait, due)
        elif self.core.out_seq > self.cursor and not self.stopping.is_set() and not self._starved:
            return None
        pending = self._pending() if self._opened else None
        return wait if pending is None else max(0.0, min(wait, pending))

    def flush_cursor(self) -> None:
        """Commit a cursor that moved lazily (on the runner's thread, at its end)."""
        if self.durable < self.cursor:
            self.state.commit({b"cursor": self.cursor, b"passed": [self.passed_frames, self.passed_bytes]})
            self.durable = self.cursor
            self._committed_at = time.monotonic()

    def stop(self) -> None:
        """Ask the thread to finish what the core has made and return (a remote stops waiting on the network)."""
        self.stopping.set()
        self._wake.set()
        interrupt: Callable[[], None] | None = getattr(self.sink, "interrupt", None)
        if interrupt is not None and not self.sink.barrier:
            interrupt()
        with self.core.cond:
            self.core.cond.notify_all()

    def _open(self) -> bool:
        try:
            self.sink.open(self.state)
        except Exception as exc:
            self._failed(exc, "open")
            return False
        self._opened = True
        return True

    def _deliver(self, batches: list[Batch]) -> bool:
        try:
            refused = self.sink.send(batches, self.state)
        except SinkRejected as exc:
            refused = [Rejected(str(exc), [i for b in batches for i in b.items])]
        except Exception as exc:
            self.state.discard()
            self._opened = False
            self._failed(exc, "send")
            return False
        try:
            if refused:
                self._dead_letter(batches[-1].seq if batches else self.cursor, refused)
            if batches:
                last = batches[-1]
                lazy = not refused and not self.state.puts and not self.state.deletes
                self._commit(last.seq, last.before_frames + last.frames, last.before_bytes + last.size, lazy=lazy)
            elif self.state.puts or self.state.deletes:
                self.state.commit()
        except Exception as exc:
            self.state.discard()
            self._opened = False
            self._failed(exc, "commit")
            return False
        try:
            self.sink.committed(batches)
        except Exception as exc:
            self._opened = False
            self._failed(exc, "after commit")
            return True
        acks = [(i.sid, i.seq) for b in batches for i in b.items if isinstance(i, FlushedItem)]
        with self.cond:
            for sid, seq in acks:
                if seq > self.flushed.get(sid, 0):
                    self.flushed[sid] = seq
            self.cond.notify_all()
        if self.error is not None:
            log.info("sink=%s recovered after %d attempts", self.name, self.attempt)
        self.error, self.attempt, self.retry_at = None, 0, None
        self.on_progress()
        return True

    def _commit(self, cursor: int, frames: int, size: int, *, lazy: bool = False) -> None:
        """Move the cursor; commit it (with what the sink staged) unless ``lazy`` and committed within the second."""
        now = time.monotonic()
        if not lazy or now - self._committed_at >= LAZY_COMMIT_S or self.stopping.is_set():
            self.state.commit({b"cursor": cursor, b"passed": [frames, size], b"counters": self.counters,
                               b"skipped": self.skipped, b"dead": self.dead_letters})
            self._committed_at = now
            self.durable = cursor
        with self.cond:
            self.cursor, self.passed_frames, self.passed_bytes = cursor, frames, size

    def _failed(self, exc: Exception, what: str) -> None:
        self.error = f"{what}: {exc}"
        wait = backoff(self.attempt)
        now = time.monotonic()
        loud = self.attempt == 0 or now - self._warned_at >= WARN_INTERVAL_S
        if isinstance(exc, SinkRetryable):
            wait = max(wait, exc.retry_after_s)
            log.log(logging.WARNING if loud else logging.DEBUG, "sink=%s %s failed (attempt %d), retrying in %.2fs: %s",
                    self.name, what, self.attempt + 1, wait, exc)
        else:
            log.log(logging.ERROR if loud else logging.DEBUG, "sink=%s %s failed unexpectedly (attempt %d), retrying in %.2fs",
                    self.name, what, self.attempt + 1, wait, exc_info=True)
        if loud:
            self._warned_at = now
        self.attempt += 1
        self.retry_at = time.time() + wait

    def _dead_letter(self, seq: int, refused: list[Rejected]) -> None:
        self.deadletter_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lines = []
        for r in refused:
            for item in r.items:
                run = _run_of(item) or ""
                self.dead_letters[run] = self.dead_letters.get(run, 0) + 1
                self.counters["dead_letters"] = self.counters.get("dead_letters", 0) + 1
                fields = item._asdict()
                if fields.get("token"):
                    fields["token"] = "<redacted>"
                record = {"time": time.time(), "sink": self.name, "batch": seq, "reason": r.reason, "item": fields}
                lines.append(orjson.dumps(record, default=str) + b"\n")
        fd = os.open(self.deadletter_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"".join(lines))
            os.fsync(fd)
        finally:
            os.close(fd)
        log.warning("sink=%s dead-lettered %d items of batch %d: %s", self.name, len(lines), seq, refused[0].reason)

    # --------------------------------------------------------------------- skip
    def skip_to(self, seq: int) -> None:
        """Ask the sink to jump past stream batch ``seq`` (the WAL nears its cap)."""
        if self.sink.when_full == "skip" and seq > self._skip_to:
            self._skip_to = seq
            self._wake.set()
            with self.core.cond:
                self.core.cond.notify_all()

    def _skip(self) -> None:
        target = min(self._skip_to, self.core.out_seq)
        heads = self.core.summaries(self.cursor, target - self.cursor)
        with self._gather_lock:
            self._gathered, self._gathered_frames = [], 0
        if not heads:
            return
        frames = 0
        for h in heads:
            frames += h.frames
            for run, n in h.runs.items():
                self.skipped[run] = self.skipped.get(run, 0) + n
        self.counters["skipped_frames"] = self.counters.get("skipped_frames", 0) + frames
        last = heads[-1]
        self._commit(last.seq, last.before_frames + last.frames, last.before_bytes + last.size)
        self._opened = False
        log.warning("sink=%s skipped %d frames (%d batches) to keep the WAL under its cap", self.name, frames, len(heads))
        self.on_progress()

    # ------------------------------------------------------------------ waiting
    def wait_flushed(self, sid: int, seq: int, timeout_s: float) -> bool:
        """Block until producer ``sid``'s barrier ``seq`` is committed by this sink."""
        with self.cond:
            return self.cond.wait_for(lambda: self.flushed.get(sid, 0) >= seq, timeout_s)

    def wait_passed(self, seq: int, timeout_s: float) -> bool:
        """Block until this sink has committed stream batch ``seq`` (and, with an outbox, delivered it);
        a sink that holds batches sends them now."""
        if seq > self._release and self.cursor < seq:
            self._release = seq
            with self.core.cond:
                self.core.cond.notify_all()
        delivered = self._delivered
        with self.cond:
            return self.cond.wait_for(lambda: self.cursor >= seq and (delivered is None or delivered() >= seq), timeout_s)

    # ------------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        """Lag (frames, bytes, age of the oldest unsent batch), last error, retry state, counters."""
        core = self.core
        lag_frames = max(0, core.total_frames - self.passed_frames)
        lag_bytes = max(0, core.total_bytes - self.passed_bytes)
        oldest = None
        if core.out_seq > self.cursor:
            heads = core.summaries(self.cursor, 1)
            oldest = round(max(0.0, time.time() - heads[0].created), 3) if heads else None
        if self._backlog is not None:
            frames, size, since = self._backlog()
            lag_frames, lag_bytes = lag_frames + frames, lag_bytes + size
            if since is not None:
                oldest = round(max(oldest or 0.0, time.time() - since), 3)
        own = self.sink.status()
        error, retry = own.pop("error", None), own.pop("retry", None)
        return {
            "cursor": self.cursor,
            "when_full": self.sink.when_full,
            "lag": {"batches": max(0, core.out_seq - self.cursor), "frames": lag_frames, "bytes": lag_bytes,
                    "oldest_age_s": oldest},
            "error": self.error if self.error is not None else error,
            "retry": {"attempt": self.attempt, "next_in_s": round(max(0.0, self.retry_at - time.time()), 3)}
            if self.retry_at is not None else retry,
            "counters": dict(self.counters),
            "skipped_by_run": dict(self.skipped),
            "dead_letters_by_run": dict(self.dead_letters),
            **own,
        }
