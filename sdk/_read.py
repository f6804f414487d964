"""Reading the on-disk layout back, with no agent needed (files only, any machine).

Shapes follow ML-Dash 0.11's local reader, so code written against it reads dashcar's output
unchanged. Track files are sorted with one line per timestamp, so a time range is found by
bisecting byte offsets, not by scanning.
"""

from __future__ import annotations

import bisect
import io
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dashcar.proto import metric_dir_parts, track_dir_name

TRACK_FORMATS = ("json", "jsonl", "parquet", "mocap")


def read_json(path: Path) -> Any:
    """A JSON file's value; None if it is missing or unreadable (a run still being written)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def unflatten(flat: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """``{"a.b": 1}`` → ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(sep)
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = value
    return out


def read_params(run: Path, flatten: bool = True) -> dict[str, Any]:
    """The run's parameters (dot-flattened, or nested with ``flatten=False``)."""
    doc = read_json(run / "parameters.json")
    data = dict(doc.get("data") or {}) if isinstance(doc, dict) else {}
    return data if flatten else unflatten(data)


def series_dir(run: Path, folder: str, name: str | None) -> Path:
    """Directory of an index-based series (a metric, or a DreamLake track)."""
    return run.joinpath(folder, *metric_dir_parts(name))


def read_series(
    run: Path, folder: str, name: str | None, start_index: int = 0, limit: int = 1000
) -> dict[str, Any]:
    """Points ``start_index`` … ``start_index + limit - 1``, as ML-Dash's ``read`` returns them."""
    d = series_dir(run, folder, name)
    points: list[dict[str, Any]] = []
    try:
        with open(d / "data.jsonl", encoding="utf-8") as f:
            for _ in range(start_index):
                if not f.readline():
                    break
            for _ in range(limit):
                line = f.readline()
                if not line:
                    break
                if line.strip():
                    points.append(json.loads(line))
    except FileNotFoundError:
        pass
    meta = read_json(d / "metadata.json") or {}
    total = int(meta.get("totalDataPoints", 0))
    return {
        "data": points,
        "startIndex": start_index,
        "endIndex": start_index + len(points) - 1 if points else start_index - 1,
        "total": len(points),
        "hasMore": start_index + len(points) < total,
    }


def series_stats(run: Path, folder: str, name: str | None) -> dict[str, Any]:
    """A series' counts and metadata, as ML-Dash's ``stats`` returns them (counts as strings)."""
    meta = read_json(series_dir(run, folder, name) / "metadata.json")
    if not isinstance(meta, dict):
        raise FileNotFoundError(f"{folder[:-1]} {name!r} not found in {run}")
    total = int(meta.get("totalDataPoints", 0))
    return {
        ("metricId" if folder == "metrics" else "trackId"): meta.get("metricId") or meta.get("trackId"),
        "name": meta.get("name", name),
        "description": meta.get("description"),
        "tags": meta.get("tags", []),
        "metadata": meta.get("metadata"),
        "totalDataPoints": str(total),
        "bufferedDataPoints": str(total),
        "chunkedDataPoints": "0",
        "totalChunks": 0,
        "chunkSize": 10000,
        "firstDataAt": meta.get("createdAt"),
        "lastDataAt": meta.get("updatedAt"),
        "createdAt": meta.get("createdAt"),
        "updatedAt": meta.get("updatedAt", meta.get("createdAt")),
    }


def list_series(run: Path, folder: str) -> list[dict[str, Any]]:
    """Every series under ``folder``, including names with ``/`` (nested directories)."""
    base = run / folder
    out = []
    for meta_path in sorted(base.rglob("metadata.json")) if base.is_dir() else []:
        if not (meta_path.parent / "data.jsonl").exists():
            continue
        meta = read_json(meta_path)
        if not isinstance(meta, dict) or "totalDataPoints" not in meta:
            continue
        name = meta["name"] if "name" in meta else meta_path.parent.relative_to(base).as_posix()
        out.append({
            ("metricId" if folder == "metrics" else "trackId"): meta.get("metricId") or meta.get("trackId"),
            "name": name,
            "description": meta.get("description"),
            "tags": meta.get("tags", []),
            "totalDataPoints": str(meta["totalDataPoints"]),
            "createdAt": meta.get("createdAt"),
        })
    return out


class TrackFile:
    """A sorted track file, read by bisecting on byte offsets."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _ts_at(self, f: io.BufferedReader, pos: int) -> tuple[float, int] | None:
        """Timestamp and start offset of the first full line at or after ``pos``."""
        f.seek(pos)
        if pos:
            f.readline()
        start = f.tell()
        line = f.readline()
        if not line:
            return None
        return json.loads(line)["timestamp"], start

    def _offset(self, f: io.BufferedReader, size: int, ts: float) -> int:
        """Offset of the first line with ``timestamp >= ts``."""
        lo, hi = 0, size
        while hi - lo > 4096:
            mid = (lo + hi) // 2
            found = self._ts_at(f, mid)
            if found is None or found[0] >= ts:
                hi = mid
            else:
                lo = mid
        f.seek(lo)
        if lo:
            f.readline()
        while True:
            pos = f.tell()
            line = f.readline()
            if not line or json.loads(line)["timestamp"] >= ts:
                return pos

    def entries(self, start: float | None = None, end: float | None = None) -> Iterator[dict[str, Any]]:
        """Rows with ``start <= timestamp <= end``, in timestamp order."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - the `with` below closes it; only open() may find no file
        except FileNotFoundError:
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            f.seek(self._offset(f, size, start) if start is not None else 0)
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                if end is not None and row["timestamp"] > end:
                    return
                yield row


def _to_parquet(entries: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, None] = {"timestamp": None}
    for row in entries:
        columns.update(dict.fromkeys(row))
    arrays = {}
    for col in columns:
        values = [row.get(col) for row in entries]
        try:
            arrays[col] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays[col] = pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string())
    table = pa.table(arrays) if entries else pa.table({"timestamp": pa.array([], type=pa.float64())})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def read_track(
    run: Path,
    topic: str,
    start_timestamp: float | None = None,
    end_timestamp: float | None = None,
    columns: list[str] | None = None,
    format: str = "json",
    meta: dict[str, Any] | None = None,
) -> dict[str, Any] | bytes:
    """A track in one of ``json``, ``jsonl`` (bytes), ``parquet`` (bytes, zstd) or ``mocap``."""
    if format not in TRACK_FORMATS:
        raise ValueError(f"format {format!r} is not one of {', '.join(TRACK_FORMATS)}")
    d = run / "tracks" / track_dir_name(topic)
    entries = list(TrackFile(d / "data.jsonl").entries(start_timestamp, end_timestamp))
    if columns:
        entries = [{"timestamp": e["timestamp"], **{c: e[c] for c in columns if c in e}} for e in entries]
    if format == "json":
        return {"entries": entries, "count": len(entries)}
    if format == "jsonl":
        return "\n".join(json.dumps(e) for e in entries).encode()
    if format == "parquet":
        return _to_parquet(entries)
    meta = meta if meta is not None else (read_json(d / "metadata.json") or {})
    user_meta = meta.get("metadata")
    if not isinstance(user_meta, dict):
        user_meta = {}
    channels = sorted({k for e in entries for k in e if k != "timestamp"})
    first = entries[0]["timestamp"] if entries else 0
    last = entries[-1]["timestamp"] if entries else 0
    return {
        "version": "1.0",
        "metadata": {
            "topic": topic,
            "description": meta.get("description"),
            "tags": meta.get("tags", []),
            "fps": user_meta.get("fps", 30),
            "duration": last - first,
            "frameCount": len(entries),
            "startTime": first,
            "endTime": last,
        },
        "channels": channels,
        "frames": [
            {"time": e["timestamp"], **{k: v for k, v in e.items() if k != "timestamp"}} for e in entries
        ],
    }


def list_tracks(run: Path, topic_filter: str | None = None) -> list[dict[str, Any]]:
    """Timestamped tracks of a run; ``topic_filter`` is a topic or ``prefix/*``."""
    base = run / "tracks"
    out = []
    for meta_path in sorted(base.glob("*/metadata.json")) if base.is_dir() else []:
        meta = read_json(meta_path)
        if not isinstance(meta, dict) or "topic" not in meta:
            continue
        topic = meta["topic"]
        if topic_filter:
            if topic_filter.endswith("/*"):
                if not topic.startswith(topic_filter[:-1]):
                    continue
            elif topic != topic_filter:
                continue
        out.append({
            "id": meta.get("trackId"),
            "topic": topic,
            "totalEntries": meta.get("totalEntries", 0),
            "firstTimestamp": meta.get("firstTimestamp"),
            "lastTimestamp": meta.get("lastTimestamp"),
            "columns": meta.get("columns", []),
            "description": meta.get("description"),
            "tags": meta.get("tags", []),
            "metadata": meta.get("metadata"),
            "createdAt": meta.get("createdAt"),
        })
    return out


class TrackSlice:
    """Rows of a time range: iterable, sized, and ``findByTime`` (floor match, as ML-Dash)."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self._entries = entries
        self._stamps = [e["timestamp"] for e in entries]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def findByTime(self, timestamp: float | list[float]) -> dict[str, Any] | list[dict[str, Any]]:
        """The row with the largest timestamp <= ``timestamp`` (``KeyError`` if none)."""
        if isinstance(timestamp, list):
            return [self._floor(t) for t in timestamp]
        return self._floor(timestamp)

    find_by_time = findByTime

    def _floor(self, t: float) -> dict[str, Any]:
        i = bisect.bisect_right(self._stamps, t)
        if i == 0:
            raise KeyError(f"no entry at or before timestamp {t}")
        return self._entries[i - 1]

    def __repr__(self) -> str:
        return f"TrackSlice({len(self._entries)} entries)"
