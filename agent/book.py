"""The run book: producers, runs and loss accounting, as pure bookkeeping.

Invariants (unit-tested in ``tests/agent/test_book.py``)
- A producer's frames are admitted in sequence order: a seq at or below the last admitted is
  a duplicate (dropped, counted); a jump is a gap (``missing``, counted for the run whose
  frame revealed it). Frames a producer could not send are reported by the producer itself
  (``dropped_by_producer``, with its flush and close frames) or by the agent when it ended
  (``lost_in_producer_queue``: frames that died in its queue).
- A run is open while any producer attached to it is open. It closes when every producer
  has closed or died; its status is the worst of its owners' (completed < cancelled <
  failed < crashed; a producer that died is ``crashed``). A frame for a closed run reopens it.
- Each index-based series numbers its points from where its run left off; each run numbers
  its log lines; parameters merge (flattened) into one versioned set per run.
- Track topics whose directory names collide (``a/b`` and ``a_b``) cannot share a run: the
  second one's entries are refused and counted.

The book does no I/O. It calls ``load_run`` to meet a run it does not hold in memory (the
core looks in its own state, then in the run's local files) and ``count_series`` to learn
how many points a series of such a run already has. ``dirty_runs``/``dirty_producers`` say
what a commit must write; ``to_state``/``from_state`` are the stored forms.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Final

from dashcar.proto import track_dir_name

from . import merge

MAX_GONE_PRODUCERS: Final = 10_000
MAX_GAPS: Final = 256
"""Gaps remembered per producer (a frame filling an older one counts as a duplicate)."""
DUPLICATE: Final = 0
NEW: Final = 1
REFILL: Final = 2
"""Ended producers remembered (with their last seq) so late frames still count gaps right."""
STATUS_RANK: Final = {"completed": 0, "cancelled": 1, "failed": 2, "crashed": 3}
OPEN: Final = "open"
GONE: Final = "gone"


def iso(t: float) -> str:
    """ML-Dash's timestamp format: naive UTC ISO-8601 with a trailing ``Z``."""
    return datetime.fromtimestamp(t, timezone.utc).replace(tzinfo=None).isoformat() + "Z"


def series_key(folder: str, name: str | None) -> str:
    """The book's key of a series (``""`` stands for the unnamed metric, never a valid name)."""
    return f"{folder}\0{name or ''}"


@dataclass(slots=True)
class Run:
    """One run as the book knows it."""

    path: str
    root: str
    prefix: str
    info: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    status: str = "running"
    reason: str | None = None
    closed_at: str | None = None
    producers: dict[int, str] = field(default_factory=dict)
    owners: list[int] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    params_version: int = 0
    params_created: str | None = None
    series: dict[str, int] = field(default_factory=dict)
    log_seq: int = 0
    topics: dict[str, float] = field(default_factory=dict)
    """Topic → the largest timestamp settled so far (a later row at or below it is late)."""
    dirs: dict[str, str] = field(default_factory=dict)
    """Track directory name → the topic that owns it."""
    local: bool = True
    """False for a run that keeps no local files (``dash_root=None``): only remote sinks get it."""
    dash_url: str | None = None
    token: str | None = None
    """The run's own ML-Dash server and token (kept in the core's 0600 state, never in its info)."""

    def to_state(self) -> dict[str, Any]:
        """The stored form."""
        return {
            "root": self.root, "prefix": self.prefix, "info": self.info, "created_at": self.created_at,
            "status": self.status, "reason": self.reason, "closed_at": self.closed_at, "producers": self.producers,
            "owners": self.owners, "counters": self.counters, "params": self.params, "params_version": self.params_version,
            "params_created": self.params_created, "series": self.series, "log_seq": self.log_seq, "topics": self.topics,
            "dirs": self.dirs, "local": self.local, "dash_url": self.dash_url, "token": self.token,
        }

    @classmethod
    def from_state(cls, path: str, st: dict[str, Any]) -> Run:
        """A run from its stored form."""
        return cls(path, **st)


@dataclass(slots=True)
class Producer:
    """One producer (a socket of one thread of one process)."""

    pid: int
    last: int = 0
    dropped: int = 0
    runs: list[str] = field(default_factory=list)
    gone: bool = False
    last_run: str | None = None
    gaps: list[list[Any]] = field(default_factory=list)
    """Seqs not seen yet below ``last``: ``[first, last, run that counted them missing]``, oldest first."""

    def to_state(self) -> list[Any]:
        """The stored form."""
        return [self.pid, self.last, self.dropped, self.runs, self.gone, self.last_run, self.gaps]

    @classmethod
    def from_state(cls, st: list[Any]) -> Producer:
        """A producer from its stored form."""
        return cls(*st)


LoadRun = Callable[[str, str, str], Run]
CountSeries = Callable[[Run, str, str | None], int]


class Book:
    """Producers and runs; every method is bookkeeping on values, no I/O."""

    def __init__(self, load_run: LoadRun, count_series: CountSeries, wall: Callable[[], float] = time.time) -> None:
        self.load_run = load_run
        self.count_series = count_series
        self.wall = wall
        self.producers: dict[int, Producer] = {}
        self.runs: dict[str, Run] = {}
        self.counters: dict[str, int] = {}
        self.dirty_runs: set[str] = set()
        self.dirty_producers: set[int] = set()
        self.forgotten_producers: set[int] = set()
        self.settle: set[str] = set()
        """Runs whose open rows must settle now (a barrier, a close, a producer's death)."""

    # ------------------------------------------------------------------ counters
    def count(self, run: Run | None, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``, for the agent and, if given, for ``run``."""
        self.counters[name] = self.counters.get(name, 0) + n
        if run is not None:
            c = run.counters
            c[name] = c.get(name, 0) + n
            self.dirty_runs.add(run.path)

    # ------------------------------------------------------------------ producers
    def producer(self, sid: int, pid: int) -> Producer:
        """The producer ``sid``, met now if it is new."""
        p = self.producers.get(sid)
        if p is None:
            p = self.producers[sid] = Producer(pid)
        self.dirty_producers.add(sid)
        return p

    def admit(self, p: Producer, seq: int, run: Run | None) -> int:
        """Check ``seq`` against what the producer sent before: ``NEW``, ``REFILL`` or ``DUPLICATE`` (0).

        A jump is a gap, counted ``missing`` for ``run``; a frame that later fills it (a producer
        re-sending what an agent that died never acknowledged) is admitted and un-counts it; any
        other seq at or below the last is a duplicate, dropped and counted.
        """
        last = p.last
        if seq > last:
            if seq > last + 1:
                self.count(run, "missing", seq - last - 1)
                p.gaps.append([last + 1, seq - 1, run.path if run is not None else None])
                if len(p.gaps) > MAX_GAPS:
                    del p.gaps[0]
            p.last = seq
            p.gone = False
            return NEW
        for i, gap in enumerate(p.gaps):
            lo, hi, counted_for = gap
            if lo <= seq <= hi:
                if lo == hi:
                    del p.gaps[i]
                elif seq == lo:
                    gap[0] = seq + 1
                elif seq == hi:
                    gap[1] = seq - 1
                else:
                    p.gaps[i:i + 1] = [[lo, seq - 1, counted_for], [seq + 1, hi, counted_for]]
                self.count(self.runs.get(counted_for or ""), "missing", -1)
                self.count(run, "recovered")
                return REFILL
        self.count(run, "duplicates")
        return DUPLICATE

    def reported(self, p: Producer, run: Run | None, dropped: int) -> None:
        """The producer's own count of frames it could not send (rises only)."""
        if dropped > p.dropped:
            self.count(run, "dropped_by_producer", dropped - p.dropped)
            p.dropped = dropped

    def live_pids(self) -> dict[int, int]:
        """``sid → pid`` of every producer not known to have ended."""
        return {sid: p.pid for sid, p in self.producers.items() if not p.gone}

    # ----------------------------------------------------------------------- runs
    def run(self, root: str, prefix: str, path: str) -> Run:
        """The run at ``path``, loaded if the book does not hold it."""
        r = self.runs.get(path)
        if r is None:
            r = self.runs[path] = self.load_run(root, prefix, path)
        self.dirty_runs.add(path)
        return r

    def attach(self, p: Producer, sid: int, run: Run, admitted: int = NEW) -> None:
        """A frame of ``p`` for ``run``: the producer is open in it (reopening a closed run).

        A re-sent frame (``REFILL``) only adds its data: the producer may have closed the run since.
        """
        if admitted == REFILL:
            return
        p.last_run = run.path
        if run.producers.get(sid) != OPEN:
            run.producers[sid] = OPEN
            if run.path not in p.runs:
                p.runs.append(run.path)
            if run.status != "running":
                run.status, run.reason, run.closed_at = "running", None, None

    def open_run(self, sid: int, run: Run, info: dict[str, Any]) -> None:
        """A ``RUN_OPEN``: the producer owns the run; its info lands in ``experiment.json``.

        ``dash_url``, ``dash_token`` and ``local`` are taken out of the info first: where the run
        ships to and whether it keeps files, and the token, which must never reach a file.
        """
        info = dict(info)
        url, token, local = info.pop("dash_url", None), info.pop("dash_token", None), info.pop("local", True)
        if isinstance(url, str) and url:
            run.dash_url = url.rstrip("/")
            run.token = token if isinstance(token, str) and token else None
        if local is False:
            run.local = False
        run.info.update(info)
        if sid not in run.owners:
            run.owners.append(sid)

    def close_run(self, sid: int, p: Producer, run: Run | None, status: str, reason: str | None, dropped: int) -> None:
        """A ``RUN_CLOSE`` from producer ``sid``."""
        self.reported(p, run, dropped)
        if run is None or run.producers.get(sid) != OPEN:
            return
        self.dirty_runs.add(run.path)
        run.producers[sid] = status
        if reason and sid in run.owners:
            run.reason = reason
        self.settle.add(run.path)
        self._maybe_close(run)

    def flush(self, p: Producer, run: Run | None, dropped: int) -> None:
        """A ``FLUSH`` barrier: every run of the producer settles now."""
        self.reported(p, run, dropped)
        self.settle.update(p.runs)

    def producer_gone(self, sid: int, last_sent: int, dropped: int, pending: int) -> None:
        """The producer's process ended; its own counters say what died with it."""
        p = self.producers.get(sid)
        if p is None:
            p = self.producer(sid, 0)
        self.dirty_producers.add(sid)
        last_run = self.runs.get(p.last_run or "")
        if last_sent > p.last:
            self.count(last_run, "lost_in_producer_queue", last_sent - p.last)
            p.last = last_sent
        if pending:
            self.count(last_run, "lost_in_producer_queue", pending)
        self.reported(p, last_run, dropped)
        for path in p.runs:
            run = self.runs.get(path)
            if run is None:
                continue
            if run.producers.get(sid) == OPEN:
                run.producers[sid] = GONE
                self.count(run, "producers_died")
                self.settle.add(path)
                self._maybe_close(run)
        p.gone = True
        gone = [s for s, q in self.producers.items() if q.gone]
        for old in gone[: max(0, len(gone) - MAX_GONE_PRODUCERS)]:
            del self.producers[old]
            self.dirty_producers.discard(old)
            self.forgotten_producers.add(old)

    def _maybe_close(self, run: Run) -> None:
        states = run.producers
        if any(s == OPEN for s in states.values()):
            return
        owners = run.owners or list(states)
        worst = "completed"
        for sid in owners:
            s = states.get(sid, "completed")
            s = "crashed" if s == GONE else s
            if STATUS_RANK.get(s, 0) > STATUS_RANK[worst]:
                worst = s
        run.status = worst
        if worst == "crashed" and not run.reason:
            run.reason = "producer process ended without closing the run"
        run.closed_at = iso(self.wall())

    # ------------------------------------------------------------------- content
    def next_indexes(self, run: Run, folder: str, name: str | None, n: int) -> int:
        """Reserve ``n`` indexes of a series; returns the first."""
        key = series_key(folder, name)
        first = run.series.get(key)
        if first is None:
            first = self.count_series(run, folder, name)
        run.series[key] = first + n
        return first

    def next_log_seqs(self, run: Run, n: int) -> int:
        """Reserve ``n`` log sequence numbers of a run; returns the first."""
        first = run.log_seq
        run.log_seq += n
        return first

    def set_params(self, run: Run, data: dict[str, Any]) -> dict[str, Any]:
        """Merge (flattened) parameters into the run's; returns the flattened change."""
        flat = merge.flatten(data)
        if flat is data:
            flat = dict(flat)
        run.params.update(flat)
        run.params_version += 1
        if run.params_created is None:
            run.params_created = iso(self.wall())
        return flat

    def topic_allowed(self, run: Run, topic: str) -> bool:
        """True unless another topic of the run already owns this topic's directory (counted)."""
        d = track_dir_name(topic)
        owner = run.dirs.get(d)
        if owner is None:
            run.dirs[d] = topic
            return True
        if owner == topic:
            return True
        self.count(run, "rejected_topic_collision")
        return False

    # --------------------------------------------------------------------- state
    def closed(self, run: Run, has_open_rows: bool) -> bool:
        """A closed run with nothing left to settle: its final state can be written."""
        return run.status != "running" and not has_open_rows

    def forget_runs(self, paths: Iterable[str]) -> None:
        """Drop finished runs from memory (their state stays stored) and from their producers."""
        doomed = set(paths)
        for path in doomed:
            self.runs.pop(path, None)
        for sid, p in self.producers.items():
            if doomed.intersection(p.runs):
                p.runs = [r for r in p.runs if r not in doomed]
                self.dirty_producers.add(sid)
