"""Experiment and its builders: the ML-Dash API, turned into frames on the hot path.

Every logging call validates what only the caller can fix (``_ts``, names, levels), packs one
frame and hands it to this thread's PUSH socket without blocking. Nothing is buffered in
this process beyond ZeroMQ's bounded queue, so ``kill -9`` of the training process loses at
most what had not yet left that queue, and the agent counts it.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from dashcar.proto import Kind, check_prefix, runtime_dir

from . import _agent, _logs, _transport
from ._metrics import MetricsManager
from ._params import ParamsBuilder
from ._tracks import TracksManager

log = logging.getLogger("dashcar")

FLUSH_TIMEOUT_S = 5.0
FLUSH_RESEND_S = 1.0
"""A barrier not confirmed within this long is sent again (the agent may have restarted)."""
_MISSING: object = object()


_isfinite = math.isfinite


def check_ts(ts: object) -> float:
    """Validate a track timestamp: a finite real number, not a bool; else ``ValueError``."""
    if type(ts) is float:
        if math.isfinite(ts):
            return ts
    elif type(ts) is int:
        return float(ts)
    elif ts is _MISSING:
        raise ValueError("track entries need a timestamp: pass _ts=<seconds> (a finite number)")
    elif type(ts) is not bool and hasattr(ts, "__float__") and not isinstance(ts, (str, bytes)):
        value = float(ts)
        if math.isfinite(value):
            return value
    raise ValueError(f"_ts must be a finite number (not bool, NaN or inf), got {ts!r}")


class RunContext:
    """``exp.run``: a context manager plus ``start/complete/fail/cancel``."""

    def __init__(self, exp: Experiment) -> None:
        self._exp = exp

    def start(self) -> Experiment:
        """Open the run (idempotent) and return the experiment."""
        return self._exp.start()

    def complete(self) -> None:
        """Close the run as completed."""
        self._exp.complete()

    def fail(self, reason: str | None = None) -> None:
        """Close the run as failed."""
        self._exp.fail(reason)

    def cancel(self) -> None:
        """Close the run as cancelled."""
        self._exp.cancel()

    def __enter__(self) -> Experiment:
        return self._exp.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._exp._close_for(ev)


_open_experiments: set[Experiment] = set()
_open_lock = threading.Lock()


class Experiment:
    """One run: ``Experiment(prefix="owner/project/name", dash_root=".dash")``.

    The seed spelling ``Experiment(name=..., project=..., local_path=...)`` stores the run at
    ``<local_path>/<project>/<name>``. Logging never blocks: frames go to the local agent,
    which stores them durably and writes the ML-Dash layout under ``dash_root``.

    ``coalesce_ms`` (default ``$DASHCAR_COALESCE_MS`` or 0, at most 100) sends frames in
    groups: a call then usually only packs its frame, and a group leaves once its oldest frame
    has waited that long (checked on the next call), or at ``flush()``, a read, a close or exit.
    It applies to every thread of this process; frames still grouped when the process is
    killed are lost, and counted as such by the agent.
    """

    def __init__(
        self,
        prefix: str | None = None,
        *,
        dash_root: str | os.PathLike[str] | None = None,
        name: str | None = None,
        project: str | None = None,
        local_path: str | os.PathLike[str] | None = None,
        description: str | None = None,
        tags: list[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        runtime_dir: str | os.PathLike[str] | None = None,
        echo_logs: bool | None = None,
        coalesce_ms: float | None = None,
    ) -> None:
        if prefix is None:
            if name is None:
                raise ValueError(
                    "Experiment needs prefix='owner/project/name' or name=... (with project=...)"
                )
            owner_project = project if project is not None else f"{_user()}/scratch"
            prefix = f"{owner_project}/{name}"
        self.prefix: str = check_prefix(prefix.strip("/"))
        parts = self.prefix.split("/")
        self.name = parts[-1]
        self.project = parts[1] if len(parts) > 2 else parts[0]
        root = dash_root if dash_root is not None else (local_path if local_path is not None else ".dash")
        self.dash_root: str = os.path.normpath(os.path.abspath(os.fspath(root)))
        self.description = description
        self.tags = list(tags) if tags else []
        self.metadata = dict(metadata) if metadata else None
        self._runtime_dir_arg = runtime_dir
        self._runtime_dir: Path | None = None
        self._transport: _transport.Transport | None = None
        self._owner_pid = 0
        self._open = False
        self._tls = threading.local()
        self.echo_logs = echo_logs if echo_logs is not None else os.environ.get("DASHCAR_ECHO", "1") != "0"
        self._coalesce_ms = _transport.check_coalesce_ms(coalesce_ms) if coalesce_ms is not None else None
        self.run = RunContext(self)
        self.params = ParamsBuilder(self)
        self.metrics = MetricsManager(self)
        self.tracks = TracksManager(self)
        self.logs = _logs.LogBuilder(self)

    @property
    def run_dir(self) -> Path:
        """Where the agent writes this run's files."""
        return Path(self.dash_root, *self.prefix.split("/"))

    def start(self) -> Experiment:
        """Find (or spawn) the agent and open the run; logging before this opens it implicitly."""
        if self._open:
            return self
        env = os.environ
        rd = Path(self._runtime_dir_arg) if self._runtime_dir_arg is not None else runtime_dir(env)
        self._runtime_dir = rd
        if env.get("DASHCAR_AUTOSPAWN", "1") != "0":
            _agent.ensure_agent(rd, env)
        self._transport = _transport.get_transport(rd)
        if self._coalesce_ms is not None:
            self._transport.set_coalescing(self._coalesce_ms)
        self._owner_pid = os.getpid()
        self._open = True
        with _open_lock:
            if not _open_experiments:
                atexit.register(_close_at_exit)
            _open_experiments.add(self)
        info = {
            "name": self.name,
            "project": self.project,
            "prefix": self.prefix,
            "description": self.description,
            "tags": self.tags,
            "metadata": self.metadata,
            "host": os.uname().nodename,
            "pid": os.getpid(),
            "argv": list(sys.argv),
            "started_at": time.time(),
        }
        self._emit(Kind.RUN_OPEN, info)
        return self

    def complete(self) -> None:
        """Close the run as completed (waits for the agent to write it, bounded)."""
        self._close("completed", None)

    def fail(self, reason: str | None = None) -> None:
        """Close the run as failed, with an optional reason."""
        self._close("failed", reason)

    def cancel(self) -> None:
        """Close the run as cancelled."""
        self._close("cancelled", None)

    def log(
        self, message: str, level: str = "info", metadata: Mapping[str, Any] | None = None, **extra: Any
    ) -> Experiment:
        """Write one log line; ``level`` is one of debug, info, warn, error, fatal."""
        _logs.write(self, message, level, metadata, extra)
        return self

    def parameters(self) -> ParamsBuilder:
        """``exp.parameters().set(...)``: the same builder as ``exp.params``."""
        return self.params

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Barrier: True once the agent has written everything this thread sent before it.

        Frames lost on the way (an agent killed inside its commit window) count as handled:
        the agent reports them as missing. A barrier lost that way is sent again.
        """
        return self._flush(timeout_s)

    def _flush(self, timeout_s: float, before: tuple[int, object] | None = None) -> bool:
        if not self._open:
            return True
        t = self._live_transport()
        p = t.producer()
        assert self._runtime_dir is not None
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if before is not None:
                p.send(before[0], self.dash_root, self.prefix, before[1], wait_s=left)
            seq = p.send(Kind.FLUSH, self.dash_root, self.prefix, (t.dropped(),), wait_s=left)
            if seq == 0:
                break
            wait_s = max(0.05, min(FLUSH_RESEND_S, deadline - time.monotonic()))
            wait = {"op": "wait", "sid": p.sid, "seq": seq, "timeout_s": wait_s}
            reply = _agent.request(self._runtime_dir, wait, wait_s + 0.5)
            if reply is not None and reply.get("ok"):
                return True
        log.warning("dashcar: flush of %s not confirmed by the agent within %.1f s", self.prefix, timeout_s)
        return False

    def _barrier(self) -> None:
        """Before a read: wait until the agent wrote what this thread sent (skipped if no agent runs)."""
        if self._open and self._runtime_dir is not None and _agent.agent_running(self._runtime_dir):
            self.flush()

    def _resolve_ts(self, ts: object) -> float:
        if type(ts) is float and ts != -1.0 and _isfinite(ts):
            self._tls.last_ts = ts
            return ts
        if ts == -1 and type(ts) is not bool:
            last: float | None = getattr(self._tls, "last_ts", None)
            if last is None:
                raise ValueError("_ts=-1 reuses this thread's previous timestamp, but there is none yet")
            return last
        value = check_ts(ts)
        self._tls.last_ts = value
        return value

    def _live_transport(self) -> _transport.Transport:
        t = self._transport
        if t is None:
            self.start()
            t = self._transport
            assert t is not None
        if t.stale:
            assert self._runtime_dir is not None
            t = self._transport = _transport.get_transport(self._runtime_dir)
        return t

    def _emit(self, kind: int, payload: object) -> int:
        t = self._transport
        if t is None or t.stale:
            t = self._live_transport()
        return t.producer().send(kind, self.dash_root, self.prefix, payload)

    def _close_for(self, exc: BaseException | None) -> None:
        if exc is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            self._close("completed", None)
        elif isinstance(exc, KeyboardInterrupt):
            self._close("cancelled", "KeyboardInterrupt")
        else:
            self._close("failed", f"{type(exc).__name__}: {exc}")

    def _close(self, status: str, reason: str | None, *, wait: bool = True) -> None:
        if not self._open:
            return
        t = self._live_transport()
        close = (Kind.RUN_CLOSE, (status, reason, t.dropped())) if os.getpid() == self._owner_pid else None
        if wait:
            self._flush(FLUSH_TIMEOUT_S, before=close)
        elif close is not None:
            t.producer().send(close[0], self.dash_root, self.prefix, close[1])
        self._open = False
        with _open_lock:
            _open_experiments.discard(self)

    def __repr__(self) -> str:
        return f"Experiment(prefix={self.prefix!r}, dash_root={self.dash_root!r})"


def _close_at_exit() -> None:
    """Close runs left open at interpreter exit: failed if an exception is ending it.

    No barrier here: the frames leave within the socket linger, and exit must not wait on an agent.
    """
    with _open_lock:
        pending = [e for e in _open_experiments if e._owner_pid == os.getpid()]
    failed = getattr(sys, "last_value", None)
    for exp in pending:
        if failed is not None:
            exp._close("failed", f"{type(failed).__name__}: {failed}", wait=False)
        else:
            exp._close("completed", None, wait=False)


def _user() -> str:
    return os.environ.get("USER") or os.environ.get("LOGNAME") or "local"
