"""The core: WAL records → checked frames → run book and merge → the settled stream, once.

Invariants
- Every frame is checked (``proto.check_record``: promise 7) before it can touch the book,
  a file or another run; a record with a bad frame is refused whole, counted by reason.
- One ``step`` reads a batch of records after ``cursor``, applies them in order, settles
  what is due (``merge.OpenRows``), and commits in one WAL transaction (``Wal.commit_core``):
  the stream batch it produced (``stream``), its new state (cursor, stream seq, counters,
  runs and producers it touched, and per topic the timestamps of its open rows with the WAL
  records that hold their entries), and the deletion of every record no open row needs and
  every stream batch all sinks passed. A crash before that commit leaves no trace of the step.
- Open rows are not copied anywhere: recovery re-reads exactly the records their ``t:``
  entries name and merges those entries again; batches written past the committed stream
  seq are deleted.
- Track entries are grouped per topic within a step; metric points per series and log lines
  per run get their indexes here, in arrival order, so every sink numbers them alike.
- A run closes in the book when its producers have; once none of its rows is open, its final
  ``RunItem`` goes out and the run leaves memory. Its state stays stored (``r:``), so a run
  reopened later continues its indexes; the newest ``MAX_CLOSED_RUNS`` are kept. A run the
  core never met is seeded from its local files, if any (a run ML-Dash or an older agent wrote).
- File frames become ``FileItem``s in frame order. A spool file a batch names is the agent's:
  the batch's ``s:`` entry (committed with it) lists it, and it is deleted once every sink has
  passed that batch; a run's final batch also sweeps its spool dir of files no frame named
  (a producer that died between writing one and sending its frame).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final, Literal

from dashcar.proto import Kind, ProtocolError, check_record, file_dir, frame_count, run_dir, spool_dir

from . import layout, merge
from .book import Book, Producer, Run, iso
from .config import root_allowed
from .errors import WALFull
from .stream import (
    Batch,
    FileItem,
    FlushedItem,
    Item,
    ItemKind,
    LogsItem,
    MetaItem,
    ParamsItem,
    PointsItem,
    RowsItem,
    RunItem,
    Summary,
    summary,
    unpack,
)
from .wal import CORE_SHARE, Wal, key

log = logging.getLogger(__name__)

MAX_CLOSED_RUNS: Final = 10_000
RECENT_BATCHES: Final = 2
RECENT_BYTES: Final = 2 << 20
"""Stream batches kept decoded in memory (at most this many, of this packed size together), so
sinks that keep up never unpack them; decoded, a batch takes several times its packed size."""
READ_SLICE: Final = 64
"""Stored stream batches read at a time when a sink asks for many (``batches``)."""
WARN_INTERVAL_S: Final = 10.0
ROOT_REFUSED: Final = "root"
"""Rejection reason of a frame whose data root the agent's ``data_roots`` does not allow."""

_TRACK: Final = int(Kind.TRACK)
_METRIC: Final = int(Kind.METRIC)
_LOG: Final = int(Kind.LOG)
_PARAMS: Final = int(Kind.PARAMS)
_META: Final = int(Kind.META)
_RUN_OPEN: Final = int(Kind.RUN_OPEN)
_FLUSH: Final = int(Kind.FLUSH)
_RUN_CLOSE: Final = int(Kind.RUN_CLOSE)
_GONE: Final = int(Kind.PRODUCER_GONE)
_FILE_OPS: Final = {int(Kind.FILE_PUT): "put", int(Kind.FILE_COPY): "copy", int(Kind.FILE_UPDATE): "update",
                    int(Kind.FILE_DELETE): "delete"}


def _open_spool(spool: str) -> int:
    """The spool dir ``<run>/files/.incoming``, opened without following a symlink at ``files`` or
    ``.incoming`` (a planted link must not make the agent delete files elsewhere)."""
    files_fd = os.open(os.path.dirname(spool), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        return os.open(os.path.basename(spool), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=files_fd)
    finally:
        os.close(files_fd)


def _unlink(path: str) -> None:
    """Remove a spool file (the entry itself, never what a symlink points to)."""
    try:
        fd = _open_spool(os.path.dirname(path))
    except OSError:
        return
    try:
        os.unlink(os.path.basename(path), dir_fd=fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove spool file %s: %s", path, exc)
    finally:
        os.close(fd)


def _sweep(spool: str, before: float, keep: set[str]) -> None:
    """Remove regular files older than ``before`` from a spool dir (not ``keep``), then the dir if empty."""
    try:
        fd = _open_spool(spool)
    except OSError:
        return
    try:
        for name in os.listdir(fd):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) and st.st_mtime < before and os.path.join(spool, name) not in keep:
                os.unlink(name, dir_fd=fd)
    except OSError as exc:
        log.warning("cannot sweep spool dir %s: %s", spool, exc)
    finally:
        os.close(fd)
    try:
        os.rmdir(spool)
    except OSError:
        pass


def _topic_key(run: str, topic: str) -> bytes:
    return b"t:" + run.encode() + b"\0" + topic.encode()


class _Step:
    """What one step gathered, by kind, before it becomes stream items."""

    __slots__ = ("tracks", "points", "logs", "params", "metas", "files", "opens", "acks", "frames", "runs", "data", "topics")

    def __init__(self) -> None:
        self.tracks: dict[tuple[str, str], list[tuple[float, dict[str, Any], int]] | None] = {}
        self.points: dict[tuple[str, str, str | None], list[dict[str, Any]]] = {}
        self.logs: dict[str, list[list[Any]]] = {}
        self.params: dict[str, dict[str, Any]] = {}
        self.metas: list[MetaItem] = []
        self.files: list[FileItem] = []
        self.opens: set[str] = set()
        self.acks: dict[int, int] = {}
        self.frames = 0
        self.runs: dict[str, int] = {}
        """Frames per run, control frames included (for per-run loss accounting downstream)."""
        self.data: dict[str, int] = {}
        """Data frames per run (the run's ``frames`` counter)."""
        self.topics: set[tuple[str, str]] = set()


class Core:
    """Turns the WAL into the settled stream; see the module docstring."""

    def __init__(
        self,
        wal: Wal,
        *,
        merge_window_s: float = 1.0,
        max_open_rows: int = 20_000,
        batch_records: int = 8192,
        batch_bytes: int = 1 << 20,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sinks_passed: Callable[[], int] | None = None,
        allowed_roots: tuple[str, ...] = (),
    ) -> None:
        self.wal = wal
        self.allowed_roots = allowed_roots
        """Data roots runs may be written under (``data_roots``); empty: any."""
        self._root_ok: dict[str, bool] = {}
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.clock = clock
        self.wall = wall
        self.sinks_passed = sinks_passed
        self.book = Book(self._load_run, self._count_series, wall)
        self.rows = merge.OpenRows(merge_window_s, max_open_rows)
        self.cursor = 0
        self.out_seq = 0
        self.rejected_by: dict[str, int] = {}
        self.closed_order = 0
        self.total_frames = 0
        """Frames in every stream batch made so far (with ``total_bytes``: their packed size)."""
        self.total_bytes = 0
        self.recent: OrderedDict[int, Batch] = OrderedDict()
        self._recent_bytes = 0
        self._low_cache = (0, 0)
        self._subscribers: list[Callable[[Batch], None]] = []
        self.cond = threading.Condition()
        """Notified with every new stream batch."""
        self.recovered = False
        self.full = False
        self._paths: dict[tuple[str, str], str] = {}
        self._warned: dict[str, float] = {}
        self.spools: dict[int, list[list[Any]]] = {}
        self._dropped_upto = (0, 0)
        """The ``(wal_upto, out_upto)`` of the last commit: an idle step deletes only when a horizon moved."""
        """Per stream batch, the spool files it named (``["file", path]``) and the spool dirs of
        runs it closed (``["sweep", dir, time]``): released once every sink has passed it."""

    # ----------------------------------------------------------------- recovery
    def recover(self) -> None:
        """Load the committed state, drop stream batches past it, rebuild the open rows."""
        self.recovered = False
        wal = self.wal
        self.cursor = int(wal.core_get(b"cursor", 0))
        self.out_seq = int(wal.core_get(b"out", 0))
        self.closed_order = int(wal.core_get(b"closed", 0))
        self.total_frames, self.total_bytes = wal.core_get(b"totals", [0, 0])
        dropped = wal.truncate_out(self.out_seq)
        if dropped:
            log.info("dropped %d stream batches written after the last core commit", dropped)
        self.recent.clear()
        self._recent_bytes = 0
        book = Book(self._load_run, self._count_series, self.wall)
        book.counters = dict(wal.core_get(b"counters", {}))
        self.rejected_by = dict(wal.core_get(b"rejected", {}))
        book.producers = {int.from_bytes(k[2:], "big"): Producer.from_state(v) for k, v in wal.core_items(b"p:")}
        refs = wal.core_items(b"t:")
        needed = {k[2:].decode().split("\0", 1)[0] for k, _ in refs}
        for k, v in wal.core_items(b"r:"):
            path = k[2:].decode()
            if v["status"] == "running" or path in needed:
                book.runs[path] = Run.from_state(path, v)
        self.book = book
        self.rows = merge.OpenRows(self.rows.window_s, self.rows.max_rows)
        self.spools = {int.from_bytes(k[2:], "big"): v for k, v in wal.core_items(b"s:")}
        self._replay_open_rows(refs)
        self.recovered = True

    def _replay_open_rows(self, refs: list[tuple[bytes, Any]]) -> None:
        """Merge again the entries of every open row, from exactly the records that hold them."""
        wanted: dict[int, set[tuple[str, str, float]]] = {}
        rows: list[tuple[tuple[str, str], float, list[int]]] = []
        for k, (stamps, wseqs) in refs:
            run, topic = k[2:].decode().split("\0", 1)
            for ts, seqs in zip(stamps, wseqs, strict=True):
                rows.append(((run, topic), ts, seqs))
                for wseq in seqs:
                    wanted.setdefault(wseq, set()).add((run, topic, ts))
        merged = self._merge_entries(wanted)
        now = self.clock()
        for tkey, ts, seqs in rows:
            fields = merged.get((tkey[0], tkey[1], ts))
            if fields is not None:
                self.rows.restore(tkey, ts, fields, seqs, now)

    def _merge_entries(self, wanted: dict[int, set[tuple[str, str, float]]]) -> dict[tuple[str, str, float], dict[str, Any]]:
        """The merged fields of rows ``(run, topic, ts)``, from the WAL records that hold their entries.

        ``wanted`` maps a record to the rows it holds entries of; entries merge in WAL order, as
        they did when they came. Records that are gone are counted as ``corrupt``.
        """
        out: dict[tuple[str, str, float], dict[str, Any]] = {}
        for wseq, raw in self.wal.get_records(sorted(wanted)):
            keys = wanted.pop(wseq)
            try:
                frames = check_record(raw)
            except ProtocolError:
                continue
            for f in frames:
                if f[1] != _TRACK:
                    continue
                topic, ts, fields = f[7]
                k = (self._run_path(f[4], f[5]), topic, float(ts))
                if k in keys:
                    row = out.get(k)
                    if row is None:
                        out[k] = merge.flatten(fields)
                    else:
                        merge.merge_into(row, merge.flatten(fields))
        if wanted:
            log.error("%d WAL records of track rows are gone; their entries are lost", len(wanted))
            self.book.count(None, "corrupt", len(wanted))
        return out

    def materialize(self, batch: Batch) -> Batch:
        """A stored batch with its rows merged again from the WAL records its items name."""
        todo = [i for i in batch.items if isinstance(i, RowsItem) and i.rows is None]
        if not todo:
            return batch
        wanted: dict[int, set[tuple[str, str, float]]] = {}
        for item in todo:
            for ts, refs in zip(item.stamps, item.refs, strict=True):
                for wseq in refs:
                    wanted.setdefault(wseq, set()).add((item.run, item.topic, ts))
        merged = self._merge_entries(wanted)
        items = [
            i._replace(rows=[merged.get((i.run, i.topic, ts), {}) for ts in i.stamps])
            if isinstance(i, RowsItem) and i.rows is None else i
            for i in batch.items
        ]
        return batch._replace(items=items)

    # -------------------------------------------------------------------- runs
    def _load_run(self, root: str, prefix: str, path: str) -> Run:
        stored = self.wal.core_get(b"r:" + path.encode())
        if stored is not None:
            run = Run.from_state(path, stored)
            run.producers = {}
            return run
        seed = layout.read_run(path)
        return Run(
            path, root, prefix, info=seed.info, created_at=seed.created_at or iso(self.wall()), counters=seed.counters,
            params=seed.params, params_version=seed.params_version, params_created=seed.params_created,
            log_seq=seed.log_seq,
        )

    def _closed_run(self, path: str) -> Run | None:
        """A closed run back in memory (a barrier or close after its end still counts for it), or None
        if the core never met it: a control frame alone opens no run."""
        stored = self.wal.core_get(b"r:" + path.encode())
        if stored is None:
            return None
        run = self.book.runs[path] = Run.from_state(path, stored)
        self.book.dirty_runs.add(path)
        return run

    def _count_series(self, run: Run, folder: str, name: str | None) -> int:
        return layout.count_lines(os.path.join(layout.series_dir(run.path, folder, name), "data.jsonl"))[0]

    def _run_path(self, root: str, prefix: str) -> str:
        path = self._paths.get((root, prefix))
        if path is None:
            path = run_dir(root, prefix)
            if len(self._paths) < 65_536:
                self._paths[(root, prefix)] = path
        return path

    def _warn(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_INTERVAL_S) >= WARN_INTERVAL_S:
            self._warned[key] = now
            log.warning(msg, *args)

    # --------------------------------------------------------------------- step
    def step(self, *, settle_all: bool = False) -> Batch | None:
        """Process one batch of records and what is due; the stream batch made, if any.

        Returns None, with nothing committed, when there was nothing to do or the WAL is too
        full for another stream batch (``full`` is then set; sinks must catch up first).
        """
        if not self.recovered:
            self.recover()
        room = int(self.wal.max_bytes * CORE_SHARE) - self.wal.used_bytes()
        if room <= 0:
            self.full = True
            self._collect_garbage()
            return None
        self.full = False
        records = self.wal.read(self.cursor, self.batch_records, min(self.batch_bytes, room // 4))
        s = _Step()
        for wseq, raw in records:
            try:
                frames = check_record(raw)
            except ProtocolError as exc:
                n = frame_count(raw) or 1
                self.rejected_by[exc.reason] = self.rejected_by.get(exc.reason, 0) + n
                self.book.count(None, "rejected", n)
                s.frames += n
                self._warn("reject:" + exc.reason, "wal_seq=%d frame rejected reason=%s detail=%s", wseq, exc.reason, exc)
                continue
            if self.allowed_roots and not self._roots_allowed(frames):
                n = len(frames)
                self.rejected_by[ROOT_REFUSED] = self.rejected_by.get(ROOT_REFUSED, 0) + n
                self.book.count(None, "rejected", n)
                s.frames += n
                self._warn("reject:root", "wal_seq=%d frame rejected reason=root root=%s allowed=%s", wseq,
                           next((f[4] for f in frames if not self._root_ok.get(f[4], True)), "?"), ",".join(self.allowed_roots))
                continue
            for f in frames:
                self._apply(f, wseq, s)
        if records:
            self.cursor = records[-1][0]
        book = self.book
        now = self.clock()
        for tkey, entries in s.tracks.items():
            if entries:
                clashes = self.rows.add(tkey, entries, now)
                if clashes:
                    book.count(book.runs[tkey[0]], "clashes", clashes)
        rows_items = self._settle(s, settle_all)
        if not records and not rows_items and not s.acks and not book.dirty_runs:
            # Idle: still drop what the sinks passed since the last commit. Ingest refuses appends
            # near the cap, so with nothing arriving no other step would ever free those pages.
            # Only the sinks moving on can move either horizon here (nothing was read or settled), and
            # the WAL's horizon (over the open rows) is the costly one: it is computed only then.
            out_upto = self._out_upto()
            spools_due = bool(self.spools) and min(self.spools) <= out_upto
            if out_upto != self._dropped_upto[1] or spools_due:
                upto = (self._wal_upto(), out_upto)
                release = self._release_spools() if spools_due else []
                self.wal.commit_core(None, {}, release, wal_upto=upto[0], out_upto=out_upto)
                self._dropped_upto = upto
            return None
        return self._emit(s, rows_items)

    def _roots_allowed(self, frames: list[list[Any]]) -> bool:
        """True if every producer frame of a record names an allowed data root (cached per root)."""
        cache = self._root_ok
        for f in frames:
            if f[1] >= _GONE:
                continue
            root = f[4]
            ok = cache.get(root)
            if ok is None:
                ok = root_allowed(root, self.allowed_roots)
                if len(cache) < 65536:
                    cache[root] = ok
            if not ok:
                return False
        return True

    def _apply(self, f: list[Any], wseq: int, s: _Step) -> None:
        """Apply one checked frame ``[v, kind, sid, pid, root, prefix, seq, payload]``."""
        _, kind, sid, pid, root, prefix, seq, p = f
        book = self.book
        producer = book.producers.get(sid)
        if producer is None:
            producer = book.producer(sid, pid)
        else:
            book.dirty_producers.add(sid)
        s.frames += 1
        if kind == _GONE:
            book.producer_gone(sid, *p) if len(p) == 3 else book.producer_gone(sid, p[0], p[1], 0)
            return
        path = self._paths.get((root, prefix)) or self._run_path(root, prefix)
        s.runs[path] = s.runs.get(path, 0) + 1
        if kind in (_FLUSH, _RUN_CLOSE):
            known = book.runs.get(path) or self._closed_run(path)
            if not book.admit(producer, seq, known):
                return
            book.count(known, "control_frames")
            if kind == _FLUSH:
                book.flush(producer, known, p[0])
                s.acks[sid] = seq
            else:
                book.close_run(sid, producer, known, p[0], p[1], p[2])
            return
        run = book.runs.get(path)
        if run is None:
            run = book.run(root, prefix, path)
        else:
            book.dirty_runs.add(path)
        admitted = book.admit(producer, seq, run)
        if not admitted:
            return
        book.attach(producer, sid, run, admitted)
        s.data[path] = s.data.get(path, 0) + 1
        if kind == _TRACK:
            topic, ts, fields = p
            tkey = (path, topic)
            entries: list[tuple[float, dict[str, Any], int]] | Literal[False] | None = s.tracks.get(tkey, False)
            if entries is False:
                entries = s.tracks[tkey] = [] if book.topic_allowed(run, topic) else None
            elif entries is None:
                book.count(run, "rejected_topic_collision")
            if entries is not None:
                entries.append((ts if type(ts) is float else float(ts), merge.flatten(fields), wseq))
        elif kind == _METRIC:
            name, points, folder = p
            s.points.setdefault((path, folder, name), []).extend(points)
        elif kind == _LOG:
            s.logs.setdefault(path, []).append([p[2], p[1], p[0], p[3]])
        elif kind == _PARAMS:
            changed = book.set_params(run, p)
            s.params.setdefault(path, {}).update(changed)
        elif kind == _META:
            target, name, info = p
            if target == "track" and not book.topic_allowed(run, name):
                return
            s.metas.append(MetaItem(ItemKind.META, path, target, name, info))
        elif kind == _RUN_OPEN:
            book.open_run(sid, run, p)
            s.opens.add(path)
        elif kind in _FILE_OPS:
            s.files.append(self._file_item(path, _FILE_OPS[kind], p, pid))
            book.count(run, "files")

    @staticmethod
    def _file_item(run: str, op: str, p: list[Any], pid: int) -> FileItem:
        """The stream item of a checked file frame; a spool name becomes its path in the run's spool dir."""
        if op == "put":
            file_id, path, filename, source, meta = p
            if source[0] == "spool":
                source = ["spool", os.path.join(spool_dir(run), source[1])]
            return FileItem(ItemKind.FILE, run, op, file_id, file_dir(path), filename, source, meta, pid)
        if op == "copy":
            file_id, source_id, path, filename, meta = p
            return FileItem(ItemKind.FILE, run, op, file_id, file_dir(path), filename, ["file", source_id], meta, pid)
        if op == "update":
            return FileItem(ItemKind.FILE, run, op, p[0], "", "", [], {**p[1], "time": p[2]}, pid)
        return FileItem(ItemKind.FILE, run, op, p[0], "", "", [], {"time": p[1]}, pid)

    def _settle(self, s: _Step, settle_all: bool) -> list[RowsItem]:
        """Settle every due topic; the rows items, in topic order."""
        book = self.book
        items: list[RowsItem] = []
        for tkey, upto in self.rows.due(self.clock(), book.settle, settle_all):
            stamps, rows, refs = self.rows.settle(tkey, upto)
            s.topics.add(tkey)
            if not stamps:
                continue
            path, topic = tkey
            run = book.runs[path]
            last = run.topics.get(topic)
            late = last is not None and stamps[0] <= last
            if last is None or stamps[-1] > last:
                run.topics[topic] = stamps[-1]
            book.count(run, "rows", len(stamps))
            items.append(RowsItem(ItemKind.ROWS, path, topic, stamps, refs, late, rows))
        s.topics.update(s.tracks)
        book.settle.clear()
        return items

    def _emit(self, s: _Step, rows_items: list[RowsItem]) -> Batch | None:
        """Build the step's stream batch and commit it with the state behind it."""
        book = self.book
        items: list[Item] = []
        body: list[Item] = []
        run: Run | None
        for path, changed in s.params.items():
            run = book.runs[path]
            body.append(ParamsItem(ItemKind.PARAMS, path, run.params_version, dict(run.params), run.params_created, changed))
        body.extend(s.metas)
        for (path, folder, name), points in s.points.items():
            run = book.runs[path]
            first = book.next_indexes(run, folder, name, len(points))
            book.count(run, "points", len(points))
            body.append(PointsItem(ItemKind.POINTS, path, folder, name, first, points))
        for path, entries in s.logs.items():
            run = book.runs[path]
            first = book.next_log_seqs(run, len(entries))
            book.count(run, "logs", len(entries))
            body.append(LogsItem(ItemKind.LOGS, path, first, entries))
        body.extend(s.files)
        for path, n in s.data.items():
            book.count(book.runs[path], "frames", n)
        final: list[str] = []
        for path in sorted(book.dirty_runs):
            run = book.runs.get(path)
            if run is None:
                continue
            done = book.closed(run, self.rows.has_run(path))
            if done:
                final.append(path)
                log.info("run=%s closed status=%s", path, run.status)
            items.append(RunItem(
                ItemKind.RUN, path, run.root, run.prefix, run.info, run.created_at, run.status, run.reason, run.closed_at,
                dict(run.counters), done, run.local, run.dash_url, run.token,
            ))
        items.extend(body)
        items.extend(rows_items)
        items.extend(FlushedItem(ItemKind.FLUSHED, sid, seq) for sid, seq in s.acks.items())
        low = self.cursor + 1
        open_low = self.rows.min_wseq()
        if open_low is not None:
            low = min(low, open_low)
        for r in rows_items:
            for refs in r.refs:
                if refs[0] < low:
                    low = refs[0]
        self.out_seq += 1
        batch = Batch(self.out_seq, self.wall(), s.frames, self.total_frames, self.total_bytes, low, s.runs, final, items, 0)
        packed = batch.pack()
        batch = batch._replace(size=len(packed))
        self.total_frames += s.frames
        self.total_bytes += len(packed)
        try:
            self._commit(batch, packed, s, final)
        except WALFull:
            # No room for this step: forget it (it is done again later), make room, and wait
            # for the sinks; the state in memory goes back to the committed one first.
            log.warning("WAL full: the core waits for its sinks (stream batch %d is done again later)", self.out_seq)
            self.recover()
            self.full = True
            self._collect_garbage()
            return None
        book.forget_runs(final)
        self._remember(batch)
        return batch

    def _commit(self, batch: Batch, packed: bytes, s: _Step, final: list[str]) -> None:
        book = self.book
        puts: dict[bytes, object] = {
            b"cursor": self.cursor, b"out": self.out_seq, b"counters": book.counters, b"rejected": self.rejected_by,
            b"totals": [self.total_frames, self.total_bytes],
        }
        deletes: set[bytes] = set()
        for path in book.dirty_runs:
            run = book.runs.get(path)
            if run is not None:
                puts[b"r:" + path.encode()] = run.to_state()
        for path in final:
            self.closed_order += 1
            puts[b"z:" + key(self.closed_order)] = path
            old = self.closed_order - MAX_CLOSED_RUNS
            if old > 0:
                deletes.add(b"z:" + key(old))
        puts[b"closed"] = self.closed_order
        for sid in book.dirty_producers:
            p = book.producers.get(sid)
            if p is not None:
                puts[b"p:" + sid.to_bytes(8, "big")] = p.to_state()
        for sid in book.forgotten_producers:
            deletes.add(b"p:" + sid.to_bytes(8, "big"))
        for tkey in s.topics:
            refs = self.rows.refs(tkey)
            if refs is None:
                deletes.add(_topic_key(*tkey))
            else:
                puts[_topic_key(*tkey)] = refs
        spools: list[list[Any]] = [["file", f.source[1]] for f in s.files if f.op == "put" and f.source[0] == "spool"]
        spools += [["sweep", spool_dir(path), self.wall()] for path in final]
        if spools:
            self.spools[batch.seq] = spools
            puts[b"s:" + key(batch.seq)] = spools
        if self.spools and min(self.spools) <= self._out_upto():
            deletes.update(self._release_spools())
        evicted = self._evicted_runs(deletes)
        deletes.update(b"r:" + p.encode() for p in evicted)
        upto = (self._wal_upto(batch), self._out_upto())
        self.wal.commit_core((batch.seq, packed), puts, deletes, wal_upto=upto[0], out_upto=upto[1])
        self._dropped_upto = upto
        book.dirty_runs.clear()
        book.dirty_producers.clear()
        book.forgotten_producers.clear()

    def _release_spools(self) -> list[bytes]:
        """Delete the spool files of every batch all sinks passed; the ``s:`` keys to delete.

        A sweep removes the files of a closed run's spool dir that no batch still waiting
        names and that are older than the run's end (a file the run, reopened, wrote since
        is kept), then the dir itself if it is empty. Files only, never a directory's content.
        """
        passed = self._out_upto()
        done = sorted(seq for seq in self.spools if seq <= passed)
        waiting = {e[1] for seq, es in self.spools.items() if seq > passed for e in es if e[0] == "file"}
        for seq in done:
            for entry in self.spools.pop(seq):
                if entry[0] == "file":
                    _unlink(entry[1])
                else:
                    _sweep(entry[1], entry[2], waiting)
        return [b"s:" + key(seq) for seq in done]

    def _evicted_runs(self, deletes: set[bytes]) -> list[str]:
        """Closed runs past the newest ``MAX_CLOSED_RUNS`` whose ``z:`` entry goes now."""
        out: list[str] = []
        for k in deletes:
            if k.startswith(b"z:"):
                path = self.wal.core_get(k)
                if isinstance(path, str) and path not in self.book.runs:
                    out.append(path)
        return out

    def _out_upto(self) -> int:
        return self.out_seq if self.sinks_passed is None else min(self.out_seq, self.sinks_passed())

    def _wal_upto(self, writing: Batch | None = None) -> int:
        """The last WAL record neither the state in memory nor a batch some sink has yet to pass needs.

        ``writing`` is the batch about to be committed with the state (not in the store yet).
        """
        upto = self.cursor
        low = self.rows.min_wseq()
        if low is not None:
            upto = min(upto, low - 1)
        passed = self._out_upto()
        if passed < self.out_seq:
            upto = min(upto, self._low_of(passed + 1, writing) - 1)
        return max(0, upto)

    def _low_of(self, seq: int, writing: Batch | None = None) -> int:
        """``low`` of stream batch ``seq`` (which must exist, or be ``writing``)."""
        if writing is not None and writing.seq == seq:
            return writing.low
        b = self.recent.get(seq)
        if b is not None:
            return b.low
        if self._low_cache[0] != seq:
            heads = self.summaries(seq - 1, 1)
            self._low_cache = (seq, heads[0].low if heads else 0)
        return self._low_cache[1]

    def _collect_garbage(self) -> None:
        """Drop what the committed state no longer needs, alone in a transaction: room for the next step.

        Only called while the state in memory is the committed one (before a step, or after
        ``recover``)."""
        upto = (self._wal_upto(), self._out_upto())
        self.wal.commit_core(None, {}, [], wal_upto=upto[0], out_upto=upto[1])
        self._dropped_upto = upto

    def subscribe(self, keep: Callable[[Batch], None]) -> None:
        """Have ``keep`` called with every new batch, on the core's thread (a runner that holds
        batches keeps them decoded instead of reading them back later)."""
        self._subscribers.append(keep)

    def _remember(self, batch: Batch) -> None:
        for keep in self._subscribers:
            keep(batch)
        with self.cond:
            self.recent[batch.seq] = batch
            self._recent_bytes += batch.size
            while len(self.recent) > RECENT_BATCHES or (len(self.recent) > 1 and self._recent_bytes > RECENT_BYTES):
                self._recent_bytes -= self.recent.popitem(last=False)[1].size
            self.cond.notify_all()

    # ------------------------------------------------------------------ readers
    def batches(self, after: int, limit: int, max_frames: int = 1 << 62, *, memory_only: bool = False) -> list[Batch]:
        """Stream batches after ``after``: at most ``limit``, and no more frames than ``max_frames``
        unless the first alone has more. Batches still in memory are not read or decoded again;
        with ``memory_only``, only those (up to the first that is not)."""
        out: list[Batch] = []
        frames = 0
        seq = after + 1
        while len(out) < limit and seq <= self.out_seq:
            b = self.recent.get(seq)
            if b is None:
                break
            if out and frames + b.frames > max_frames:
                return out
            out.append(b)
            frames += b.frames
            seq += 1
        while not memory_only and len(out) < limit and seq <= self.out_seq:
            # In slices: a sink that gathers many batches must not read far past its frame limit.
            chunk = self.wal.read_out(seq - 1, min(READ_SLICE, limit - len(out)))
            if not chunk:
                break
            for s, raw in chunk:
                hit = self.recent.get(s)
                b = hit if hit is not None else unpack(s, raw)
                if out and frames + b.frames > max_frames:
                    return out
                out.append(b if hit is not None else self.materialize(b))
                frames += b.frames
                seq = s + 1
        return out

    def summaries(self, after: int, limit: int) -> list[Summary]:
        """Heads of the stream batches after ``after``, without decoding their items."""
        out: list[Summary] = []
        for seq, raw in self.wal.read_out(after, limit):
            b = self.recent.get(seq)
            out.append(Summary(*b[:8], b.size) if b is not None else summary(seq, raw))
        return out

    def open_rows(self) -> int:
        """Track rows waiting to settle."""
        return self.rows.count

    def status(self) -> dict[str, Any]:
        """The core's figures for ``dashcar status``."""
        book = self.book
        return {
            "cursor": self.cursor,
            "stream_seq": self.out_seq,
            "open_rows": self.rows.count,
            "full": self.full,
            "counters": dict(book.counters),
            "rejected_by": dict(self.rejected_by),
            "runs": {
                p: {"status": r.status, "producers": {str(k): v for k, v in r.producers.items()}, "counters": dict(r.counters),
                    "created_at": r.created_at, "pids": sorted({pr.pid for k in r.producers if (pr := book.producers.get(k))}),
                    "root": r.root, "prefix": r.prefix}
                for p, r in list(book.runs.items())
            },
        }

