"""Where the agent's sockets and state live: resolved the same way by the SDK and the agent."""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from ._errors import ConfigError

COUNTERS_DIR: Final = "producers"
COUNTER: Final = struct.Struct("=QQQ")
"""A producer's counter file, updated per call: (last seq handed to ZeroMQ, frames dropped,
frames waiting in its coalescing buffer)."""


def counter_path(runtime_dir: Path, pid: int, sid: int) -> Path:
    """Where producer ``sid`` of process ``pid`` keeps its counters, for the agent to read after it dies."""
    return runtime_dir / COUNTERS_DIR / f"{pid}-{sid:016x}"


def parse_counter_name(name: str) -> tuple[int, int] | None:
    """``(pid, sid)`` of a counter file name, or None if it is not one."""
    pid, _, sid = name.partition("-")
    try:
        return int(pid), int(sid, 16)
    except ValueError:
        return None


def runtime_dir(environ: Mapping[str, str]) -> Path:
    """``DASHCAR_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/dashcar``, else ``/tmp/dashcar-<uid>``."""
    explicit = environ.get("DASHCAR_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    xdg = environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "dashcar"
    return Path(f"/tmp/dashcar-{os.getuid()}")


def state_dir(environ: Mapping[str, str]) -> Path:
    """``DASHCAR_STATE_DIR``, else ``$XDG_STATE_HOME/dashcar``, else ``~/.local/state/dashcar``."""
    explicit = environ.get("DASHCAR_STATE_DIR")
    if explicit:
        return Path(explicit)
    xdg = environ.get("XDG_STATE_HOME")
    if xdg:
        return Path(xdg) / "dashcar"
    return Path(environ.get("HOME", os.path.expanduser("~"))) / ".local" / "state" / "dashcar"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` as a 0700 directory of this user; refuse one another user owns."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a directory; remove it or set DASHCAR_RUNTIME_DIR")
    if st.st_uid != os.getuid():
        raise ConfigError(
            f"{path} is owned by uid {st.st_uid}, not by you; set DASHCAR_RUNTIME_DIR to a dir of yours"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path
