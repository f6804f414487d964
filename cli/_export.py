"""``dashcar export``: one topic as Parquet, CSV or JSON lines, or a whole run as MCAP.

Rows are what ``read()`` returns (``_runs.iter_rows``). JSON lines are those rows exactly; a
track's Parquet is exactly ``read(format="parquet")``. Tabular formats flatten a metric point
to ``index, createdAt`` and its data fields, and a log line to its fields (``metadata`` as
JSON). CSV cells hold strings as they are and every other value as JSON (lists, ``NaN``).

MCAP (for Foxglove): one channel per track (``/tracks/<topic>``), metric (``/metrics/<name>``)
and the logs (``/logs``, as ``foxglove.Log`` so its log panel reads them); JSON messages with
a JSON schema per channel, inferred from the rows. A message is its row with dotted keys
nested again (``gripper.pos`` → ``{"gripper": {"pos": ...}}``); its log time is the row's
``_ts`` in nanoseconds (a track's timestamp, a metric point's ``_ts``, a log line's time).
The run's ``experiment.json`` and parameters go in as MCAP metadata.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Final

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from dashcar import _read

from ._common import OK, CliError, err
from ._runs import Topic, iter_rows, parse_iso, prefix_of, resolve_run, resolve_topic, topics

FORMATS: Final = ("parquet", "csv", "jsonl", "mcap")
LOG_LEVELS: Final = {"debug": 1, "info": 2, "warn": 3, "warning": 3, "error": 4, "fatal": 5, "critical": 5}
"""ML-Dash levels → ``foxglove.Log`` levels."""

FOXGLOVE_LOG_SCHEMA: Final = {
    "title": "foxglove.Log",
    "description": "A log message",
    "type": "object",
    "properties": {
        "timestamp": {"type": "object", "title": "time", "properties": {"sec": {"type": "integer", "minimum": 0},
                                                                        "nsec": {"type": "integer", "minimum": 0}}},
        "level": {"title": "foxglove.LogLevel", "type": "integer", "oneOf": [
            {"title": "UNKNOWN", "const": 0}, {"title": "DEBUG", "const": 1}, {"title": "INFO", "const": 2},
            {"title": "WARNING", "const": 3}, {"title": "ERROR", "const": 4}, {"title": "FATAL", "const": 5}]},
        "message": {"type": "string"},
        "name": {"type": "string"},
        "file": {"type": "string"},
        "line": {"type": "integer", "minimum": 0},
        "metadata": {},
    },
}


@contextmanager
def progress_bar(total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A byte progress bar on stderr (only when it is a terminal); yields the advance function."""
    console = err()
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   console=console, transient=True, disable=not console.is_terminal)
    with bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def tabular(topic: Topic, row: dict[str, Any]) -> dict[str, Any]:
    """A row as a flat record: tracks as they are, a metric point's data beside its index, logs as fields."""
    if topic.kind == "metric":
        flat: dict[str, Any] = {"index": row.get("index"), "createdAt": row.get("createdAt")}
        for k, v in (row.get("data") or {}).items():
            flat[k if k not in flat else f"data.{k}"] = v
        return flat
    if topic.kind == "logs":
        return {k: json.dumps(v) if k == "metadata" and v is not None else v for k, v in row.items()}
    return row


def cell(value: Any) -> str:
    """A CSV cell: strings as they are, nothing for null, everything else as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _write_jsonl(topic: Topic, fp: IO[bytes], advance: Callable[[int], None]) -> int:
    n = 0
    for row in iter_rows(topic, advance):
        fp.write(json.dumps(row).encode() + b"\n")
        n += 1
    return n


def _write_csv(topic: Topic, fp: IO[bytes], advance: Callable[[int], None]) -> int:
    columns: dict[str, None] = {}
    for row in iter_rows(topic, advance):
        columns.update(dict.fromkeys(tabular(topic, row)))
    text = io.TextIOWrapper(fp, encoding="utf-8", newline="")
    writer = csv.writer(text)
    writer.writerow(columns)
    n = 0
    for row in iter_rows(topic, advance):
        flat = tabular(topic, row)
        writer.writerow([cell(flat.get(c)) for c in columns])
        n += 1
    text.flush()
    text.detach()
    return n


def _write_parquet(topic: Topic, fp: IO[bytes], advance: Callable[[int], None]) -> int:
    rows = list(iter_rows(topic, advance))
    if topic.kind == "track":
        fp.write(_read._to_parquet(rows))
        return len(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = [tabular(topic, r) for r in rows]
    columns: dict[str, None] = {}
    for r in flat:
        columns.update(dict.fromkeys(r))
    arrays = {}
    for col in columns:
        values = [r.get(col) for r in flat]
        try:
            arrays[col] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays[col] = pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string())
    buf = io.BytesIO()
    pq.write_table(pa.table(arrays) if arrays else pa.table({"index": pa.array([], type=pa.int64())}), buf, compression="zstd")
    fp.write(buf.getvalue())
    return len(rows)


# ---------------------------------------------------------------------------------------------- MCAP
def _type_of(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer"}
    if isinstance(value, float):
        return {"type": "number"}
    if isinstance(value, str):
        return {"type": "string"}
    if value is None:
        return {"type": "null"}
    if isinstance(value, dict):
        return {"type": "object", "properties": {k: _type_of(v) for k, v in value.items()}}
    if isinstance(value, list):
        items: dict[str, Any] | None = None
        for v in value:
            items = _type_of(v) if items is None else merge_schema(items, _type_of(v))
        return {"type": "array", "items": items or {}}
    return {}


def merge_schema(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of values of schema ``a`` or ``b`` (objects merge their properties)."""
    if a == b:
        return a
    ta, tb = a.get("type"), b.get("type")
    if ta == "object" and tb == "object":
        props = dict(a.get("properties", {}))
        for k, v in b.get("properties", {}).items():
            props[k] = merge_schema(props[k], v) if k in props else v
        return {"type": "object", "properties": props}
    if ta == "array" and tb == "array":
        return {"type": "array", "items": merge_schema(a.get("items", {}), b.get("items", {}))}
    if {ta, tb} == {"integer", "number"}:
        return {"type": "number"}
    kinds: list[str] = []
    for t in (ta, tb):
        for k in t if isinstance(t, list) else [t]:
            if isinstance(k, str) and k not in kinds:
                kinds.append(k)
    return {"type": kinds} if kinds else {}


def mcap_message(topic: Topic, row: dict[str, Any], prefix: str) -> tuple[dict[str, Any], int]:
    """The MCAP message of a row and its log time in nanoseconds (see the module docstring)."""
    if topic.kind == "track":
        ts = row.get("timestamp")
        return _read.unflatten(row), _ns(ts)
    if topic.kind == "metric":
        data = row.get("data") or {}
        msg = {"index": row.get("index"), **_read.unflatten(data), "createdAt": row.get("createdAt")}
        ts = data.get("_ts")
        return msg, _ns(ts if isinstance(ts, (int, float)) else parse_iso(row.get("createdAt")))
    t = parse_iso(row.get("timestamp")) or 0.0
    ns = _ns(t)
    return {
        "timestamp": {"sec": ns // 1_000_000_000, "nsec": ns % 1_000_000_000},
        "level": LOG_LEVELS.get(str(row.get("level", "")).lower(), 0),
        "message": str(row.get("message", "")),
        "name": prefix,
        "file": "",
        "line": 0,
        "metadata": row.get("metadata"),
    }, ns


def _ns(t: object) -> int:
    """Seconds → nanoseconds for a log time (MCAP's are unsigned: before 0 becomes 0)."""
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
        return 0
    return max(0, round(t * 1e9))


def _write_mcap(run: Path, fp: IO[bytes], advance: Callable[[int], None], root: Path | None) -> int:
    from mcap.writer import Writer

    prefix = prefix_of(run, root)
    found = topics(run)
    schemas: dict[Topic, dict[str, Any]] = {}
    for topic in found:
        if topic.kind == "logs":
            schemas[topic] = FOXGLOVE_LOG_SCHEMA
            advance(topic.path.stat().st_size if topic.path.exists() else 0)
            continue
        schema: dict[str, Any] | None = None
        for row in iter_rows(topic, advance):
            msg, _ = mcap_message(topic, row, prefix)
            one = _type_of(msg)
            schema = one if schema is None else merge_schema(schema, one)
        schemas[topic] = {"title": f"dashcar {topic.kind} {topic.name}", **(schema or {"type": "object"})}
    writer = Writer(fp)
    writer.start(profile="", library="dashcar")
    n = 0
    for topic in found:
        name = "foxglove.Log" if topic.kind == "logs" else f"dashcar.{topic.kind}.{topic.name}"
        schema_id = writer.register_schema(name=name, encoding="jsonschema", data=json.dumps(schemas[topic]).encode())
        channel = writer.register_channel(topic=topic.channel, message_encoding="json", schema_id=schema_id,
                                          metadata={"run": prefix, "kind": topic.kind})
        for seq, row in enumerate(iter_rows(topic, advance)):
            msg, ns = mcap_message(topic, row, prefix)
            writer.add_message(channel, log_time=ns, data=json.dumps(msg).encode(), publish_time=ns, sequence=seq)
            n += 1
    info = _read.read_json(run / "experiment.json")
    if isinstance(info, dict):
        writer.add_metadata("dashcar.run", {k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()})
    params = _read.read_params(run)
    if params:
        writer.add_metadata("dashcar.parameters", {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()})
    writer.finish()  # type: ignore[no-untyped-call]
    return n


def _size(paths: Iterable[Path]) -> int:
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total


def run(args: argparse.Namespace) -> int:
    """Export a topic (or, as MCAP, the whole run) to ``--out``."""
    root = Path(args.root)
    run_dir = resolve_run(args.run, root)
    fmt: str = args.format
    if fmt != "mcap" and not args.topic:
        raise CliError(f"--format {fmt} exports one topic: add --topic T (tracks, metrics or logs; `dashcar ls` lists runs)")
    target = Path(args.out)
    to_stdout = args.out == "-"
    if to_stdout and fmt in ("parquet", "mcap"):
        raise CliError(f"--format {fmt} is binary: give --out FILE")
    if not to_stdout and target.is_dir():
        raise CliError(f"--out {target} is a directory; give a file name")
    if fmt == "mcap":
        found = topics(run_dir)
        total = 2 * _size(t.path for t in found)
        what = f"{run_dir.name} → {target.name}"
    else:
        topic = resolve_topic(run_dir, args.topic)
        total = (2 if fmt == "csv" else 1) * _size([topic.path])
        what = f"{topic.name} → {target.name}"
    tmp = target.with_name(f".{target.name}.part") if not to_stdout else target
    try:
        with progress_bar(total, what) as advance:
            fp: IO[bytes]
            with (open(tmp, "wb") if not to_stdout else _stdout()) as fp:
                if fmt == "mcap":
                    n = _write_mcap(run_dir, fp, advance, root if root.is_dir() else None)
                elif fmt == "jsonl":
                    n = _write_jsonl(topic, fp, advance)
                elif fmt == "csv":
                    n = _write_csv(topic, fp, advance)
                else:
                    n = _write_parquet(topic, fp, advance)
        if not to_stdout:
            tmp.replace(target)
    except OSError as exc:
        if not to_stdout:
            tmp.unlink(missing_ok=True)
        raise CliError(f"cannot write {target}: {exc.strerror or exc}; pick another --out") from exc
    except BaseException:
        if not to_stdout:
            tmp.unlink(missing_ok=True)
        raise
    if not to_stdout:
        what_rows = "messages" if fmt == "mcap" else "rows"
        err().print(f"exported {n} {what_rows} of {run_dir} to {target} ({fmt})")
    return OK


@contextmanager
def _stdout() -> Iterator[IO[bytes]]:
    yield sys.stdout.buffer
    sys.stdout.buffer.flush()
