"""Reading and writing the ML-Dash local layout: paths, line formats, locks, atomic files.

Line formats follow ML-Dash 0.11's local writer: the same keys in the same order, values that
parse to the same thing (NaN and Infinity kept as it writes them), so its reader and ours
agree. Lines are written by orjson; only a line orjson would say differently goes through
``json``'s encoder (see ``line``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from dashcar.proto import metric_dir_parts, track_dir_name


def iso(t: float) -> str:
    """ML-Dash's timestamp format: naive UTC ISO-8601 with a trailing ``Z``."""
    return datetime.fromtimestamp(t, timezone.utc).replace(tzinfo=None).isoformat() + "Z"


def series_dir(run: str, folder: str, name: str | None) -> str:
    """``<run>/<folder>/<name>`` (a ``/`` in the name nests directories, as ML-Dash does)."""
    return os.path.join(run, folder, *metric_dir_parts(name))


def track_dir(run: str, topic: str) -> str:
    """``<run>/tracks/<topic with / replaced by _>``."""
    return os.path.join(run, "tracks", track_dir_name(topic))


def logs_dir(run: str) -> str:
    """``<run>/logs``."""
    return os.path.join(run, "logs")


def _not_json(obj: Any) -> Any:
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)  # in CPython's json, not in the stubs
_encode = (
    _c_make_encoder(None, _not_json, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True)
    if _c_make_encoder is not None
    else None
)


def dumps(obj: Any) -> str:
    """One JSON value exactly as ``json.dumps`` (and so ML-Dash) writes it, minus its per-call setup."""
    if _encode is None:
        return json.dumps(obj)
    return "".join(_encode(obj, 0))


_orjson_dumps = orjson.dumps
_OrjsonError = orjson.JSONEncodeError


def line(obj: dict[str, Any]) -> bytes:
    """One JSON line of ``obj``, meaning exactly what ML-Dash's ``json.dumps`` line means.

    orjson writes it (ten times faster) unless it cannot say the same thing: it writes NaN and
    ±Infinity as ``null`` and refuses integers past 64 bits and lone surrogates. A line with
    ``null`` in it (a real ``None`` too, or the text "null": rare) is therefore written again by
    the standard encoder, which keeps ``NaN``/``Infinity`` as ML-Dash does; so is a refused one.
    """
    try:
        out = _orjson_dumps(obj)
    except _OrjsonError:
        return dumps(obj).encode() + b"\n"
    if b"null" in out:
        return dumps(obj).encode() + b"\n"
    return out + b"\n"


def metric_line(index: int, point: dict[str, Any]) -> bytes:
    """A metric line: ``{"index", "data", "createdAt"}``; ``createdAt`` comes from the point's ``_ts``."""
    ts = point.get("_ts")
    created = iso(ts) if isinstance(ts, (int, float)) and ts == ts and abs(ts) < 1e11 else iso(0.0)
    return line({"index": index, "data": point, "createdAt": created})


def track_line(ts: float, fields: dict[str, Any]) -> bytes:
    """A track line: ``{"timestamp": ts, <dot-flattened fields>}``."""
    return line({"timestamp": ts, **fields})


_ROW_SEP = b'},{"timestamp":'


MEMO_BYTES = 8 << 20
_memo: OrderedDict[int, tuple[list[float], int, bytes]] = OrderedDict()
_memo_bytes = 0
_memo_lock = threading.Lock()


def track_lines(stamps: list[float], rows: list[dict[str, Any]]) -> bytes:
    """``encode_track_lines``, remembered for the last few settled row lists (``MEMO_BYTES`` of lines).

    Every sink that writes a stream item's rows as JSON (the local files, an ML-Dash batch) gets
    the same bytes, so they are encoded once. An item's ``stamps`` list is its identity: one is
    never shared by two lists of different rows, and the memo holds it, so its id is not reused.
    """
    global _memo_bytes
    key = id(stamps)
    with _memo_lock:
        hit = _memo.get(key)
    if hit is not None and hit[0] is stamps and hit[1] == len(rows):
        return hit[2]
    data = encode_track_lines(stamps, rows)
    with _memo_lock:
        old = _memo.pop(key, None)
        _memo_bytes -= len(old[2]) if old is not None else 0
        _memo[key] = (stamps, len(rows), data)
        _memo_bytes += len(data)
        while _memo_bytes > MEMO_BYTES and len(_memo) > 1:
            _memo_bytes -= len(_memo.popitem(last=False)[1][2])
    return data


def encode_track_lines(stamps: list[float], rows: list[dict[str, Any]]) -> bytes:
    """The track lines of many rows at once: exactly what ``track_line`` gives each, joined.

    orjson encodes the whole list in one call (one call per row costs five times as much: each
    result is a fresh buffer) and the row boundaries ``},{"timestamp":`` become line breaks.
    Where that sequence also occurs inside a row (a list of dicts with a ``timestamp`` key), or
    a row holds ``null``, rows are written one by one instead.
    """
    n = len(rows)
    if n == 0:
        return b""
    try:
        chunk = _orjson_dumps([{"timestamp": ts, **f} for ts, f in zip(stamps, rows, strict=True)])
    except _OrjsonError:
        return b"".join([track_line(ts, f) for ts, f in zip(stamps, rows, strict=True)])
    if b"null" in chunk or chunk.count(_ROW_SEP) != n - 1:
        return b"".join([track_line(ts, f) for ts, f in zip(stamps, rows, strict=True)])
    return chunk[1:-1].replace(_ROW_SEP, b'}\n{"timestamp":') + b"\n"


def log_line(seq: int, t: float, level: str, message: str, metadata: dict[str, Any] | None) -> bytes:
    """A log line: ``{"sequenceNumber", "timestamp", "level", "message"[, "metadata"]}``."""
    entry: dict[str, Any] = {"sequenceNumber": seq, "timestamp": iso(t), "level": level, "message": message}
    if metadata:
        entry["metadata"] = metadata
    return line(entry)


def _open_creating(path: str, flags: int) -> int:
    """``os.open`` with ``O_CREAT``; a directory removed behind the agent is made again.

    Only for whole files (locks, atomic replacements): an append at an offset into a file
    that vanished would leave a hole, so appends fail instead and recovery reloads the file.
    """
    try:
        return os.open(path, flags | os.O_CREAT, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, flags | os.O_CREAT, 0o644)


@contextlib.contextmanager
def locked(lock_path: str) -> Iterator[None]:
    """Hold ML-Dash's ``flock`` on ``lock_path`` (created if missing) for the block."""
    fd = _open_creating(lock_path, os.O_WRONLY | os.O_APPEND)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_atomic(path: str, text: str, *, durable: bool = False) -> None:
    """Replace ``path`` with ``text`` via a temporary file and ``rename``; readers never see half."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with os.fdopen(_open_creating(tmp, os.O_WRONLY | os.O_TRUNC), "w", encoding="utf-8") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(path))


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``; a short write (a filling disk) continues or raises."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(28, "No space left on device")
        view, offset = view[n:], offset + n


def fsync_dir(path: str) -> None:
    """fsync a directory so a created or renamed entry survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: str | Path) -> Any:
    """A JSON file's value, or None if it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def count_lines(path: str) -> tuple[int, int]:
    """``(complete lines, size in bytes up to the end of the last complete line)`` of a file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0, 0
    end = data.rfind(b"\n") + 1
    return data.count(b"\n", 0, end), end


def first_last_ts(path: str, size: int) -> tuple[float | None, float | None]:
    """Timestamps of the first and last line of a track file (None, None if it is empty)."""
    if size == 0:
        return None, None
    with open(path, "rb") as f:
        first = json.loads(f.readline())["timestamp"]
        chunk = 4096
        while True:
            f.seek(max(0, size - chunk))
            lines = f.read(size - max(0, size - chunk)).rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or chunk >= size:
                return first, json.loads(lines[-1])["timestamp"]
            chunk *= 4


def tail_rows(read: Callable[[int, int], bytes], size: int, min_ts: float) -> tuple[int, list[tuple[float, dict[str, Any]]]]:
    """Rows of a sorted track file from the first with ``timestamp >= min_ts``, and its offset.

    ``read(start, end)`` gives the file's bytes in that range (the file as it will be once
    pending writes land). Reads backwards from ``size`` in growing chunks, so a late entry
    near the end costs only the tail, not the whole file.
    """
    chunk = 64 * 1024
    while True:
        start = max(0, size - chunk)
        data = read(start, size)
        lines = data.split(b"\n")
        if start > 0:
            first_partial = len(lines[0]) + 1
            lines = lines[1:]
            base = start + first_partial
        else:
            base = 0
        rows: list[tuple[float, dict[str, Any]]] = []
        offsets: list[int] = []
        pos = base
        for raw in lines:
            if raw:
                entry = json.loads(raw)
                ts = entry.pop("timestamp")
                rows.append((ts, entry))
                offsets.append(pos)
            pos += len(raw) + 1
        cut = 0
        while cut < len(rows) and rows[cut][0] < min_ts:
            cut += 1
        if cut > 0 or start == 0:
            return (offsets[cut] if cut < len(rows) else size), rows[cut:]
        chunk *= 4


@dataclass(frozen=True, slots=True)
class RunSeed:
    """What a run's local files say of it, for a run the agent meets without state of its own."""

    info: dict[str, Any]
    created_at: str | None
    counters: dict[str, int]
    params: dict[str, Any]
    params_version: int
    params_created: str | None
    log_seq: int


def read_run(run: str) -> RunSeed:
    """Read a run directory's ``experiment.json``, ``parameters.json`` and log sequence (all optional)."""
    exp = read_json(os.path.join(run, "experiment.json"))
    exp = exp if isinstance(exp, dict) else {}
    params = read_json(os.path.join(run, "parameters.json"))
    params = params if isinstance(params, dict) else {}
    ours = exp.get("dashcar")
    ours = ours if isinstance(ours, dict) else {}
    logs = os.path.join(logs_dir(run), "logs.jsonl")
    seq = read_json(os.path.join(logs_dir(run), ".log_sequence"))
    n = count_lines(logs)[0]
    data = params.get("data")
    return RunSeed(
        info={k: exp[k] for k in ("name", "project", "description", "tags", "metadata") if k in exp},
        created_at=exp.get("created_at") if isinstance(exp.get("created_at"), str) else None,
        counters={k: v for k, v in (ours.get("counters") or {}).items() if isinstance(v, int)},
        params=dict(data) if isinstance(data, dict) else {},
        params_version=int(params.get("version", 0)) if isinstance(params.get("version", 0), int) else 0,
        params_created=params.get("createdAt") if isinstance(params.get("createdAt"), str) else None,
        log_seq=max(n, seq) if isinstance(seq, int) else n,
    )
