"""``dashcar agent``: flags → config → lock → logging → ``anyio.run(service.serve)``.

The agent lock (``agent.lock`` in the runtime dir, an exclusive ``flock`` held for the
process lifetime) is taken before anything heavy is imported, so a second agent on the same
runtime dir refuses at once, and the SDK's spawn wait ends as soon as this one holds it.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import sys
from typing import Final

from dashcar.proto import AGENT_LOCK, ConfigError, ensure_private_dir

from . import logs

OK: Final = 0
STARTUP_FAILURE: Final = 3
ALREADY_RUNNING: Final = 4

_lock_fd: int | None = None


def build_parser() -> argparse.ArgumentParser:
    """The agent's flags: one per config setting, named as in ``AgentConfig``."""
    from .config import TUNABLES

    p = argparse.ArgumentParser(prog="dashcar agent", description="Run the dashcar agent in the foreground.")
    p.add_argument(
        "--runtime-dir", help="sockets and lock (default: $DASHCAR_RUNTIME_DIR, $XDG_RUNTIME_DIR/dashcar, /tmp/dashcar-UID)"
    )
    p.add_argument("--state-dir", help="WAL and agent state (default: $DASHCAR_STATE_DIR, $XDG_STATE_HOME/dashcar)")
    p.add_argument("--config", help="TOML file with settings (overridden by DASHCAR_* variables and flags)")
    p.add_argument("--detach", action="store_true", help="run in the background, detached from the caller's session")
    for f in TUNABLES:
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, help=f"(default {f.default})")
    return p


def _detach() -> None:
    """Double fork: the agent ends up in its own session, nobody's child, holding no caller stdio."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)


def _take_lock(runtime_dir: str) -> bool:
    global _lock_fd
    fd = os.open(os.path.join(runtime_dir, AGENT_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _lock_fd = fd
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the agent; returns a process exit code."""
    from . import config

    args = build_parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "detach")}
    try:
        cfg = config.load(os.environ, flags, args.config)
        ensure_private_dir(cfg.runtime_dir)
        ensure_private_dir(cfg.state_dir)
    except ConfigError as exc:
        sys.stderr.write(f"dashcar agent: {exc}\n")
        return STARTUP_FAILURE
    if args.detach:
        _detach()
    if not _take_lock(str(cfg.runtime_dir)):
        sys.stderr.write(f"dashcar agent: another agent already serves {cfg.runtime_dir}\n")
        return ALREADY_RUNNING
    logs.setup(cfg.log_level)
    if cfg.nice:
        os.nice(cfg.nice)
    import anyio

    from . import service
    from .errors import WALCorrupt

    try:
        clean = anyio.run(service.serve, cfg, backend="asyncio")
    except (WALCorrupt, ConfigError) as exc:
        logging.getLogger(__name__).error("cannot start: %s", exc)
        return STARTUP_FAILURE
    except KeyboardInterrupt:
        return OK
    if not clean:
        # A stalled upload's thread would hold the exit until the network gives up (a minute).
        logging.shutdown()
        os._exit(OK)
    return OK
