"""Who may reach the agent: a private runtime dir (one user), or one shared with a group.

Private (the default): the runtime dir is 0700 and everything in it is the agent user's.
Shared (``socket_group``, a system agent serving several users): the runtime dir is 0750 and
the group's, the sockets 0660 (connecting to a Unix socket needs write access to it), the
agent lock 0640 (the SDK probes it to see an agent runs) and ``producers/`` 0770 (each
producer keeps its counter file there, 0640 and given to the directory's group by the SDK, so
the agent can read it after the producer died; no setgid bit, which the system unit's
``RestrictSUIDSGID=`` forbids).
"""

from __future__ import annotations

import grp
import os
from pathlib import Path

from dashcar.proto import COUNTERS_DIR, ConfigError, ensure_private_dir


def group_id(name: str) -> int | None:
    """The gid of ``socket_group`` (a name or a number), None when it is empty."""
    if not name:
        return None
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(
            f"socket_group {name!r} does not exist; create it (groupadd {name}) or leave socket_group empty"
        ) from None


def share(path: Path, gid: int | None, mode: int) -> None:
    """Give ``path`` to group ``gid`` with ``mode`` (nothing when the agent is private)."""
    if gid is None:
        return
    try:
        os.chown(path, -1, gid)
        os.chmod(path, mode)
    except OSError as exc:
        raise ConfigError(f"cannot give {path} to group {gid}: {exc.strerror}; run the agent as a member of that group") from exc


def prepare_runtime_dir(path: Path, gid: int | None) -> Path:
    """Create the runtime dir: private (0700) or shared with ``gid`` (0750, ``producers/`` 0770)."""
    if gid is None:
        return ensure_private_dir(path)
    path.mkdir(mode=0o750, parents=True, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != os.getuid():
        raise ConfigError(f"{path} is owned by uid {st.st_uid}, not by the agent's user; remove it or pick another runtime_dir")
    share(path, gid, 0o750)
    producers = path / COUNTERS_DIR
    producers.mkdir(exist_ok=True)
    share(producers, gid, 0o770)
    return path
