"""DreamLake's ``Session``: index-based tracks, parameters and logs.

A session's files live under ``<local_path>/<workspace>/<name>``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from ._experiment import Experiment
from ._metrics import Series, series_in
from ._params import ParamsBuilder


class Session:
    """``with Session(name="demo", workspace="test", local_path="./data") as session: ...``"""

    __slots__ = ("name", "workspace", "_exp", "_tracks")

    def __init__(
        self,
        name: str,
        workspace: str = "default",
        local_path: str | os.PathLike[str] = ".dreamlake",
        *,
        description: str | None = None,
        tags: list[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        runtime_dir: str | os.PathLike[str] | None = None,
        echo_logs: bool | None = None,
    ) -> None:
        self.name = name
        self.workspace = workspace
        self._exp = Experiment(
            prefix=f"{workspace}/{name}", dash_root=local_path, description=description, tags=tags,
            metadata=metadata, runtime_dir=runtime_dir, echo_logs=echo_logs,
        )
        self._tracks: dict[str, Series] = {}

    @property
    def run_dir(self) -> Path:
        """Where the agent writes this session's files."""
        return self._exp.run_dir

    @property
    def params(self) -> ParamsBuilder:
        """``session.params(lr=...)`` or ``session.params.set(...)``."""
        return self._exp.params

    def parameters(self) -> ParamsBuilder:
        """``session.parameters().set(...)``."""
        return self._exp.params

    def track(self, name: str, description: str | None = None, tags: list[str] | None = None,
              metadata: Mapping[str, Any] | None = None) -> Series:
        """An index-based series stored as ``tracks/<name>/data.jsonl``."""
        return series_in(self._tracks, self._exp, name, "tracks", None, description, tags, metadata)

    def log(
        self, message: str, level: str = "info", metadata: Mapping[str, Any] | None = None, **extra: Any
    ) -> None:
        """Write one log line."""
        self._exp.log(message, level=level, metadata=metadata, **extra)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Barrier: True once the agent has written everything this thread sent."""
        return self._exp.flush(timeout_s)

    def open(self) -> Session:
        """Start the session (``with`` does this)."""
        self._exp.start()
        return self

    def close(self, status: str = "completed") -> None:
        """Close the session with ``completed``, ``failed`` or ``cancelled``."""
        closers: dict[str, Callable[[], None]] = {
            "completed": self._exp.complete, "failed": self._exp.fail, "cancelled": self._exp.cancel,
        }
        closers[status]()

    def __enter__(self) -> Session:
        return self.open()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._exp._close_for(ev)
