"""The JSONL sink: stored frames → the ML-Dash local layout, exactly once across crashes.

Invariants
- The sink consumes the WAL in seq order and keeps everything it knows in the ``sink``
  database: its cursor, each file's committed size and counters, every run and producer,
  and every open (unsettled) track row. One ``Wal.commit`` makes a batch's effects durable
  together, after the batch's file bytes are written and fsynced.
- Appends go past the committed size, so an uncommitted append is simply truncated on
  recovery. A late track entry for an already written timestamp rewrites the file's tail:
  the new tail is committed first as a redo record ``(offset, bytes)`` and applied after the
  commit; recovery re-applies any redo it finds (idempotent), then truncates the rest.
- A track file is always sorted by timestamp with one merged line per timestamp. Rows settle
  (are written) on a flush barrier, a run close, a producer's death, after ``merge_window_s``,
  or all at once when more than ``max_open_rows`` are open. Settling a row also settles every
  open row of its topic with a smaller timestamp, so late rows are rare.
- Open rows are not copied into LMDB: each commit records, per topic, the timestamps of its
  open rows and the WAL seqs of the entries merged into each (``t:`` keys). Garbage collection
  keeps WAL records from the lowest of those seqs on, and recovery rebuilds the open rows by
  re-reading exactly those records.
- ``experiment.json``, ``parameters.json``, ``metadata.json`` and ``.log_sequence`` are derived
  from the committed state and replaced atomically after each commit and on recovery.
- A run closes when every producer attached to it has closed or died. Its final state is
  committed and its ``experiment.json`` written; only the next commit drops its state from
  LMDB (files on disk are then the record, and a reopened run reloads from them), so a crash
  in between rewrites the final files on recovery instead of leaving them stale.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from dashcar.proto import Kind, Meta, ProducerGone, ProtocolError, frame_from, run_dir, unpack_stored

from .. import merge
from ..errors import SinkRetryable
from ..wal import Wal
from . import layout

log = logging.getLogger(__name__)

GC_INTERVAL_S = 0.5
GC_RECORDS = 65_536
MAX_GONE_PRODUCERS = 10_000
"""Ended producers remembered (with their last seq) so late frames still count gaps right."""
_STATUS_RANK = {"completed": 0, "cancelled": 1, "failed": 2, "crashed": 3}
_TRACK: Final = int(Kind.TRACK)


def _topic_key(run: str, topic: str) -> bytes:
    return b"t:" + run.encode() + b"\0" + topic.encode()


@dataclass(slots=True)
class Row:
    """An open track row: merged fields of every entry seen so far at one timestamp."""

    fields: dict[str, Any]
    opened: float
    wseqs: list[int]
    """WAL seqs of the entries merged into the row; recovery re-reads exactly these."""


@dataclass(slots=True)
class Batch:
    """What one step changed, to write and commit together."""

    appends: dict[str, tuple[int, list[str]]] = field(default_factory=dict)
    redos: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    new_files: set[str] = field(default_factory=set)
    runs: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)
    producers: set[int] = field(default_factory=set)
    loaded: dict[str, dict[str, Any]] = field(default_factory=dict)
    topics: set[tuple[str, str]] = field(default_factory=set)
    now: float = 0.0
    closed_runs: set[str] = field(default_factory=set)
    dropped_producers: set[int] = field(default_factory=set)
    settle: set[str] = field(default_factory=set)
    acks: dict[int, int] = field(default_factory=dict)


class JsonlSink:
    """Writes the ML-Dash local layout from the WAL; see the module docstring for invariants."""

    name = "jsonl"

    def __init__(
        self,
        wal: Wal,
        *,
        merge_window_s: float = 1.0,
        max_open_rows: int = 20_000,
        batch_records: int = 8192,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.wal = wal
        self.merge_window_s = merge_window_s
        self.max_open_rows = max_open_rows
        self.batch_records = batch_records
        self.clock = clock
        self.cond = threading.Condition()
        self.flushed: dict[int, int] = {}
        self.pids: dict[int, int] = {}
        self._track_paths: dict[tuple[str, str], str] = {}
        self._gc_done, self._gc_at = 0, 0.0
        self._drop_next: set[str] = set()
        self.cursor = 0
        self.counters: dict[str, int] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.files: dict[str, dict[str, Any]] = {}
        self.producers: dict[int, dict[str, Any]] = {}
        self.rows: dict[tuple[str, str], dict[float, Row]] = {}
        self.recovered = False

    # ----------------------------------------------------------------- recovery
    def recover(self) -> None:
        """(Re)load committed state, re-apply redo records, truncate uncommitted bytes.

        Called before the first step and after any failed one; it may itself fail (a full
        disk), in which case the caller retries it later and no step runs meanwhile.
        """
        self.recovered = False
        wal = self.wal
        self.cursor = int(wal.get_sink(b"c", 0))  # type: ignore[call-overload]
        self.counters = dict(wal.get_sink(b"g", {}))  # type: ignore[call-overload]
        self.runs = {k[2:].decode(): v for k, v in wal.sink_items(b"r:")}  # type: ignore[misc]
        self.files = {k[2:].decode(): v for k, v in wal.sink_items(b"f:")}  # type: ignore[misc]
        self.producers = {
            int.from_bytes(k[2:], "big"): v for k, v in wal.sink_items(b"p:")  # type: ignore[misc]
        }
        self.rows = self._replay_open_rows()
        redo_keys = []
        for k, v in wal.sink_items(b"x:"):
            pos, data = v  # type: ignore[misc]
            self._apply_redo(k[2:].decode(), pos, data)
            redo_keys.append(k)
        if redo_keys:
            wal.commit({}, redo_keys)
        for path, fs in list(self.files.items()):
            self._truncate_to_committed(path, fs)
            run = self.runs.get(fs["run"])
            if run is not None and path not in run["files"]:
                run["files"].append(path)
        for run in self.runs:
            self._write_derived_run(run, all_files=True)
        self._drop_next = {p for p in self.runs if self._closed(p)}
        self._publish_pids()
        self.recovered = True

    def _replay_open_rows(self) -> dict[tuple[str, str], dict[float, Row]]:
        """Rebuild the open rows from the WAL entries each committed ``t:`` record names."""
        owner: dict[int, tuple[tuple[str, str], float]] = {}
        for k, v in self.wal.sink_items(b"t:"):
            run, topic = k[2:].decode().split("\0", 1)
            stamps, wseqs = v  # type: ignore[misc]
            for ts, seqs in zip(stamps, wseqs):
                for wseq in seqs:
                    owner[wseq] = ((run, topic), ts)
        rows: dict[tuple[str, str], dict[float, Row]] = {}
        now = self.clock()
        for wseq, raw in self.wal.get_records(sorted(owner)):
            key, ts = owner.pop(wseq)
            fields = merge.flatten(unpack_stored(raw)[7][2])
            row = rows.setdefault(key, {}).get(ts)
            if row is None:
                rows[key][ts] = Row(fields, now, [wseq])
            else:
                merge.merge_into(row.fields, fields)
                row.wseqs.append(wseq)
        if owner:
            log.error("%d WAL records of open track rows are gone; those entries are lost", len(owner))
            self._count(None, "corrupt", len(owner))
        return rows

    def _closed(self, path: str) -> bool:
        """A run that is closed, written out, and has no open rows: its state can go."""
        run = self.runs.get(path)
        return run is not None and run["status"] != "running" and not any(k[0] == path for k in self.rows)

    def _truncate_to_committed(self, path: str, fs: dict[str, Any]) -> None:
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            size = 0
        if size > fs["size"]:
            with open(path, "r+b") as f:
                f.truncate(fs["size"])
                os.fsync(f.fileno())
        elif size < fs["size"]:
            log.error("file=%s shrank behind the agent (size=%d, committed=%d); reloading its state", path, size, fs["size"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.files[path] = self._load_file(path, fs["kind"], fs.get("topic"), fs.get("name"), fs["run"])

    def _apply_redo(self, path: str, pos: int, data: bytes) -> None:
        """Rewrite a file's tail from ``pos``; a file removed or cut short behind the agent is left
        to recovery's shrink check instead of being padded with a hole."""
        try:
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            log.error("file=%s vanished before its tail rewrite; left to recovery", path)
            return
        try:
            if os.fstat(fd).st_size < pos:
                log.error("file=%s is shorter than its tail rewrite at %d; left to recovery", path, pos)
                return
            os.ftruncate(fd, pos)
            layout.pwrite_all(fd, data, pos)
            os.fsync(fd)
        finally:
            os.close(fd)

    # -------------------------------------------------------------------- state
    def _load_run(self, root: str, prefix: str, run: str) -> dict[str, Any]:
        exp = layout.read_json(os.path.join(run, "experiment.json")) or {}
        params = layout.read_json(os.path.join(run, "parameters.json")) or {}
        ours = exp.get("dashcar") if isinstance(exp.get("dashcar"), dict) else {}
        return {
            "root": root,
            "prefix": prefix,
            "info": {k: exp.get(k) for k in ("name", "project", "description", "tags", "metadata") if k in exp},
            "created_at": exp.get("created_at") or layout.iso(time.time()),
            "status": "running",
            "reason": None,
            "producers": {},
            "owners": [],
            "counters": dict(ours.get("counters") or {}),
            "params": dict(params.get("data") or {}) if isinstance(params, dict) else {},
            "params_version": int(params.get("version", 0)) if isinstance(params, dict) else 0,
            "params_created": params.get("createdAt") if isinstance(params, dict) else None,
            "files": [],
        }

    def _run(self, root: str, prefix: str, path: str, b: Batch) -> dict[str, Any]:
        st = self.runs.get(path)
        if st is None:
            st = self.runs[path] = self._load_run(root, prefix, path)
            st["files"] = [p for p, fs in self.files.items() if fs["run"] == path]
            for sub in ("logs", "metrics", "files"):
                os.makedirs(os.path.join(path, sub), exist_ok=True)
        b.runs.add(path)
        return st

    def _load_file(self, path: str, kind: str, topic: str | None, name: str | None, run: str) -> dict[str, Any]:
        """State of a file the agent has no record of, read from disk (a torn last line is cut)."""
        n, size = layout.count_lines(path)
        if os.path.exists(path) and os.path.getsize(path) != size:
            with open(path, "r+b") as f:
                f.truncate(size)
        meta = layout.read_json(os.path.join(os.path.dirname(path), "metadata.json")) or {}
        fs: dict[str, Any] = {"kind": kind, "run": run, "size": size, "n": n, "topic": topic, "name": name}
        fs["created"] = meta.get("createdAt") or layout.iso(time.time())
        for key in ("description", "tags", "metadata"):
            fs[key] = meta.get(key)
        if kind == "track":
            fs["columns"] = list(meta.get("columns") or [])
            fs["first_ts"], fs["last_ts"] = layout.first_last_ts(path, size)
            if meta.get("topic") not in (None, topic):
                fs["topic"] = meta["topic"]
        elif kind == "log":
            seq = layout.read_json(os.path.join(os.path.dirname(path), ".log_sequence"))
            fs["n"] = max(n, seq) if isinstance(seq, int) else n
        return fs

    def _file(self, path: str, kind: str, run: str, b: Batch, *, topic: str | None = None, name: str | None = None,
              folder: str = "metrics") -> dict[str, Any]:
        fs = self.files.get(path)
        if fs is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fs = self.files[path] = self._load_file(path, kind, topic, name, run)
            fs["folder"] = folder
            b.loaded[path] = dict(fs)
            self.runs[run]["files"].append(path)
            if fs["size"] == 0:
                b.new_files.add(path)
        b.files.add(path)
        return fs

    def _append(self, b: Batch, path: str, fs: dict[str, Any], line: str) -> None:
        """Queue ``line`` (one or more whole lines) for ``path``, past its current size."""
        op = b.appends.get(path)
        if op is None:
            op = b.appends[path] = (fs["size"], [])
        op[1].append(line)
        fs["size"] += len(line.encode())

    def _count(self, run: dict[str, Any] | None, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n
        if run is not None:
            c = run["counters"]
            c[name] = c.get(name, 0) + n

    # --------------------------------------------------------------- processing
    def step(self, *, settle_all: bool = False) -> bool:
        """Process one batch of WAL records (and due rows); True if anything changed.

        Track entries, nearly all the traffic, skip building frame objects: the WAL holds only
        frames ingest validated (or the agent made), so their fields are used as they are.
        """
        if not self.recovered:
            self.recover()
        records = self.wal.read(self.cursor, self.batch_records)
        b = Batch(now=self.clock())
        unpack = unpack_stored
        for wseq, raw in records:
            try:
                f = unpack(raw)
                if f[1] == _TRACK:
                    self._apply(Kind.TRACK, f[2], f[3], f[4], f[5], f[6], f[7], wseq, b)
                    continue
                frame = frame_from(f, internal=True)
            except (ProtocolError, ValueError, TypeError, IndexError) as exc:
                log.error("wal_seq=%d undecodable record skipped: %s", wseq, exc)
                self._count(None, "corrupt")
                continue
            self._apply(frame.kind, frame.sid, frame.pid, frame.root, frame.prefix, frame.seq, frame.payload, wseq, b)
        if records:
            self.cursor = records[-1][0]
        self._settle_due(b, settle_all)
        if not records and not b.topics and not b.appends and not b.redos and not self._drop_next:
            return False
        self._write_and_commit(b)
        return True

    def _apply(self, kind: Kind, sid: int, pid: int, root: str, prefix: str, seq: int, p: Any, wseq: int, b: Batch) -> None:
        """Apply one frame; ``p`` is its payload object, or for a track entry its raw ``[topic, ts, fields]``."""
        ps = self.producers.get(sid)
        if ps is None:
            ps = self.producers[sid] = {"pid": pid, "last": 0, "dropped": 0, "runs": [], "gone": False}
        b.producers.add(sid)
        if kind is Kind.PRODUCER_GONE:
            self._producer_gone(sid, ps, p, b)
            return
        path = run_dir(root, prefix)
        known = self.runs.get(path)
        last = ps["last"]
        if seq <= last:
            self._count(known, "duplicates")
            return
        if seq > last + 1:
            self._count(known, "missing", seq - last - 1)
        ps["last"] = seq
        ps["gone"] = False
        if kind is Kind.FLUSH or kind is Kind.RUN_CLOSE:
            self._count(known, "control_frames")
        if kind is Kind.FLUSH:
            self._reported(ps, known, p.dropped)
            b.settle.update(ps["runs"])
            b.acks[sid] = seq
            return
        if kind is Kind.RUN_CLOSE:
            self._reported(ps, known, p.dropped)
            if known is not None and known["producers"].get(str(sid)) == "open":
                b.runs.add(path)
                known["producers"][str(sid)] = p.status
                if p.reason and sid in known["owners"]:
                    known["reason"] = p.reason
                b.settle.add(path)
                self._maybe_close(path, known, b)
            return
        run = self._run(root, prefix, path, b)
        ps["last_run"] = path
        self._count(run, "frames")
        if run["producers"].get(str(sid)) != "open":
            run["producers"][str(sid)] = "open"
            if path not in ps["runs"]:
                ps["runs"].append(path)
            if run["status"] != "running":
                run["status"], run["reason"], run["closed_at"] = "running", None, None
        if kind is Kind.TRACK:
            self._track(path, run, p[0], p[1], p[2], wseq, b)
        elif kind is Kind.METRIC:
            mpath = os.path.join(layout.series_dir(path, p.folder, p.name), "data.jsonl")
            fs = self._file(mpath, "metric", path, b, name=p.name, folder=p.folder)
            for point in p.points:
                self._append(b, mpath, fs, layout.metric_line(fs["n"], point))
                fs["n"] += 1
            self._count(run, "points", len(p.points))
        elif kind is Kind.LOG:
            lpath = os.path.join(layout.logs_dir(path), "logs.jsonl")
            fs = self._file(lpath, "log", path, b)
            self._append(b, lpath, fs, layout.log_line(fs["n"], p.time, p.level, p.message, p.metadata))
            fs["n"] += 1
            self._count(run, "logs")
        elif kind is Kind.PARAMS:
            run["params"].update(merge.flatten(p.data))
            run["params_version"] += 1
            run["params_dirty"] = True
        elif kind is Kind.RUN_OPEN:
            run["info"].update(p.info)
            if sid not in run["owners"]:
                run["owners"].append(sid)
        elif kind is Kind.META:
            self._meta(path, run, p, b)  # type: ignore[arg-type]

    def _meta(self, path: str, run: dict[str, Any], p: Meta, b: Batch) -> None:
        if p.target == "track":
            fs = self._file(self._track_path(path, p.name), "track", path, b, topic=p.name)  # type: ignore[arg-type]
            if fs["topic"] != p.name:
                self._count(run, "rejected_topic_collision")
                return
        else:
            folder = "metrics" if p.target == "metric" else "tracks"
            mpath = os.path.join(layout.series_dir(path, folder, p.name), "data.jsonl")
            fs = self._file(mpath, "metric", path, b, name=p.name, folder=folder)
        for key in ("description", "tags", "metadata"):
            if key in p.info:
                fs[key] = p.info[key]

    def _reported(self, ps: dict[str, Any], run: dict[str, Any] | None, dropped: int) -> None:
        if dropped > ps["dropped"]:
            self._count(run, "dropped_by_producer", dropped - ps["dropped"])
            ps["dropped"] = dropped

    def _producer_gone(self, sid: int, ps: dict[str, Any], gone: ProducerGone, b: Batch) -> None:
        last_run = self.runs.get(ps.get("last_run") or "")
        if gone.last_sent > ps["last"]:
            self._count(last_run, "lost_in_producer_queue", gone.last_sent - ps["last"])
            ps["last"] = gone.last_sent
        if gone.pending:
            self._count(last_run, "lost_in_producer_queue", gone.pending)
        self._reported(ps, last_run, gone.dropped)
        for path in ps["runs"]:
            run = self.runs.get(path)
            if run is None:
                continue
            b.runs.add(path)
            if run["producers"].get(str(sid)) == "open":
                run["producers"][str(sid)] = "gone"
                self._count(run, "producers_died")
                b.settle.add(path)
                self._maybe_close(path, run, b)
        ps["gone"] = True
        gone = [s for s, p in self.producers.items() if p.get("gone")]
        for old in gone[: max(0, len(gone) - MAX_GONE_PRODUCERS)]:
            del self.producers[old]
            b.dropped_producers.add(old)

    def _maybe_close(self, path: str, run: dict[str, Any], b: Batch) -> None:
        states = run["producers"]
        if any(s == "open" for s in states.values()):
            return
        owners = [str(s) for s in run["owners"]] or list(states)
        worst = "completed"
        for sid in owners:
            s = states.get(sid, "completed")
            s = "crashed" if s == "gone" else s
            if _STATUS_RANK.get(s, 0) > _STATUS_RANK[worst]:
                worst = s
        run["status"] = worst
        if worst == "crashed" and not run["reason"]:
            run["reason"] = "producer process ended without closing the run"
        run["closed_at"] = layout.iso(time.time())

    def _track_path(self, run: str, topic: str) -> str:
        tpath = self._track_paths.get((run, topic))
        if tpath is None:
            tpath = self._track_paths[(run, topic)] = os.path.join(layout.track_dir(run, topic), "data.jsonl")
        return tpath

    def _track(self, path: str, run: dict[str, Any], topic: str, ts: float, fields: dict[str, Any], wseq: int, b: Batch) -> None:
        tpath = self._track_path(path, topic)
        fs = self._file(tpath, "track", path, b, topic=topic)
        if fs["topic"] != topic:
            self._count(run, "rejected_topic_collision")
            if self.counters.get("rejected_topic_collision", 0) == 1:
                log.warning("run=%s topic=%r shares a folder with topic %r; entries refused", path, topic, fs["topic"])
            return
        if type(ts) is not float:
            ts = float(ts)
        flat = merge.flatten(fields)
        key = (path, topic)
        rows = self.rows.get(key)
        if rows is None:
            rows = self.rows[key] = {}
        row = rows.get(ts)
        if row is None:
            rows[ts] = Row(flat, b.now, [wseq])
        else:
            row.wseqs.append(wseq)
            clashes = merge.merge_into(row.fields, flat)
            if clashes:
                self._count(run, "clashes", clashes)
        b.topics.add(key)

    def _settle_due(self, b: Batch, settle_all: bool) -> None:
        over_cap = sum(len(r) for r in self.rows.values()) > self.max_open_rows
        deadline = self.clock() - self.merge_window_s
        for (path, topic), rows in list(self.rows.items()):
            if not rows:
                del self.rows[(path, topic)]
                continue
            if settle_all or over_cap or path in b.settle:
                upto = float("inf")
            else:
                upto = None
                for ts, row in rows.items():
                    if row.opened > deadline:
                        break
                    upto = ts if upto is None or ts > upto else upto
                if upto is None:
                    continue
            self._settle(path, topic, rows, upto, b)
            if not rows:
                del self.rows[(path, topic)]
        for path in list(b.runs):
            run = self.runs.get(path)
            if run is not None and run["status"] != "running" and not any(k[0] == path for k in self.rows):
                b.closed_runs.add(path)

    def _settle(self, path: str, topic: str, rows: dict[float, Row], upto: float, b: Batch) -> None:
        done = sorted(ts for ts in rows if ts <= upto)
        settled = []
        for ts in done:
            settled.append((ts, rows.pop(ts).fields))
        b.topics.add((path, topic))
        run = self.runs[path]
        tpath = self._track_path(path, topic)
        fs = self.files[tpath]
        b.files.add(tpath)
        cols = set(fs["columns"])
        for _, fields in settled:
            cols.update(fields)
        fs["columns"] = sorted(cols)
        if fs["last_ts"] is None or settled[0][0] > fs["last_ts"]:
            line = layout.track_line
            self._append(b, tpath, fs, "".join([line(ts, fields) for ts, fields in settled]))
            fs["n"] += len(settled)
            self._count(run, "rows_written", len(settled))
        else:
            pos, existing = layout.tail_rows(tpath, fs["size"], settled[0][0])
            merged, clashes = merge.merge_rows([*existing, *settled])
            data = "".join(layout.track_line(ts, f) for ts, f in merged).encode()
            b.redos[tpath] = (pos, data)
            fs["size"] = pos + len(data)
            fs["n"] += len(merged) - len(existing)
            self._count(run, "rows_written", len(merged) - len(existing))
            self._count(run, "rewrites")
            if clashes:
                self._count(run, "clashes", clashes)
        fs["first_ts"] = settled[0][0] if fs["first_ts"] is None else min(fs["first_ts"], settled[0][0])
        fs["last_ts"] = settled[-1][0] if fs["last_ts"] is None else max(fs["last_ts"], settled[-1][0])

    # ------------------------------------------------------------ write, commit
    def _write_and_commit(self, b: Batch) -> None:
        if b.loaded:
            # Register files first met in this batch at their size before it, so a crash between
            # writing them and the commit below is truncated away like any uncommitted append.
            self.wal.commit({b"f:" + p.encode(): fs for p, fs in b.loaded.items()}, [])
        try:
            for path, (offset, lines) in b.appends.items():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    layout.pwrite_all(fd, "".join(lines).encode(), offset)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for d in {os.path.dirname(p) for p in b.new_files}:
                layout.fsync_dir(d)
        except OSError as exc:
            raise SinkRetryable(f"writing JSONL failed: {exc}") from exc
        puts: dict[bytes, object] = {b"c": self.cursor, b"g": self.counters}
        deletes: set[bytes] = set()
        dropping = {p for p in self._drop_next if self._closed(p) and p not in b.closed_runs and p not in b.runs}
        self._drop_next.clear()
        for path in dropping:
            deletes.add(b"r:" + path.encode())
            deletes.update(b"f:" + fpath.encode() for fpath in self.runs[path]["files"])
        for path in b.runs:
            if path in self.runs and path not in dropping:
                puts[b"r:" + path.encode()] = self.runs[path]
        for fpath in b.files:
            fs = self.files.get(fpath)
            if fs is not None and fs["run"] not in dropping:
                puts[b"f:" + fpath.encode()] = fs
        for sid in b.producers:
            if sid in self.producers:
                puts[b"p:" + sid.to_bytes(8, "big")] = self.producers[sid]
        for sid in b.dropped_producers:
            deletes.add(b"p:" + sid.to_bytes(8, "big"))
        for key in b.topics:
            rows = self.rows.get(key)
            if rows:
                puts[_topic_key(*key)] = [list(rows), [r.wseqs for r in rows.values()]]
            else:
                deletes.add(_topic_key(*key))
        for fpath, redo in b.redos.items():
            puts[b"x:" + fpath.encode()] = redo
        for k in puts:
            deletes.discard(k)
        self.wal.commit(puts, deletes)
        try:
            if b.redos:
                for fpath, (pos, data) in b.redos.items():
                    self._apply_redo(fpath, pos, data)
                self.wal.commit({}, [b"x:" + p.encode() for p in b.redos])
            for path in b.runs:
                if path in self.runs:
                    self._write_derived_run(path, files=b.files)
        except OSError as exc:
            raise SinkRetryable(f"writing derived files failed: {exc}") from exc
        for path in dropping:
            run = self.runs.pop(path)
            for fpath in run["files"]:
                self.files.pop(fpath, None)
            for ps in self.producers.values():
                if path in ps["runs"]:
                    ps["runs"].remove(path)
        for path in b.closed_runs:
            log.info("run=%s closed status=%s", path, self.runs[path]["status"])
        self._drop_next |= b.closed_runs
        self._publish_pids()
        self._maybe_gc()
        if b.acks:
            with self.cond:
                self.flushed.update(b.acks)
                self.cond.notify_all()

    def _maybe_gc(self) -> None:
        """Drop WAL records this sink has committed past and no open row needs, at most once per ``GC_INTERVAL_S``."""
        now = self.clock()
        due = now - self._gc_at >= GC_INTERVAL_S or (self.cursor - self._gc_done >= GC_RECORDS and now - self._gc_at >= 0.05)
        if not due or self.cursor <= self._gc_done:
            return
        self._gc_at = now
        upto = self.cursor
        for rows in self.rows.values():
            for row in rows.values():
                if row.wseqs[0] <= upto:
                    upto = row.wseqs[0] - 1
        if upto > self._gc_done:
            self.wal.gc(upto)
            self._gc_done = upto

    def _publish_pids(self) -> None:
        self.pids = {sid: ps["pid"] for sid, ps in self.producers.items() if not ps.get("gone")}

    def _write_derived_run(self, path: str, *, files: set[str] | None = None, all_files: bool = False) -> None:
        run = self.runs[path]
        info = run["info"]
        name = run["prefix"].rstrip("/").split("/")[-1]
        exp = {
            "name": info.get("name") or name,
            "project": info.get("project"),
            "description": info.get("description"),
            "tags": info.get("tags") or [],
            "bindrs": [],
            "prefix": run["prefix"],
            "metadata": info.get("metadata"),
            "created_at": run["created_at"],
            "write_protected": False,
            "status": run["status"],
            "dashcar": {
                "status": run["status"],
                "reason": run["reason"],
                "closed_at": run.get("closed_at"),
                "host": info.get("host"),
                "pid": info.get("pid"),
                "argv": info.get("argv"),
                "counters": run["counters"],
            },
        }
        with layout.locked(os.path.join(path, ".experiment.lock")):
            layout.write_atomic(os.path.join(path, "experiment.json"), layout.dumps(exp))
        if run.get("params_dirty") or (all_files and run["params_version"]):
            now = layout.iso(time.time())
            run["params_created"] = run.get("params_created") or now
            doc = {"version": run["params_version"], "data": run["params"], "createdAt": run["params_created"], "updatedAt": now}
            with layout.locked(os.path.join(path, ".parameters.lock")):
                layout.write_atomic(os.path.join(path, "parameters.json"), layout.dumps(doc))
            run["params_dirty"] = False
        for fpath in run["files"]:
            if all_files or (files is not None and fpath in files):
                self._write_derived_file(fpath, self.files[fpath])

    def _write_derived_file(self, path: str, fs: dict[str, Any]) -> None:
        d = os.path.dirname(path)
        now = layout.iso(time.time())
        if fs["kind"] == "metric":
            name = fs["name"]
            ident = ("metricId", f"local-metric-{name}") if fs.get("folder", "metrics") == "metrics" else ("trackId", f"local-track-{name}")
            meta = {
                ident[0]: ident[1], "name": name, "description": fs.get("description"), "tags": fs.get("tags") or [],
                "metadata": fs.get("metadata"), "totalDataPoints": fs["n"], "nextIndex": fs["n"],
                "bufferedDataPoints": fs["n"], "chunkedDataPoints": 0, "createdAt": fs["created"], "updatedAt": now,
            }
            with layout.locked(os.path.join(d, ".metadata.lock")):
                layout.write_atomic(os.path.join(d, "metadata.json"), layout.dumps(meta))
        elif fs["kind"] == "track":
            meta = {
                "trackId": f"local-track-{os.path.basename(d)}", "topic": fs["topic"], "columns": fs["columns"],
                "totalEntries": fs["n"], "firstTimestamp": fs["first_ts"], "lastTimestamp": fs["last_ts"],
                "createdAt": fs["created"], "description": fs.get("description"), "tags": fs.get("tags") or [],
                "metadata": fs.get("metadata"),
            }
            with layout.locked(os.path.join(d, ".metadata.lock")):
                layout.write_atomic(os.path.join(d, "metadata.json"), layout.dumps(meta))
        else:
            with layout.locked(os.path.join(d, ".log_sequence.lock")):
                layout.write_atomic(os.path.join(d, ".log_sequence"), str(fs["n"]))

    # ------------------------------------------------------------------ barrier
    def wait_flushed(self, sid: int, seq: int, timeout_s: float) -> bool:
        """Block until the flush frame ``(sid, seq)`` is written and committed."""
        with self.cond:
            return self.cond.wait_for(lambda: self.flushed.get(sid, 0) >= seq, timeout_s)

    def open_rows(self) -> int:
        """Track rows waiting to settle."""
        return sum(len(r) for r in self.rows.values())

    def status(self) -> dict[str, Any]:
        """Counters and open runs, for ``dashcar status``."""
        return {
            "cursor": self.cursor,
            "open_rows": self.open_rows(),
            "counters": dict(self.counters),
            "runs": {
                p: {"status": r["status"], "producers": dict(r["producers"]), "counters": dict(r["counters"])}
                for p, r in self.runs.items()
            },
        }

