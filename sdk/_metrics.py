"""Index-based series: ML-Dash metrics (``exp.metrics``) and DreamLake tracks (``session.track``).

The agent assigns indexes in arrival order. Calls that must return an index (``append``,
``append_batch``) learn the series' next index once, with a flush barrier, and count from
there: exact when one process writes the series, as in ML-Dash's local mode.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, SupportsFloat, cast

from dashcar.proto import Kind, metric_dir_parts

from . import _read

_METRIC: Final = int(Kind.METRIC)
_now = time.time

if TYPE_CHECKING:
    from ._experiment import Experiment

BATCH_POINTS = 1000
"""Points per frame for ``append_batch``, well under the frame size limit for ordinary points."""


def _clean(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def _percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (k - f) * (s[c] - s[f])


def _median(values: list[float]) -> float:
    return _percentile(values, 50)


def _stdev(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


AGGREGATIONS: dict[str, Callable[[list[float]], float]] = {
    "mean": lambda v: math.fsum(v) / len(v),
    "std": _stdev,
    "min": min,
    "max": max,
    "count": len,
    "median": _median,
    "sum": math.fsum,
    "p50": _median,
    "p90": lambda v: _percentile(v, 90),
    "p95": lambda v: _percentile(v, 95),
    "p99": lambda v: _percentile(v, 99),
    "first": lambda v: v[0],
    "last": lambda v: v[-1],
}


def summarize_values(buffer: Mapping[str, list[float]], aggs: Iterable[str]) -> dict[str, Any]:
    """``{key.agg: value}`` for every key with at least one non-NaN value."""
    out: dict[str, Any] = {}
    for key, values in buffer.items():
        clean = _clean(values)
        if clean:
            for agg in aggs:
                out[f"{key}.{agg}"] = AGGREGATIONS[agg](clean)
    return out


def _as_float(key: str, value: object) -> float:
    if value is None:
        return math.nan
    try:
        return float(cast("SupportsFloat", value))  # a value float() refuses raises TypeError here
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot aggregate non-numeric {key}={value!r}; use exp.log() for text") from exc


class SummaryCache:
    """Collect values per batch, then log ``k.mean/min/max/std/count`` once per epoch."""

    __slots__ = ("_series", "_buffer", "_context")

    def __init__(self, series: Series) -> None:
        self._series = series
        self._buffer: dict[str, list[float]] = defaultdict(list)
        self._context: dict[str, Any] = {}

    def store(self, **values: object) -> None:
        """Accumulate numeric values (None counts as NaN, which summaries leave out)."""
        for k, v in values.items():
            self._buffer[k].append(_as_float(k, v))

    def set(self, **context: object) -> None:
        """Values logged as they are with the next summary (epoch, lr)."""
        self._context.update(context)

    def summarize(self, clear: bool = True) -> None:
        """Log the statistics and context as one point; ``clear=False`` keeps accumulating."""
        point = {**self._context, **summarize_values(self._buffer, ("mean", "min", "max", "count", "std"))}
        if point:
            self._series.log(**point)
        if clear:
            self._buffer.clear()
            self._context.clear()

    def peek(self, *keys: str, limit: int | None = 5) -> dict[str, list[float]]:
        """The last ``limit`` stored values of ``keys`` (all keys if none), without consuming them."""
        wanted = [(k, v) for k, v in self._buffer.items() if v and (not keys or k in keys)]
        return {k: v[-limit:] if limit else list(v) for k, v in wanted}


class BufferManager:
    """``exp.metrics.buffer``: values buffered by ``metrics("x").buffer(...)``, logged by ``log_summary``."""

    __slots__ = ("_manager", "_buffers")

    def __init__(self, manager: MetricsManager) -> None:
        self._manager = manager
        self._buffers: dict[str | None, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def _store(self, name: str | None, **values: Any) -> None:
        for k, v in values.items():
            self._buffers[name][k].append(_as_float(k, v))

    def log_summary(self, *aggs: str, **context: object) -> None:
        """Log ``key.agg`` for every buffered metric (default ``mean``), then clear the buffers."""
        aggs = aggs or ("mean",)
        unknown = [a for a in aggs if a not in AGGREGATIONS]
        if unknown:
            raise ValueError(f"unknown aggregation {unknown[0]!r}; use one of {', '.join(AGGREGATIONS)}")
        for name, buffer in list(self._buffers.items()):
            point = {**context, **summarize_values(buffer, aggs)}
            if point:
                self._manager(name).log(**point)
        self._buffers.clear()

    def peek(self, name: str | None = None, *keys: str, limit: int | None = 5) -> dict[str, list[float]]:
        """Buffered values without consuming them (``name/key`` for all metrics when ``name`` is None)."""
        out: dict[str, list[float]] = {}
        for n, buffer in self._buffers.items():
            if name is not None and n != name:
                continue
            for k, v in buffer.items():
                if v and (not keys or k in keys):
                    key = k if name is not None else f"{n or '(default)'}/{k}"
                    out[key] = v[-limit:] if limit else list(v)
        return out


class Series:
    """One index-based series; ``exp.metrics("train")`` or ``session.track("loss")``."""

    __slots__ = ("_exp", "_name", "_folder", "_manager", "_next_index", "_cache")

    def __init__(self, exp: Experiment, name: str | None, folder: str, manager: MetricsManager | None = None,
                 description: str | None = None, tags: list[str] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> None:
        metric_dir_parts(name)
        self._exp = exp
        self._name = name
        self._folder = folder
        self._manager = manager
        self._next_index: int | None = None
        self._cache: SummaryCache | None = None
        self.describe(description, tags, metadata)

    @property
    def name(self) -> str | None:
        """The series name (None is ML-Dash's unnamed metric)."""
        return self._name

    def describe(self, description: str | None = None, tags: list[str] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> None:
        """Set the description, tags and metadata shown in the series' ``metadata.json``."""
        given = (("description", description), ("tags", tags), ("metadata", metadata))
        info = {k: v for k, v in given if v is not None}
        if info:
            target = "metric" if self._folder == "metrics" else "series"
            self._exp._emit(Kind.META, (target, self._name, info))

    def _send(self, points: list[dict[str, Any]]) -> None:
        for i in range(0, len(points), BATCH_POINTS):
            self._exp._emit(_METRIC, (self._name, points[i:i + BATCH_POINTS], self._folder))
        if self._next_index is not None:
            self._next_index += len(points)

    def _reserve(self, n: int) -> int:
        if self._next_index is None:
            if self._exp.dash_root is None:
                self._next_index = 0
                return 0
            self._exp._barrier()
            try:
                stats = _read.series_stats(self._exp.run_dir, self._folder, self._name)
                self._next_index = int(stats["totalDataPoints"])
            except FileNotFoundError:
                self._next_index = 0
        return self._next_index

    def log(self, _ts: object = None, **fields: object) -> Series:
        """Append one point; ``_ts`` (default now, ``-1`` reuses the last) is stored inside it."""
        fields["_ts"] = _now() if _ts is None else self._exp._resolve_ts(_ts)
        self._exp._emit(_METRIC, (self._name, [fields], self._folder))
        if self._next_index is not None:
            self._next_index += 1
        return self

    def append(self, **fields: object) -> dict[str, Any]:
        """Append one point and return ``{"index": ...}``."""
        start = self._reserve(1)
        ts = fields.pop("_ts", None)
        self.log(_ts=ts, **fields)
        return {"index": start, "name": self._name}

    def append_batch(self, points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Append many points at once; returns ``count``, ``startIndex`` and ``endIndex``."""
        start = self._reserve(len(points))
        now = time.time()
        batch = []
        for p in points:
            point = dict(p)
            ts = point.get("_ts")
            point["_ts"] = now if ts is None else self._exp._resolve_ts(ts)
            batch.append(point)
        self._send(batch)
        end = start + len(batch) - 1
        return {"count": len(batch), "startIndex": start, "endIndex": end, "name": self._name}

    def buffer(self, **values: object) -> Series:
        """Buffer values for ``exp.metrics.buffer.log_summary()``."""
        if self._manager is None:
            raise TypeError("buffer() belongs to exp.metrics(...) series")
        self._manager.buffer._store(self._name, **values)
        return self

    @property
    def summary_cache(self) -> SummaryCache:
        """This series' summary cache (created on first use)."""
        if self._cache is None:
            self._cache = SummaryCache(self)
        return self._cache

    def flush(self) -> Series:
        """Barrier: return once the agent has written what this thread sent."""
        self._exp.flush()
        return self

    def read(self, start_index: int = 0, limit: int = 1000) -> dict[str, Any]:
        """Points by index: ``data``, ``startIndex``, ``endIndex``, ``total``, ``hasMore``."""
        self._exp._barrier()
        return _read.read_series(self._exp.run_dir, self._folder, self._name, start_index, limit)

    def stats(self) -> dict[str, Any]:
        """Counts and metadata (``totalDataPoints``, ``bufferedDataPoints``, ...)."""
        self._exp._barrier()
        try:
            return _read.series_stats(self._exp.run_dir, self._folder, self._name)
        except FileNotFoundError:
            name = self._name
            return {"name": name, "totalDataPoints": "0", "bufferedDataPoints": "0", "chunkedDataPoints": "0"}

    def list_all(self) -> list[dict[str, Any]]:
        """Every series of the run in this folder, names with ``/`` included."""
        self._exp._barrier()
        return _read.list_series(self._exp.run_dir, self._folder)


MetricBuilder = Series


def series_in(
    cache: dict[Any, Series], exp: Experiment, name: str | None, folder: str, manager: MetricsManager | None,
    description: str | None, tags: list[str] | None, metadata: Mapping[str, Any] | None,
) -> Series:
    """The cached series ``name`` (created on first use); new description, tags or metadata are sent."""
    s = cache.get(name)
    if s is None:
        s = cache[name] = Series(exp, name, folder, manager, description, tags, metadata)
    elif description is not None or tags is not None or metadata is not None:
        s.describe(description, tags, metadata)
    return s


class MetricsManager:
    """``exp.metrics``: call it for a named metric; ``log`` writes to the unnamed one.

    The unnamed metric lives in ``metrics/None/`` with ``"name": null``, where ML-Dash's reader
    looks for it; a metric literally named ``"None"`` is refused, since ML-Dash would silently
    mix its points into the unnamed one.
    """

    __slots__ = ("_exp", "_series", "buffer")

    def __init__(self, exp: Experiment) -> None:
        self._exp = exp
        self._series: dict[str | None, Series] = {}
        self.buffer = BufferManager(self)

    def __call__(self, name: str | None = None, description: str | None = None, tags: list[str] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> Series:
        return series_in(self._series, self._exp, name, "metrics", self, description, tags, metadata)

    def log(self, _ts: object = None, _flush: bool = False, **fields: object) -> MetricsManager:
        """Scalars go to the unnamed metric; each dict value to its own metric, with the scalars."""
        ts = time.time() if _ts is None else self._exp._resolve_ts(_ts)
        scalars = {k: v for k, v in fields.items() if not isinstance(v, dict)}
        if scalars:
            self(None).log(_ts=ts, **scalars)
        for name, values in fields.items():
            if isinstance(values, dict):
                self(name).log(_ts=ts, **{**scalars, **values})
        if _flush:
            self.flush()
        return self

    def flush(self) -> MetricsManager:
        """Barrier: return once the agent has written what this thread sent."""
        self._exp.flush()
        return self

    def list_all(self) -> list[dict[str, Any]]:
        """Every metric of the run, names with ``/`` included."""
        self._exp._barrier()
        return _read.list_series(self._exp.run_dir, "metrics")
