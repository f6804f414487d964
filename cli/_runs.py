"""Runs on disk, with no agent needed: finding them, summing them up, reading and following a topic.

A RUN argument is a run directory (``.dash/alice/robotics/run1``, also one copied from another
machine) or a prefix under the data root (``--root``, default ``.dash``): the exact prefix, or
the start of exactly one run's prefix. A TOPIC is a track topic (``robot/state``), a metric name
(``train``) or ``logs``. The rows read here are what the SDK's ``read()`` returns: the lines of
the topic's ``data.jsonl``, parsed, in file order.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final, Literal

from dashcar import _read
from dashcar.proto import DashcarError, track_dir_name

from ._common import CliError

RUN_PARTS: Final = frozenset(("metrics", "tracks", "logs", "files"))
LOSS_COUNTERS: Final = ("missing", "dropped_by_producer", "lost_in_producer_queue", "rejected_topic_collision")
"""Per-run counters (``experiment.json`` → ``dashcar.counters``) that are frames lost."""


def is_run_dir(path: Path) -> bool:
    """True for a directory that holds a run (its ``experiment.json``, or tracks/metrics/logs)."""
    return (path / "experiment.json").is_file() or any((path / p).is_dir() for p in ("tracks", "metrics", "logs"))


def find_runs(root: Path) -> list[Path]:
    """Every run directory under ``root`` (a run's own tracks, metrics, logs and files are not searched)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if "experiment.json" in filenames or (here != root and any(d in ("tracks", "metrics", "logs") for d in dirnames)):
            found.append(here)
            dirnames[:] = [d for d in dirnames if d not in RUN_PARTS]
        dirnames.sort()
    return found


def prefix_of(run: Path, root: Path | None) -> str:
    """The run's prefix: from its ``experiment.json``, else its path under ``root``, else its name."""
    doc = _read.read_json(run / "experiment.json")
    if isinstance(doc, dict) and isinstance(doc.get("prefix"), str):
        return str(doc["prefix"])
    if root is not None:
        try:
            return run.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return run.name


def resolve_run(arg: str, root: Path) -> Path:
    """The run a RUN argument names; ``CliError`` saying what exists when it names none or several."""
    given = Path(arg)
    if given.is_dir() and is_run_dir(given):
        return given
    want = arg.strip("/")
    if not root.is_dir():
        raise CliError(f"no run directory {arg!r} and no data root {root}; pass a run directory or --root DIR")
    exact = root / want
    if want and exact.is_dir() and is_run_dir(exact):
        return exact
    runs = find_runs(root)
    matches = [r for r in runs if r.relative_to(root).as_posix().startswith(want)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise CliError(f"no run {arg!r} under {root}; `dashcar ls {root}` lists its runs")
    names = ", ".join(r.relative_to(root).as_posix() for r in matches[:3])
    raise CliError(f"{arg!r} matches {len(matches)} runs under {root} ({names}{', ...' if len(matches) > 3 else ''}); "
                   "give more of the prefix")


def parse_iso(text: object) -> float | None:
    """ML-Dash's ``2026-01-02T03:04:05.123456Z`` as seconds since the epoch."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.rstrip("Z")).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def _log_count(run: Path) -> int:
    seq = run / "logs" / ".log_sequence"
    try:
        return int(seq.read_text().strip() or 0)
    except (OSError, ValueError):
        pass
    try:
        with open(run / "logs" / "logs.jsonl", "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def summary(run: Path, root: Path | None) -> dict[str, Any]:
    """What ``ls`` shows of a run: status, start, duration, counts, frames lost."""
    raw = _read.read_json(run / "experiment.json")
    doc: dict[str, Any] = raw if isinstance(raw, dict) else {}
    extra: dict[str, Any] = doc["dashcar"] if isinstance(doc.get("dashcar"), dict) else {}
    counters: dict[str, Any] = extra["counters"] if isinstance(extra.get("counters"), dict) else {}
    started = parse_iso(doc.get("created_at") or doc.get("createdAt"))
    ended = parse_iso(extra.get("closed_at"))
    status = str(doc.get("status") or extra.get("status") or "unknown")
    end = ended if ended is not None else (time.time() if status == "running" else None)
    tracks = _read.list_tracks(run)
    metrics = _read.list_series(run, "metrics")
    return {
        "prefix": prefix_of(run, root),
        "path": str(run),
        "status": status,
        "reason": extra.get("reason"),
        "started": doc.get("created_at"),
        "ended": extra.get("closed_at"),
        "duration_s": round(end - started, 3) if started is not None and end is not None else None,
        "tracks": len(tracks),
        "rows": sum(int(t.get("totalEntries") or 0) for t in tracks),
        "metrics": len(metrics),
        "points": sum(int(m.get("totalDataPoints") or 0) for m in metrics),
        "logs": _log_count(run),
        "frames": int(counters.get("frames", 0)),
        "lost": sum(int(counters.get(k, 0)) for k in LOSS_COUNTERS),
        "host": extra.get("host"),
        "pid": extra.get("pid"),
    }


# ------------------------------------------------------------------------------------------ topics
@dataclass(frozen=True, slots=True)
class Topic:
    """A readable series of a run: a track, a metric, or the logs."""

    kind: Literal["track", "metric", "logs"]
    name: str
    path: Path
    """Its ``data.jsonl`` (``logs.jsonl`` for the logs)."""

    @property
    def channel(self) -> str:
        """Its MCAP channel name: ``/tracks/<topic>``, ``/metrics/<name>``, ``/logs``."""
        return "/logs" if self.kind == "logs" else f"/{self.kind}s/{self.name}"


def topics(run: Path) -> list[Topic]:
    """Every track, metric and the logs of a run."""
    out = [Topic("track", t["topic"], run / "tracks" / track_dir_name(t["topic"]) / "data.jsonl")
           for t in _read.list_tracks(run)]
    out += [Topic("metric", m["name"], _read.series_dir(run, "metrics", m["name"]) / "data.jsonl")
            for m in _read.list_series(run, "metrics") if m.get("name")]
    if (run / "logs" / "logs.jsonl").exists():
        out.append(Topic("logs", "logs", run / "logs" / "logs.jsonl"))
    return out


def find_topic(run: Path, name: str) -> Topic | None:
    """The topic ``name`` names (a track first, then a metric, then ``logs``), if it exists yet."""
    try:
        track = run / "tracks" / track_dir_name(name)
        if (track / "data.jsonl").exists() or (track / "metadata.json").exists():
            return Topic("track", name, track / "data.jsonl")
        metric = _read.series_dir(run, "metrics", name)
        if (metric / "data.jsonl").exists() or (metric / "metadata.json").exists():
            return Topic("metric", name, metric / "data.jsonl")
    except (DashcarError, ValueError):
        pass
    if name == "logs" and (run / "logs").is_dir():
        return Topic("logs", "logs", run / "logs" / "logs.jsonl")
    return None


def resolve_topic(run: Path, name: str) -> Topic:
    """The topic ``name`` of ``run``; ``CliError`` listing what the run has when it has no such topic."""
    topic = find_topic(run, name)
    if topic is None:
        have = ", ".join(t.name for t in topics(run)) or "nothing yet"
        raise CliError(f"run {run} has no track, metric or logs named {name!r}; it has: {have}")
    return topic


def iter_rows(topic: Topic, progress: Callable[[int], None] | None = None) -> Iterator[dict[str, Any]]:
    """The topic's rows in file order, as ``read()`` returns them; ``progress`` gets the bytes read."""
    try:
        f = open(topic.path, "rb")  # noqa: SIM115 - closed by the with below; only open() may find no file
    except FileNotFoundError:
        return
    with f:
        for number, line in enumerate(f, 1):
            if progress is not None:
                progress(len(line))
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as exc:
                    raise CliError(f"{topic.path}:{number} is not a JSON line ({exc}); the file is damaged: "
                                   "restore it from a backup or cut that line") from None


def follow(path: Path, lines: int, poll_s: float = 0.2, stop: Callable[[], bool] = lambda: False) -> Iterator[bytes]:
    """The last ``lines`` lines of ``path``, then each line as it is written, until ``stop()``.

    A track's tail may be rewritten in place (a late entry merged into a written row): the
    lines printed lately are compared with the file on each poll, and from the first that
    changed on, the rewritten lines are printed again. Only whole lines are returned.
    """
    printed: list[tuple[int, bytes]] = []
    """(offset, line) of the lines printed lately, oldest first, to notice a rewrite."""
    pos = 0
    first = True
    while not stop():
        try:
            with open(path, "rb") as f:
                if printed:
                    base = printed[0][0]
                    f.seek(base)
                    data = f.read()
                    for i, (off, line) in enumerate(printed):
                        if data[off - base: off - base + len(line)] != line:
                            pos = off
                            del printed[i:]
                            break
                    chunk = data[pos - base:]
                else:
                    if pos > os.fstat(f.fileno()).st_size:
                        pos = 0
                    f.seek(pos)
                    chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        end = chunk.rfind(b"\n") + 1
        new: list[tuple[int, bytes]] = []
        off = pos
        for line in chunk[:end].splitlines(keepends=True):
            new.append((off, line))
            off += len(line)
        pos = off
        shown = new
        if first:
            shown = new[-lines:] if lines > 0 else []
            first = False
        for _, line in shown:
            if line.strip():
                yield line
        printed = (printed + new)[-64:]
        time.sleep(poll_s)
