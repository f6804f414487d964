"""Timestamped tracks: ``exp.tracks("robot/state").append(q=..., _ts=t)`` and reading them back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, overload

from dashcar.proto import Kind, track_dir_name

from . import _read

_TRACK: Final = int(Kind.TRACK)
"""A plain int: enum member lookups cost more than the rest of a call's bookkeeping."""

if TYPE_CHECKING:
    from ._experiment import Experiment

_MISSING: object = object()


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

    def append(self, _ts: object = _MISSING, **fields: object) -> TrackBuilder:
        """Append one entry at ``_ts`` seconds (required; ``-1`` reuses this thread's previous one)."""
        if "timestamp" in fields:
            raise ValueError("'timestamp' is reserved for the row's _ts; rename the field")
        if _ts is _MISSING:
            raise ValueError("track entries need a timestamp: pass _ts=<seconds> (a finite number)")
        self._emit(_TRACK, (self._topic, self._exp._resolve_ts(_ts), fields))
        return self

    def flush(self) -> TrackBuilder:
        """Barrier: settle and write this thread's rows, then return."""
        self._exp.flush()
        return self

    @overload
    def read(
        self, start_timestamp: float | None = None, end_timestamp: float | None = None,
        columns: list[str] | None = None, format: Literal["json", "mocap"] = "json",
    ) -> dict[str, Any]: ...
    @overload
    def read(
        self, start_timestamp: float | None = None, end_timestamp: float | None = None,
        columns: list[str] | None = None, *, format: Literal["jsonl", "parquet"],
    ) -> bytes: ...
    @overload
    def read(
        self, start_timestamp: float | None = None, end_timestamp: float | None = None,
        columns: list[str] | None = None, format: str = "json",
    ) -> dict[str, Any] | bytes: ...
    def read(
        self, start_timestamp: float | None = None, end_timestamp: float | None = None,
        columns: list[str] | None = None, format: str = "json",
    ) -> dict[str, Any] | bytes:
        """Rows in a time range (inclusive) as ``json``, ``jsonl``, ``parquet`` or ``mocap``.

        ``json`` and ``mocap`` are dicts; ``jsonl`` and ``parquet`` (zstd) are bytes.
        """
        self._exp._barrier()
        run = self._exp.run_dir
        return _read.read_track(run, self._topic, start_timestamp, end_timestamp, columns, format)

    def list_entries(self) -> list[dict[str, Any]]:
        """Every row, as dicts with ``timestamp``."""
        entries: list[dict[str, Any]] = self.read()["entries"]
        return entries

    def slice(
        self, start_timestamp: float | None = None, end_timestamp: float | None = None
    ) -> _read.TrackSlice:
        """Rows of a time range, iterable, with ``findByTime`` (floor match)."""
        return _read.TrackSlice(self.read(start_timestamp, end_timestamp)["entries"])


class TracksManager:
    """``exp.tracks``: call it for a topic; ``flush()`` settles every topic; ``list()`` lists them."""

    def __init__(self, exp: Experiment) -> None:
        self._exp = exp
        self._builders: dict[str, TrackBuilder] = {}
        self._dirs: dict[str, str] = {}

    def __call__(self, topic: str, description: str | None = None, tags: list[str] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> TrackBuilder:
        builder = self._builders.get(topic)
        if builder is None:
            folder = track_dir_name(topic)
            other = self._dirs.get(folder)
            if other is not None and other != topic:
                raise ValueError(
                    f"track topics {other!r} and {topic!r} would share the folder tracks/{folder}; rename one"
                )
            self._dirs[folder] = topic
            builder = self._builders[topic] = TrackBuilder(self._exp, topic)
        given = (("description", description), ("tags", tags), ("metadata", metadata))
        info = {k: v for k, v in given if v is not None}
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
