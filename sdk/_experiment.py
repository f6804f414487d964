"""Experiment and its builders: the ML-Dash API, turned into frames on the hot path.

Every logging call validates what only the caller can fix (``_ts``, names, levels), packs one
frame and hands it to this thread's PUSH socket without blocking. Nothing is buffered in
this process beyond ZeroMQ's bounded queue, so ``kill -9`` of the training process loses at
most what had not yet left that queue, and the agent counts it.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from dashcar.proto import ConfigError, Kind, check_prefix, runtime_dir

from . import _agent, _logs, _remote, _transport
from ._files import FilesAccessor
from ._metrics import MetricsManager
from ._params import ParamsBuilder
from ._run import RUN, RunContext, resolve_template, split_prefix
from ._tracks import MISSING_TS, TracksManager

R = TypeVar("R")

log = logging.getLogger("dashcar")

FLUSH_TIMEOUT_S = 5.0
FLUSH_RESEND_S = 1.0
"""A barrier not confirmed within this long is sent again (the agent may have restarted)."""
_MISSING: Any = object()


_isfinite = math.isfinite


def check_ts(ts: object) -> float:
    """Validate a track timestamp: a finite real number, not a bool; else ``ValueError``."""
    t = type(ts)
    if t is float:
        if math.isfinite(ts):  # type: ignore[arg-type]
            return ts  # type: ignore[return-value]
    elif t is int:
        return float(ts)  # type: ignore[arg-type]
    elif ts is _MISSING:
        raise ValueError(MISSING_TS)
    elif t is not bool and hasattr(ts, "__float__") and not isinstance(ts, (str, bytes)):
        value = float(ts)
        if math.isfinite(value):
            return value
    raise ValueError(f"_ts must be a finite number of seconds (not a bool, str, NaN or inf), got {ts!r}; "
                     "pass it as a number, e.g. append(q=..., _ts=t)")


_open_experiments: set[Experiment] = set()
_open_lock = threading.Lock()


class Experiment:
    """One run: ``Experiment(prefix="owner/project/name", dash_root=".dash")``.

    ``dash_url="https://..."`` (``True``: ``$ML_DASH_API_URL`` or ``https://api.dash.ml``) has the
    agent send the run to that ML-Dash server too, with ``$DASHCAR_DASH_TOKEN`` or the ml-dash
    CLI's token; ``dash_root=None`` then keeps no local files (reads raise ``ConfigError``).

    The prefix may hold template fields (``{EXP.name}``, ``{now:%Y-%m-%d}``, ...: see ``RUN``);
    without one it is derived from ``RUN.prefix`` when the run first needs it. The seed spelling
    ``Experiment(name=..., project=..., local_path=...)`` stores the run at ``<project>/<name>``.
    ``readme`` (ML-Dash 0.11) and ``description`` are the same field. Logging never blocks:
    frames go to the local agent, which writes the ML-Dash layout under ``dash_root``.

    ``coalesce_ms`` (default ``$DASHCAR_COALESCE_MS`` or 0, at most 100) sends frames in
    groups: a call then usually only packs its frame, and a group leaves once its oldest frame
    has waited that long (checked on the next call), or at ``flush()``, a read, a close or exit.
    It applies to every thread of this process; frames still grouped when the process is
    killed are lost, and counted as such by the agent.
    """

    __slots__ = (
        "_prefix", "_dash_root", "_dash_url", "_local", "description", "tags", "metadata", "echo_logs", "_runtime_dir_arg",
        "_runtime_dir", "_transport", "_owner_pid", "_open", "_tls", "_coalesce_ms", "run", "params", "metrics", "tracks",
        "logs", "files",
    )

    def __init__(
        self,
        prefix: str | None = None,
        *,
        readme: str | None = None,
        description: str | None = None,
        tags: list[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        dash_root: str | os.PathLike[str] | None = ".dash",
        dash_url: str | bool | None = None,
        name: str | None = None,
        project: str | None = None,
        local_path: str | os.PathLike[str] | None = None,
        runtime_dir: str | os.PathLike[str] | None = None,
        echo_logs: bool | None = None,
        coalesce_ms: float | None = None,
    ) -> None:
        if readme is not None and description is not None and readme != description:
            raise ValueError("readme= and description= are the same field; pass one of them")
        self._open = False
        self._prefix = ""
        self._transport: _transport.Transport | None = None
        self._dash_url = _remote.api_url(dash_url, os.environ) if dash_url else None
        if local_path is not None and dash_root == ".dash":
            dash_root = local_path
        self._local = dash_root is not None
        if dash_root is not None:
            self._dash_root: str = os.path.normpath(os.path.abspath(os.fspath(dash_root)))
        elif self._dash_url is not None:
            self._dash_root = _remote.remote_root(self._dash_url)
        else:
            raise ValueError("dash_root=None keeps no local files, so the run needs dash_url='https://...' "
                             "(an ML-Dash server) to go anywhere; pass one, or a dash_root")
        self.description = readme if readme is not None else description
        self.tags = list(tags) if tags else []
        self.metadata = dict(metadata) if metadata else None
        self._runtime_dir_arg = runtime_dir
        self._runtime_dir: Path | None = None
        self._owner_pid = 0
        self._tls = threading.local()
        self.echo_logs = echo_logs if echo_logs is not None else os.environ.get("DASHCAR_ECHO", "1") != "0"
        self._coalesce_ms = _transport.check_coalesce_ms(coalesce_ms) if coalesce_ms is not None else None
        self.run = RunContext(self)
        if prefix is not None:
            self.run.prefix = prefix
        elif name is not None:
            owner_project = project if project is not None else resolve_template(RUN.project, self.run)
            self.run.prefix = f"{owner_project}/{name}"
        self.params = ParamsBuilder(self)
        self.metrics = MetricsManager(self)
        self.tracks = TracksManager(self)
        self.logs = _logs.LogBuilder(self)
        self.files = FilesAccessor(self)

    @property
    def prefix(self) -> str:
        """``owner/project/.../name``; setting it is setting ``exp.run.prefix``."""
        if not self._prefix:
            self.run.prefix = RUN.prefix
        return self._prefix

    @prefix.setter
    def prefix(self, value: str) -> None:
        self.run.prefix = value

    def _set_prefix(self, prefix: str) -> None:
        """Take a resolved prefix (validated here); a closed run reopens under it on the next call."""
        self._prefix = check_prefix(prefix.strip("/"))
        if not self._open:
            self._transport = None

    @property
    def name(self) -> str:
        """The last part of the prefix."""
        return split_prefix(self.prefix)[2]

    @property
    def project(self) -> str:
        """The second part of the prefix (the first of a two-part ``workspace/name``)."""
        return split_prefix(self.prefix)[1]

    @property
    def owner(self) -> str | None:
        """The first part of the prefix."""
        return split_prefix(self.prefix)[0]

    @property
    def readme(self) -> str | None:
        """ML-Dash 0.11's name for ``description``."""
        return self.description

    @readme.setter
    def readme(self, value: str | None) -> None:
        self.description = value

    @property
    def dash_root(self) -> str | None:
        """The absolute data root the run is written under (None: remote only, no local files)."""
        return self._dash_root if self._local else None

    @property
    def dash_url(self) -> str | None:
        """The ML-Dash server the agent sends the run to (None: local files only)."""
        return self._dash_url

    @property
    def run_dir(self) -> Path:
        """Where the agent writes this run's files; ``ConfigError`` for a run that keeps none."""
        if not self._local:
            raise ConfigError(
                f"run {self.prefix!r} keeps no local files (dash_root=None): it is only on {self._dash_url}; "
                "read it there, or give the run a dash_root to have local files as well"
            )
        return Path(self._dash_root, *self.prefix.split("/"))

    def start(self) -> Experiment:
        """Find (or spawn) the agent and open the run; logging before this opens it implicitly."""
        if self._open:
            return self
        prefix = self.prefix
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
        _owner, project, name = split_prefix(prefix)
        info = {
            "name": name,
            "project": project,
            "prefix": prefix,
            "description": self.description,
            "tags": self.tags,
            "metadata": self.metadata,
            "host": os.uname().nodename,
            "pid": os.getpid(),
            "argv": list(sys.argv),
            "started_at": time.time(),
        }
        if self._dash_url is not None:
            info.update(_remote.remote_info(self._dash_url, self._local, env))
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

    def log(self, message: str, level: str = "info", metadata: Mapping[str, Any] | None = None, **extra: Any) -> Experiment:
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
            p.poll_acks()
            if before is not None:
                p.send(before[0], self._dash_root, self._prefix, before[1], wait_s=left)
            seq = p.send(Kind.FLUSH, self._dash_root, self._prefix, (t.dropped(),), wait_s=left)
            if seq == 0:
                break
            wait_s = max(0.05, min(FLUSH_RESEND_S, deadline - time.monotonic()))
            reply = _agent.request(self._runtime_dir, {"op": "wait", "sid": p.sid, "seq": seq, "timeout_s": wait_s}, wait_s + 0.5)
            if reply is not None and reply.get("ok"):
                return True
        log.warning("dashcar: flush of %s not confirmed by the agent within %.1f s", self._prefix, timeout_s)
        return False

    def _barrier(self) -> None:
        """Before a read: wait until the agent wrote what this thread sent (skipped if no agent runs)."""
        if self._open and self._runtime_dir is not None and _agent.agent_running(self._runtime_dir):
            self.flush()

    def _resolve_ts(self, ts: Any) -> float:
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
        return t.producer().send(kind, self._dash_root, self._prefix, payload)

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
            t.producer().send(close[0], self._dash_root, self._prefix, close[1])
        self._open = False
        with _open_lock:
            _open_experiments.discard(self)

    def __repr__(self) -> str:
        where = f"dash_root={self.dash_root!r}" + (f", dash_url={self._dash_url!r}" if self._dash_url else "")
        return f"Experiment(prefix={self._prefix or '(derived when first needed)'!r}, {where})"


def exit_status() -> tuple[str, str | None]:
    """How the interpreter is ending, for runs still open: ``(status, reason)``.

    An exception the interpreter printed as unhandled (``sys.last_value``) fails the run, and
    Ctrl-C cancels it; a normal end completes it. ML-Dash 0.11 completes it in every case. An
    interactive session that went on after an error ends normally. A ``sys.exit(n)`` outside
    a ``with`` block cannot be told apart from a normal end: exit codes never reach atexit.
    """
    exc = getattr(sys, "last_value", None)
    if exc is None or hasattr(sys, "ps1"):
        return "completed", None
    if isinstance(exc, KeyboardInterrupt):
        return "cancelled", "KeyboardInterrupt"
    return "failed", f"{type(exc).__name__}: {exc}"


def _close_at_exit() -> None:
    """Close runs left open at interpreter exit with the status ``exit_status`` gives.

    No barrier here: the frames leave within the socket linger, and exit must not wait on an agent.
    """
    with _open_lock:
        pending = [e for e in _open_experiments if e._owner_pid == os.getpid()]
    status, reason = exit_status()
    for exp in pending:
        exp._close(status, reason, wait=False)


def dashcar_experiment(prefix: str | None = None, **options: Any) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Decorator: each call runs the function in a new run, passed as ``experiment=``.

    ``@dashcar_experiment(prefix="alice/project/exp", dash_root=".dash")`` takes the arguments
    of ``Experiment``; the run completes when the function returns and fails if it raises.
    ``ml_dash_experiment`` is the same decorator under ML-Dash's name.
    """

    def decorator(func: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> R:
            with Experiment(prefix, **options).run as experiment:
                kwargs["experiment"] = experiment
                return func(*args, **kwargs)

        return wrapper

    return decorator


ml_dash_experiment = dashcar_experiment
