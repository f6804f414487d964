"""``dashcar agent``: flags → config → lock → logging → ``anyio.run(service.serve)``.

The agent lock (``agent.lock`` in the runtime dir, an exclusive ``flock`` held for the
process lifetime) is taken before anything heavy is imported, so a second agent on the same
runtime dir refuses at once, and the SDK's spawn wait ends as soon as this one holds it.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import logging
import os
import sys
from typing import Final

from dashcar.proto import AGENT_LOCK, ConfigError, ensure_private_dir

from . import logs
from .access import group_id, prepare_runtime_dir, share

OK: Final = 0
FAILED: Final = 1
STARTUP_FAILURE: Final = 6
"""The agent could not start: a setting, the WAL, the runtime dir or the metrics address (the log says which)."""
ALREADY_RUNNING: Final = 7
"""Another agent holds this runtime dir's lock."""

EXAMPLE: Final = """examples:
  dashcar agent                                   # foreground, settings from DASHCAR_* and defaults
  dashcar agent --config /etc/dashcar/agent.toml --metrics-address 127.0.0.1:9464
  DASHCAR_MERGE_WINDOW_S=0.5 dashcar agent --runtime-dir /tmp/dc-rt --state-dir /tmp/dc-state

exit codes: 0 stopped cleanly, 1 failed while running, 2 bad arguments, 6 could not start, 7 already running
"""

_lock_fd: int | None = None


def build_parser() -> argparse.ArgumentParser:
    """The agent's flags: one per config setting, named as in ``AgentConfig``."""
    from .config import TUNABLES, field_help

    p = argparse.ArgumentParser(
        prog="dashcar agent", description="Run the dashcar agent in the foreground (systemd runs it so, too).",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--runtime-dir", help="sockets and lock (default: $DASHCAR_RUNTIME_DIR, $XDG_RUNTIME_DIR/dashcar, /tmp/dashcar-UID)"
    )
    p.add_argument("--state-dir", help="WAL and agent state (default: $DASHCAR_STATE_DIR, $XDG_STATE_HOME/dashcar)")
    p.add_argument("--config", help="TOML file with settings (default: $DASHCAR_CONFIG; overridden by DASHCAR_* and flags)")
    p.add_argument("--detach", action="store_true", help="run in the background, detached from the caller's session")
    helps = field_help()
    for f in TUNABLES:
        text = helps.get(f.name, "").replace("%", "%%")
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar="V",
                       help=f"{text} (default {f.default!r})" if text else f"(default {f.default!r})")
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
        cfg, sources = config.load_with_sources(os.environ, flags, config.config_path(os.environ, args.config))
        gid = group_id(cfg.socket_group)
        prepare_runtime_dir(cfg.runtime_dir, gid)
        ensure_private_dir(cfg.state_dir)
    except ConfigError as exc:
        sys.stderr.write(f"dashcar agent: {exc}\n")
        return STARTUP_FAILURE
    if args.detach:
        _detach()
    if not _take_lock(str(cfg.runtime_dir)):
        sys.stderr.write(f"dashcar agent: another agent already serves {cfg.runtime_dir}; `dashcar status` shows it, "
                         "`dashcar stop` stops it\n")
        return ALREADY_RUNNING
    if gid is not None:
        share(cfg.runtime_dir / AGENT_LOCK, gid, 0o640)
    logs.setup(cfg.log_level)
    if cfg.nice:
        os.nice(cfg.nice)
    import anyio

    from . import service
    from .errors import WALCorrupt

    try:
        clean = anyio.run(functools.partial(service.serve, cfg, sources=sources), backend="asyncio")
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
