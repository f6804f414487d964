"""The JSONL sink: the settled stream → the ML-Dash local layout, exactly once across crashes.

Invariants
- Everything the sink knows is in its state namespace, committed by the runner with its
  cursor: per file its committed size, line count and what ``metadata.json`` says; per run
  what ``experiment.json`` and ``parameters.json`` say; and pending tail rewrites.
- While a send runs, each touched file has one overlay ``(pos, bytes)``: the file's content
  from ``pos`` on, as it will be. An overlay that starts at or past the committed size is an
  append: it is written and fsynced before the commit, and recovery truncates it away if the
  commit never came. One that starts earlier rewrites the file's tail (a late row merged into
  rows already written): it is committed first as a redo record ``x:`` and applied after the
  commit; recovery re-applies any redo it finds (idempotent), then truncates the rest. A
  redo record is deleted by the next commit, before anything can be appended after it.
- Track files stay sorted with one line per timestamp: rows arrive settled, and a late row
  is merged into the tail it belongs to.
- ``experiment.json``, ``parameters.json``, ``metadata.json`` and ``.log_sequence`` are
  derived from the committed state, replaced atomically after each commit and on recovery.
- A run's state is dropped one commit after its final ``RunItem``, so a crash in between
  rewrites its final files on recovery instead of leaving them stale.
- Files (``FileItem``): the bytes land durably while the send runs, the index changes of
  the send are applied once per run before the commit, under ML-Dash's lock, idempotent by
  id (see ``agent/files.py`` for the order). Before an entry is replaced (ML-Dash's
  overwrite), ``o:<run>\0<old id>`` is committed with the old id directory: recovery removes
  that directory, and a replayed put of an id that was replaced is skipped (the index no
  longer holds it, and putting it again would undo the later file). These keys go with the
  run's state. A file whose bytes could not be had is counted in the run's counters
  (``files_lost``, ``files_lost_<reason>``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dashcar.proto import stored_file_path

from .. import files, layout, merge
from ..book import iso
from ..errors import SinkRetryable
from ..stream import FileItem, FlushedItem, LogsItem, MetaItem, ParamsItem, PointsItem, RowsItem, RunItem
from . import Rejected, WhenFull

if TYPE_CHECKING:
    from ..config import AgentConfig
    from ..stream import Batch
    from ..wal import SinkState

log = logging.getLogger(__name__)



@dataclass(slots=True)
class _Send:
    """What one send changed: overlays per file, and the runs and files to commit."""

    overlays: dict[str, tuple[int, bytearray]] = field(default_factory=dict)
    loaded: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Files first met in this send, as they were before it."""
    new_files: set[str] = field(default_factory=set)
    runs: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)
    final: set[str] = field(default_factory=set)
    redos: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    file_ops: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    """Per run, the index changes of this send, in order: ``("put", entry)``, ``("update", id, fields)``,
    ``("delete", id, time)``."""
    known: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """Per run, the index entries by id: as on disk at the first file item, plus this send's puts."""


def _replaced_key(run: str, file_id: str) -> bytes:
    return b"o:" + run.encode() + b"\0" + file_id.encode()


class JsonlSink:
    """Writes the ML-Dash local layout; see the module docstring for invariants."""

    name = "jsonl"
    when_full: WhenFull = "block"
    barrier = True

    def __init__(self, cfg: AgentConfig | None = None) -> None:
        self.runs: dict[str, dict[str, Any]] = {}
        self.files: dict[str, dict[str, Any]] = {}
        self.rewrites = 0
        self._send = _Send()
        self._drop_next: set[str] = set()
        self._dropping: set[str] = set()
        self._remote_only: set[str] = set()
        """Runs that keep no local files (every batch names them in its ``RunItem``)."""
        self._applied: list[str] = []
        self._paths: dict[tuple[str, str], str] = {}
        self.files_stored = 0
        self.files_lost = 0
        self._state: SinkState | None = None

    # ----------------------------------------------------------------- recovery
    def open(self, state: SinkState) -> None:
        """Load committed state, re-apply redo records, truncate uncommitted bytes, rewrite derived files."""
        self.runs = {k[2:].decode(): v for k, v in state.items(b"r:")}
        self.files = {k[2:].decode(): v for k, v in state.items(b"f:")}
        self._send = _Send()
        self._applied = []
        self._dropping = set()
        redos = state.items(b"x:")
        for k, (pos, data) in redos:
            self._apply_redo(k[2:].decode(), pos, data)
        for path, fs in list(self.files.items()):
            self._truncate_to_committed(path, fs)
        for k, d in state.items(b"o:"):
            self._finish_removal(d, k[2:].decode().split("\0", 1)[0])
        self._state = state
        if redos:
            for k, _ in redos:
                state.delete(k)
            state.commit()
        for run in list(self.runs):
            self._write_derived_run(run, all_files=True)
        self._drop_next = {p for p, r in self.runs.items() if r.get("final")}

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
            fresh = self._load_file(path, fs["kind"], fs["run"], fs.get("topic"), fs.get("name"))
            fresh["folder"] = fs.get("folder", "metrics")
            self.files[path] = fresh

    @staticmethod
    def _finish_removal(d: str, run: str) -> None:
        """Remove an overwritten file's id directory unless the index still holds that id (its
        replacement never reached the index: the send is done again)."""
        fid = os.path.basename(d)
        if not any(e.get("id") == fid for e in files.read_index(run)):
            shutil.rmtree(d, ignore_errors=True)

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
    def _run(self, path: str) -> dict[str, Any]:
        st = self.runs.get(path)
        if st is None:
            st = self.runs[path] = {
                "root": "", "prefix": "", "info": {}, "created_at": iso(time.time()), "status": "running", "reason": None,
                "closed_at": None, "counters": {}, "params": None,
                "files": [p for p, f in self.files.items() if f["run"] == path], "final": False,
            }
            for sub in ("logs", "metrics", "files"):
                os.makedirs(os.path.join(path, sub), exist_ok=True)
        self._send.runs.add(path)
        return st

    def _load_file(self, path: str, kind: str, run: str, topic: str | None, name: str | None) -> dict[str, Any]:
        """State of a file the sink has no record of, read from disk (a torn last line is cut)."""
        n, size = layout.count_lines(path)
        if os.path.exists(path) and os.path.getsize(path) != size:
            with open(path, "r+b") as f:
                f.truncate(size)
        meta = layout.read_json(os.path.join(os.path.dirname(path), "metadata.json")) or {}
        fs: dict[str, Any] = {"kind": kind, "run": run, "size": size, "n": n, "topic": topic, "name": name}
        fs["created"] = meta.get("createdAt") or iso(time.time())
        for key in ("description", "tags", "metadata"):
            fs[key] = meta.get(key)
        if kind == "track":
            fs["columns"] = list(meta.get("columns") or [])
            fs["first_ts"], fs["last_ts"] = layout.first_last_ts(path, size)
        elif kind == "log":
            seq = layout.read_json(os.path.join(os.path.dirname(path), ".log_sequence"))
            fs["n"] = max(n, seq) if isinstance(seq, int) else n
        return fs

    def _file(self, path: str, kind: str, run: str, *, topic: str | None = None, name: str | None = None,
              folder: str = "metrics") -> dict[str, Any]:
        fs = self.files.get(path)
        if fs is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fs = self.files[path] = self._load_file(path, kind, run, topic, name)
            fs["folder"] = folder
            self._send.loaded[path] = dict(fs)
            files = self._run(run)["files"]
            if path not in files:
                files.append(path)
            if fs["size"] == 0:
                self._send.new_files.add(path)
        self._send.files.add(path)
        return fs

    def _end(self, path: str, fs: dict[str, Any]) -> int:
        """The file's size once this send's writes land."""
        ov = self._send.overlays.get(path)
        return fs["size"] if ov is None else ov[0] + len(ov[1])

    def _append(self, path: str, fs: dict[str, Any], data: bytes) -> None:
        ov = self._send.overlays.get(path)
        if ov is None:
            self._send.overlays[path] = (fs["size"], bytearray(data))
        else:
            ov[1].extend(data)

    def _read(self, path: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the file as it will be once this send's overlay lands."""
        ov = self._send.overlays.get(path)
        pos = ov[0] if ov is not None else end
        out = b""
        if start < pos:
            with open(path, "rb") as f:
                f.seek(start)
                out = f.read(min(end, pos) - start)
        if ov is not None and end > pos:
            out += bytes(ov[1][max(0, start - pos): end - pos])
        return out

    # -------------------------------------------------------------------- send
    def send(self, batches: list[Batch], state: SinkState) -> list[Rejected]:
        """Apply every item to files (appends written and fsynced), and stage the state to commit."""
        self._send = _Send()
        self._state = state
        remote_only = self._remote_only
        for batch in batches:
            for item in batch.items:
                if isinstance(item, RunItem):
                    if not item.local:
                        remote_only.add(item.run)
                        continue
                    remote_only.discard(item.run)
                    self._run_item(item)
                elif isinstance(item, FlushedItem) or item.run in remote_only:
                    continue
                elif isinstance(item, RowsItem):
                    self._rows(item)
                elif isinstance(item, PointsItem):
                    self._points(item)
                elif isinstance(item, LogsItem):
                    self._logs(item)
                elif isinstance(item, ParamsItem):
                    self._params(item)
                elif isinstance(item, MetaItem):
                    self._meta(item)
                elif isinstance(item, FileItem):
                    self._file_item(item)
        for run in self._send.final:
            if self.runs[run].get("pending_copies"):
                self._lose_pending_copies(run)
        self._write(state)
        return []

    def _run_item(self, item: RunItem) -> None:
        st = self._run(item.run)
        st.update(root=item.root, prefix=item.prefix, info=item.info, created_at=item.created_at, status=item.status,
                  reason=item.reason, closed_at=item.closed_at, counters=item.counters, final=item.final)
        if item.final:
            self._send.final.add(item.run)
        else:
            self._send.final.discard(item.run)
            self._drop_next.discard(item.run)

    def _params(self, item: ParamsItem) -> None:
        st = self._run(item.run)
        st["params"] = {"version": item.version, "data": item.data, "createdAt": item.created_at}
        st["params_dirty"] = True

    def _meta(self, item: MetaItem) -> None:
        if item.target == "track":
            fs = self._file(self._track_path(item.run, item.name or ""), "track", item.run, topic=item.name)
        else:
            folder = "metrics" if item.target == "metric" else "tracks"
            mpath = os.path.join(layout.series_dir(item.run, folder, item.name), "data.jsonl")
            fs = self._file(mpath, "metric", item.run, name=item.name, folder=folder)
        for key in ("description", "tags", "metadata"):
            if key in item.info:
                fs[key] = item.info[key]

    def _points(self, item: PointsItem) -> None:
        mpath = os.path.join(layout.series_dir(item.run, item.folder, item.name), "data.jsonl")
        fs = self._file(mpath, "metric", item.run, name=item.name, folder=item.folder)
        line = layout.metric_line
        self._append(mpath, fs, b"".join([line(i, p) for i, p in enumerate(item.points, item.first_index)]))
        fs["n"] += len(item.points)

    def _logs(self, item: LogsItem) -> None:
        lpath = os.path.join(layout.logs_dir(item.run), "logs.jsonl")
        fs = self._file(lpath, "log", item.run)
        line = layout.log_line
        self._append(lpath, fs, b"".join([line(i, e[0], e[1], e[2], e[3]) for i, e in enumerate(item.entries, item.first_seq)]))
        fs["n"] = max(fs["n"] + len(item.entries), item.first_seq + len(item.entries))

    # -------------------------------------------------------------------- files
    def _count_file(self, run: str, name: str, n: int = 1) -> None:
        c = self.runs[run].setdefault("file_counters", {})
        c[name] = c.get(name, 0) + n

    def _known(self, run: str) -> dict[str, dict[str, Any]]:
        known = self._send.known.get(run)
        if known is None:
            known = self._send.known[run] = {e["id"]: e for e in files.read_index(run) if isinstance(e.get("id"), str)}
        return known

    def _file_item(self, item: FileItem) -> None:
        """Land a put's or copy's bytes now (durably); queue every index change for ``_write``."""
        self._run(item.run)
        ops = self._send.file_ops.setdefault(item.run, [])
        if item.op == "update":
            ops.append(("update", item.id, item.meta))
            return
        if item.op == "delete":
            ops.append(("delete", item.id, item.meta["time"]))
            return
        known = self._known(item.run)
        if item.id in known or self._replaced(item.run, item.id):
            self._count_file(item.run, "files_stored")
            return
        dest = stored_file_path(item.run, item.path, item.id, item.filename)
        try:
            if os.path.exists(dest):
                stored = files.hash_file(dest)
            elif item.op == "copy":
                src = known.get(item.source[1])
                if src is None:
                    # Its put may still come: a frame re-sent after an agent restart lands after later ones.
                    self.runs[item.run].setdefault("pending_copies", []).append(list(item))
                    return
                if src.get("deletedAt") is not None:
                    raise files.FileLost("no_source", f"file {item.source[1]} to duplicate was deleted")
                stored = files.store_copy(os.path.join(files.id_dir(item.run, src["path"], src["id"]), src["filename"]), dest)
            else:
                stored = files.store_put(item.source, dest, item.meta.get("size"), item.pid)
        except files.FileLost as lost:
            try:
                os.rmdir(os.path.dirname(dest))
            except OSError:
                pass
            self._count_file(item.run, "files_lost")
            self._count_file(item.run, "files_lost_" + lost.reason)
            self.files_lost += 1
            log.warning("run=%s file=%s/%s id=%s lost reason=%s", item.run, item.path, item.filename, item.id, lost)
            return
        except OSError as exc:
            raise SinkRetryable(f"storing file {dest} failed: {exc}") from exc
        if stored.changed:
            self._count_file(item.run, "files_changed_after_call")
            log.warning("run=%s file=%s changed between the call and its copy; stored what was read", item.run, dest)
        st = self.runs[item.run]
        exp_id = files.experiment_id(st["prefix"], st["info"].get("project"))
        entry = files.new_entry(item.id, exp_id, item.path, item.filename, item.meta, stored)
        known[item.id] = entry
        ops.append(("put", entry))
        self._count_file(item.run, "files_stored")
        self.files_stored += 1
        st = self.runs[item.run]
        waiting = [p for p in st.get("pending_copies", ()) if p[6][1] == item.id]
        if waiting:
            st["pending_copies"] = [p for p in st["pending_copies"] if p[6][1] != item.id]
            for p in waiting:
                self._file_item(FileItem(*p))

    def _lose_pending_copies(self, run: str) -> None:
        """At a run's end, copies whose source never came are lost."""
        for p in self.runs[run].pop("pending_copies", None) or ():
            self._count_file(run, "files_lost")
            self._count_file(run, "files_lost_no_source")
            self.files_lost += 1
            log.warning("run=%s duplicate id=%s lost: file %s never came", run, p[3], p[6][1])

    def _replaced(self, run: str, file_id: str) -> bool:
        """True if a later file replaced ``file_id`` in the index (this is a replay of its put)."""
        assert self._state is not None
        return self._state.get(_replaced_key(run, file_id)) is not None
    def _write_file_index(self, run: str, ops: list[tuple[Any, ...]], state: SinkState) -> list[str]:
        """Apply one run's index changes under ML-Dash's lock; the overwritten id directories to remove."""
        removed: list[str] = []
        with files.locked_index(run) as entries:
            changed = False
            for op in ops:
                ids = {e.get("id"): i for i, e in enumerate(entries)}
                if op[0] == "put":
                    entry = op[1]
                    if entry["id"] in ids:
                        continue
                    i = files.live_entry(entries, entry["path"], entry["filename"])
                    if i is None:
                        entries.append(entry)
                    elif files.called_before(entry, entries[i]):
                        # A later call's file holds the name already (this frame was re-sent after an
                        # agent restart, and so came late): it was overwritten before it arrived.
                        d = files.id_dir(run, entry["path"], entry["id"])
                        removed.append(d)
                        state.put(_replaced_key(run, entry["id"]), d)
                        continue
                    else:
                        old = entries[i]
                        d = files.id_dir(run, old["path"], old["id"])
                        removed.append(d)
                        state.put(_replaced_key(run, old["id"]), d)
                        entries[i] = entry
                    changed = True
                    continue
                i = ids.get(op[1])
                if i is None or (op[0] == "update" and entries[i].get("deletedAt") is not None):
                    self._count_file(run, "file_ops_no_target")
                    log.warning("run=%s file %s of a %s is not in the run (or deleted)", run, op[1], op[0])
                    continue
                e = entries[i]
                if op[0] == "update":
                    for key in ("description", "tags", "metadata"):
                        if key in op[2]:
                            e[key] = op[2][key]
                    e["updatedAt"] = iso(float(op[2]["time"]))
                elif e.get("deletedAt") is None:
                    e["deletedAt"] = e["updatedAt"] = iso(float(op[2]))
                changed = True
            if removed:
                state.commit()
            if changed:
                files.write_index(run, entries)
        return removed

    def _track_path(self, run: str, topic: str) -> str:
        path = self._paths.get((run, topic))
        if path is None:
            path = self._paths[(run, topic)] = os.path.join(layout.track_dir(run, topic), "data.jsonl")
        return path

    def _rows(self, item: RowsItem) -> None:
        tpath = self._track_path(item.run, item.topic)
        fs = self._file(tpath, "track", item.run, topic=item.topic)
        stamps, rows = item.stamps, item.rows
        assert rows is not None, "the runner hands over materialized rows"
        cols = set(fs["columns"])
        n_cols = len(cols)
        for fields in rows:
            if len(fields) != n_cols or not cols.issuperset(fields):
                cols.update(fields)
                n_cols = len(cols)
        if n_cols != len(fs["columns"]):
            fs["columns"] = sorted(cols)
        first, last = stamps[0], stamps[-1]
        if fs["last_ts"] is None or first > fs["last_ts"]:
            self._append(tpath, fs, layout.track_lines(stamps, rows))
            fs["n"] += len(rows)
        else:
            end = self._end(tpath, fs)
            pos, existing = layout.tail_rows(lambda a, b: self._read(tpath, a, b), end, first)
            merged, _ = merge.merge_rows([*existing, *zip(stamps, rows, strict=True)])
            data = layout.encode_track_lines([ts for ts, _ in merged], [f for _, f in merged])
            ov = self._send.overlays.get(tpath)
            if ov is not None and pos >= ov[0]:
                del ov[1][pos - ov[0]:]
                ov[1].extend(data)
            else:
                self._send.overlays[tpath] = (pos, bytearray(data))
            fs["n"] += len(merged) - len(existing)
            self.rewrites += 1
        fs["first_ts"] = first if fs["first_ts"] is None else min(fs["first_ts"], first)
        fs["last_ts"] = last if fs["last_ts"] is None else max(fs["last_ts"], last)

    # ------------------------------------------------------------ write, commit
    def _write(self, state: SinkState) -> None:
        """Write appends (fsynced), stage redos and the state; the runner commits."""
        snd = self._send
        if snd.loaded:
            # Register files first met in this send at their size before it, so a crash between
            # writing them and the runner's commit is truncated away like any uncommitted append.
            for path, before in snd.loaded.items():
                state.put(b"f:" + path.encode(), before)
            state.commit()
        try:
            for path, (pos, data) in snd.overlays.items():
                fs = self.files[path]
                if pos >= fs["size"]:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
                    try:
                        layout.pwrite_all(fd, bytes(data), pos)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                else:
                    snd.redos[path] = (pos, bytes(data))
                fs["size"] = pos + len(data)
            for d in {os.path.dirname(p) for p in snd.new_files}:
                layout.fsync_dir(d)
        except OSError as exc:
            raise SinkRetryable(f"writing JSONL failed: {exc}") from exc
        try:
            for frun, ops in snd.file_ops.items():
                for d in self._write_file_index(frun, ops, state):
                    shutil.rmtree(d, ignore_errors=True)
        except OSError as exc:
            raise SinkRetryable(f"writing a file index failed: {exc}") from exc
        dropping = {p for p in self._drop_next if p not in snd.runs}
        for path in dropping:
            run = self.runs[path]
            state.delete(b"r:" + path.encode())
            for k, _ in state.items(b"o:" + path.encode() + b"\0"):
                state.delete(k)
            for fpath in run["files"]:
                state.delete(b"f:" + fpath.encode())
        for path in self._applied:
            state.delete(b"x:" + path.encode())
        self._applied = []
        for path in snd.runs:
            if path not in dropping:
                state.put(b"r:" + path.encode(), self.runs[path])
        for fpath in snd.files:
            fs = self.files[fpath]
            if fs["run"] not in dropping:
                state.put(b"f:" + fpath.encode(), fs)
        for fpath, redo in snd.redos.items():
            state.put(b"x:" + fpath.encode(), redo)
        snd.final -= dropping
        self._dropping = dropping

    def committed(self, batches: list[Batch]) -> None:
        """Apply tail rewrites, replace derived files, forget runs whose final state is on disk.

        :raises SinkRetryable: a file could not be written (a full disk); the runner reopens the
            sink, and recovery applies the rewrites and replaces every derived file again.
        """
        snd = self._send
        self._applied = list(snd.redos)
        for path in self._dropping:
            run = self.runs.pop(path)
            for fpath in run["files"]:
                self.files.pop(fpath, None)
        self._drop_next = (self._drop_next - self._dropping) | snd.final
        try:
            for fpath, (pos, data) in snd.redos.items():
                self._apply_redo(fpath, pos, data)
            for path in snd.runs:
                if path in self.runs:
                    self._write_derived_run(path, files=snd.files)
        except OSError as exc:
            raise SinkRetryable(f"writing after the commit failed, recovery writes it again: {exc}") from exc

    def _write_derived_run(self, path: str, *, files: set[str] | None = None, all_files: bool = False) -> None:
        """Replace the run's derived files; ``experiment.json`` last, since its status says the run is done."""
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
                "counters": {**run["counters"], **run.get("file_counters", {})},
            },
        }
        params = run.get("params")
        if params and (run.get("params_dirty") or all_files):
            now = iso(time.time())
            doc = {
                "version": params["version"], "data": params["data"], "createdAt": params["createdAt"] or now, "updatedAt": now,
            }
            with layout.locked(os.path.join(path, ".parameters.lock")):
                layout.write_atomic(os.path.join(path, "parameters.json"), layout.dumps(doc))
            run["params_dirty"] = False
        for fpath in run["files"]:
            if all_files or (files is not None and fpath in files):
                fs = self.files.get(fpath)
                if fs is not None:
                    self._write_derived_file(fpath, fs)
        with layout.locked(os.path.join(path, ".experiment.lock")):
            layout.write_atomic(os.path.join(path, "experiment.json"), layout.dumps(exp))

    def _write_derived_file(self, path: str, fs: dict[str, Any]) -> None:
        d = os.path.dirname(path)
        now = iso(time.time())
        if fs["kind"] == "metric":
            name = fs["name"]
            ident = (
                ("metricId", f"local-metric-{name}")
                if fs.get("folder", "metrics") == "metrics"
                else ("trackId", f"local-track-{name}")
            )
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

    def close(self) -> None:
        """Nothing is held open between batches."""

    def status(self) -> dict[str, Any]:
        """Files and runs the sink is tracking, and tail rewrites so far."""
        return {"runs": len(self.runs), "files": len(self.files), "rewrites": self.rewrites, "files_stored": self.files_stored,
                "files_lost": self.files_lost}
