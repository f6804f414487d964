"""Log lines: ``exp.log(...)`` and ``exp.logs.info(...)``, validated levels, optional console echo."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from dashcar.proto import LOG_LEVELS, Kind

_LOG: Final = int(Kind.LOG)

if TYPE_CHECKING:
    from ._experiment import Experiment

_ALIASES = {"warning": "warn", "critical": "fatal"}


def check_level(level: str) -> str:
    """The canonical level name, or ``ValueError`` naming the valid ones."""
    lvl = _ALIASES.get(level, level) if isinstance(level, str) else level
    if lvl not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    return lvl


def echo(message: str, level: str, metadata: Mapping[str, Any] | None) -> None:
    """Print a log line as ML-Dash does: ``[LEVEL] message [k=v, ...]``, errors to stderr."""
    extra = f" [{', '.join(f'{k}={v}' for k, v in metadata.items())}]" if metadata else ""
    stream = sys.stderr if level in ("error", "fatal") else sys.stdout
    print(f"[{level.upper()}] {message}{extra}", file=stream)


def write(
    exp: Experiment, message: str, level: str, metadata: Mapping[str, Any] | None, extra: dict[str, Any]
) -> None:
    """Validate and send one log line."""
    lvl = check_level(level)
    meta = {**metadata, **extra} if metadata else (extra or None)
    if exp.echo_logs:
        echo(str(message), lvl, meta)
    exp._emit(_LOG, (str(message), lvl, time.time(), meta))


class LogBuilder:
    """``exp.logs``: one method per level, extra keyword arguments become metadata."""

    __slots__ = ("_exp",)

    def __init__(self, exp: Experiment) -> None:
        self._exp = exp

    def debug(self, message: str, **metadata: object) -> None:
        """Log at debug level."""
        write(self._exp, message, "debug", None, metadata)

    def info(self, message: str, **metadata: object) -> None:
        """Log at info level."""
        write(self._exp, message, "info", None, metadata)

    def warn(self, message: str, **metadata: object) -> None:
        """Log at warn level."""
        write(self._exp, message, "warn", None, metadata)

    warning = warn

    def error(self, message: str, **metadata: object) -> None:
        """Log at error level."""
        write(self._exp, message, "error", None, metadata)

    def fatal(self, message: str, **metadata: object) -> None:
        """Log at fatal level."""
        write(self._exp, message, "fatal", None, metadata)
