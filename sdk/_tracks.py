"""Timestamped tracks: ``exp.tracks("robot/state").append(q=..., _ts=t)`` and reading them back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from dashcar.proto import Kind, track_dir_name

from . import _read

MISSING_TS: Final = "a track entry needs its timestamp: pass _ts=<seconds>, e.g. append(q=..., _ts=t) (a finite number)"

_TRACK: Final = int(Kind.TRACK)
"""A plain int: enum member lookups cost more than the rest of a call's bookkeeping."""

if TYPE_CHECKING:
    from ._experiment import Experiment

_MISSING: Any = object()


class TrackBuilder:
    """One topic: rows keyed by ``_ts``; entries with an equal ``_ts`` merge into one row."""

    __slots__ = ("_exp", "_topic", "_emit")

    def __init__(self, exp: Experiment, topic: str) -> None:
        self._exp = exp
        self._topic = topic
        self._emit = exp._emit

    @property
    def topic(self) -> str:
        """The topic name, e.g. ``robot/state``."""
        return self._topic

    def append(self, _ts: Any = _MISSING, **fields: Any) -> TrackBuilder:
        """Append one entry at ``_ts`` seconds (required; ``-1`` reuses this thread's previous one).

        A field named ``timestamp`` raises ``ValueError``: ML-Dash 0.11 lets it silently replace
        the row's ``_ts``, so the entry lands at another time.
        """
        if "timestamp" in fields:
            raise ValueError(f"track {self._topic!r}: 'timestamp' is the row's own key, written from _ts; rename the field")
        if _ts is _MISSING:
            raise ValueError(f"tracks({self._topic!r}).append: {MISSING_TS}")
        self._emit(_TRACK, (self._topic, self._exp._resolve_ts(_ts), fields))
        return self

    def flush(self) -> TrackBuilder:
        """Barrier: settle and write this thread's rows, then return."""
        self._exp.flush()
        return self

    def read(self, start_timestamp: float | None = None, end_timestamp: float | None = None,
             columns: list[str] | None = None, format: str = "json") -> Any:
        """Rows in a time range (inclusive) as ``json``, ``jsonl``, ``parquet`` or ``mocap``."""
        self._exp._barrier()
        return _read.read_track(self._exp.run_dir, self._topic, start_timestamp, end_timestamp, columns, format)

    def list_entries(self) -> list[dict[str, Any]]:
        """Every row, as dicts with ``timestamp``."""
        return self.read()["entries"]  # type: ignore[no-any-return]

    def slice(self, start_timestamp: float | None = None, end_timestamp: float | None = None) -> _read.TrackSlice:
        """Rows of a time range, iterable, with ``findByTime`` (floor match)."""
        return _read.TrackSlice(self.read(start_timestamp, end_timestamp)["entries"])


class TracksManager:
    """``exp.tracks``: call it for a topic; ``flush()`` settles every topic; ``list()`` lists them."""

    __slots__ = ("_exp", "_builders", "_dirs")

    def __init__(self, exp: Experiment) -> None:
        self._exp = exp
        self._builders: dict[str, TrackBuilder] = {}
        self._dirs: dict[str, str] = {}

    def __call__(self, topic: str, description: str | None = None, tags: list[str] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> TrackBuilder:
        builder = self._builders.get(topic)
        if builder is not None and description is None and tags is None and metadata is None:
            return builder
        if builder is None:
            folder = track_dir_name(topic)
            other = self._dirs.get(folder)
            if other is not None and other != topic:
                raise ValueError(f"track topics {other!r} and {topic!r} would share the folder tracks/{folder}; rename one")
            self._dirs[folder] = topic
            builder = self._builders[topic] = TrackBuilder(self._exp, topic)
        info = {k: v for k, v in (("description", description), ("tags", tags), ("metadata", metadata)) if v is not None}
        if info:
            self._exp._emit(Kind.META, ("track", topic, info))
        return builder

    def flush(self) -> TracksManager:
        """Barrier: settle and write every topic this thread sent to, then return."""
        self._exp.flush()
        return self

    def list(self, topic_filter: str | None = None) -> list[dict[str, Any]]:
        """Tracks of the run, optionally filtered by a topic or ``prefix/*``."""
        self._exp._barrier()
        return _read.list_tracks(self._exp.run_dir, topic_filter)
