"""What every command shares: exit codes, the one-line error, consoles, the agent's address."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Final

from rich.console import Console

from dashcar import _agent
from dashcar.proto import runtime_dir

OK: Final = 0
"""Done; for ``status``, the agent is healthy."""
FAILED: Final = 1
"""The command could not do what was asked; the message says why and what to do."""
USAGE: Final = 2
"""Bad arguments (argparse's own code)."""
NO_AGENT: Final = 3
"""No agent answers at the runtime dir."""
UNHEALTHY: Final = 4
"""The agent answers but is losing data or failing (``status``), or ``doctor`` found a problem."""
TIMEOUT: Final = 5
"""The agent did not finish in time (``flush``, ``stop``)."""
INTERRUPTED: Final = 130
"""Ctrl-C ended a command that does not end by itself otherwise (``tail`` and ``status --watch`` exit 0)."""

EXIT_CODES: Final = {
    OK: "OK", FAILED: "FAILED", USAGE: "USAGE", NO_AGENT: "NO_AGENT", UNHEALTHY: "UNHEALTHY", TIMEOUT: "TIMEOUT",
    INTERRUPTED: "INTERRUPTED",
}

REPLY_TIMEOUT_S: Final = 3.0


class CliError(Exception):
    """A failure the user can act on: one line on stderr, then exit with ``code``."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


def _width(stream: object) -> int | None:
    """The terminal's width, or (piped into a file or a pager) ``$COLUMNS`` else 160, not rich's 80."""
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return None
    try:
        return int(os.environ.get("COLUMNS", "160"))
    except ValueError:
        return 160


def out() -> Console:
    """The console for results (stdout)."""
    return Console(highlight=False, markup=False, width=_width(sys.stdout))


def err() -> Console:
    """The console for progress and notes (stderr), never mixed into results."""
    return Console(stderr=True, highlight=False, markup=False, width=_width(sys.stderr))


def agent_dir(args: argparse.Namespace) -> Path:
    """``--runtime-dir``, else the directory the SDK and the agent find by themselves."""
    given = getattr(args, "runtime_dir", None)
    return Path(given) if given else runtime_dir(os.environ)


def ask(args: argparse.Namespace, msg: dict[str, object], timeout_s: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
    """One control request; ``CliError(NO_AGENT)`` when no agent answers."""
    where = agent_dir(args)
    reply = _agent.request(where, msg, timeout_s)
    if reply is None:
        raise CliError(
            f"no agent answers at {where}; start one (dashcar agent, or systemctl --user start dashcar-agent) "
            "or pass --runtime-dir", NO_AGENT,
        )
    return reply


def try_ask(args: argparse.Namespace, msg: dict[str, object], timeout_s: float = REPLY_TIMEOUT_S) -> dict[str, Any] | None:
    """One control request; None when no agent answers."""
    return _agent.request(agent_dir(args), msg, timeout_s)


def human_bytes(n: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float | None) -> str:
    """``3725`` → ``1h 2m 5s``."""
    if s is None:
        return "-"
    s = max(0.0, s)
    if s < 10:
        return f"{s:.1f}s"
    total = int(s)
    d, rest = divmod(total, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    if d:
        return f"{d}d {h}h {m}m"
    if h:
        return f"{h}h {m}m {sec}s"
    return f"{m}m {sec}s" if m else f"{sec}s"


def is_tty() -> bool:
    """True when stdout is a terminal (live views and colour)."""
    return sys.stdout.isatty()
