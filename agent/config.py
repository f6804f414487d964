"""Agent settings: one frozen tree, the only place that defines a setting and its default.

Precedence: built-in defaults < TOML file (``--config``) < ``DASHCAR_<NAME>`` environment
variables < command-line flags (``--<name>``). The CLI reads its flag list from here.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from dashcar.proto import ConfigError, runtime_dir, state_dir


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Every agent setting; field names are the config keys, env names and flag names."""

    runtime_dir: Path
    """Sockets, the agent lock and the producers' counter files."""
    state_dir: Path
    """The WAL, sink state, dead letters and (auto-started agents) agent.log."""
    wal_max_bytes: int = 16 * 1024**3
    """Cap of the WAL on disk; near it ingest drops frames and counts them."""
    wal_sync: bool = True
    """fsync every WAL commit (off: faster, but a power cut loses the last commits)."""
    merge_window_s: float = 1.0
    """Track entries with an equal ``_ts`` merge within this window before their row settles."""
    max_open_rows: int = 20_000
    """Open track rows kept before the oldest settle early."""
    ingest_batch: int = 4096
    """Most messages in one WAL transaction."""
    group_commit_s: float = 0.02
    """Longest a received message waits for its WAL commit."""
    core_batch: int = 8192
    """Most WAL records per core step."""
    rcvhwm: int = 1024
    """ZeroMQ receive queue bound of the ingest socket."""
    watch_interval_s: float = 0.25
    """How often producer pids are checked (and the event loop's liveness shown to systemd)."""
    shutdown_timeout_s: float = 10.0
    """Drain deadline on SIGTERM or ``dashcar stop``; the systemd unit's TimeoutStopSec lies above it."""
    nice: int = 0
    """Nice levels the whole agent gives up."""
    sink_nice: int = 10
    """Further nice levels of the core and sink threads."""
    log_level: str = "INFO"
    """DEBUG, INFO, WARNING or ERROR (nothing per frame is logged above DEBUG)."""
    metrics_address: str = ""
    """Prometheus endpoint as ``host:port`` (a bare port listens on 127.0.0.1); empty: off."""
    data_roots: str = ""
    """Comma-separated data roots runs may be written under; empty: any root the agent may write."""
    socket_group: str = ""
    """Group of the users a shared agent serves: its sockets, lock and producer dir become theirs."""
    sinks: str = "jsonl"
    """Comma-separated sink names (``dashcar.agent.sinks.REGISTRY``) or ``module:Class`` specs."""
    dash_url: str = ""
    """ML-Dash server every run ships to (a run's own ``dash_url`` wins); empty: only runs that ask."""
    dash_token_file: str = ""
    """File holding the token for ``dash_url`` (a run's own token wins); re-read when it changes."""
    dash_timeout_s: float = 30.0
    """The agent's own deadline for one request to an ML-Dash server, connecting included."""
    dash_retry_max_s: float = 30.0
    """Longest backoff between retries to an ML-Dash server (a longer ``Retry-After`` is still honoured)."""
    archive_uri: str = ""
    """``s3://bucket/prefix`` or ``file:///path``: every run also goes there as Parquet; empty: off."""
    archive_endpoint: str = ""
    """S3 endpoint for MinIO, Ceph, SeaweedFS (else ``AWS_ENDPOINT_URL``, else AWS)."""
    archive_roll_rows: int = 20_000
    archive_roll_bytes: int = 8 << 20
    archive_roll_s: float = 60.0
    """The archive writes objects once this many frames (rows) wait, an object would pass this many bytes,
    the oldest waiting frame is this old, its run ended, or a flush asks; one send decodes at most this
    many frames (about 1.3 KB each for a 6-DOF state), so rows also bound its memory."""
    archive_timeout_s: float = 30.0
    """An archive upload that takes longer is abandoned and retried (pyarrow's own stall timeouts run far longer)."""

    def sink_specs(self) -> list[str]:
        """The sinks to run, in order, each once; ``dash`` always (a run may name its own server),
        ``archive`` too when ``archive_uri`` is set."""
        specs: list[str] = []
        for spec in self.sinks.split(","):
            spec = spec.strip()
            if spec and spec not in specs:
                specs.append(spec)
        if "dash" not in specs:
            specs.append("dash")
        if self.archive_uri and "archive" not in specs:
            specs.append("archive")
        return specs

    def allowed_roots(self) -> tuple[str, ...]:
        """The data roots of ``data_roots`` as absolute normalised paths; empty means any root."""
        return tuple(os.path.normpath(os.path.abspath(r.strip())) for r in self.data_roots.split(",") if r.strip())


def root_allowed(root: str, allowed: tuple[str, ...]) -> bool:
    """True if ``root`` is one of ``allowed`` or lies under one (``allowed`` empty: always)."""
    if not allowed:
        return True
    root = os.path.normpath(root)
    return any(root == a or root.startswith(a.rstrip("/") + "/") for a in allowed)


@functools.cache
def field_help() -> dict[str, str]:
    """Each setting's help: the first sentence of the docstring under its field (read from this file)."""
    import ast

    try:
        with open(__file__, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return {}
    helps: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "AgentConfig":
            body = node.body
            for stmt, nxt in itertools.pairwise(body):
                if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                        and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                    helps[stmt.target.id] = " ".join(nxt.value.value.split()).replace("``", "`")
    return helps


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` → ``(host, port)``; a bare port (or ``:port``) is on 127.0.0.1; ``[v6]:port`` works.

    :raises ValueError: with what to write instead.
    """
    text = address.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"metrics_address {address!r} is not host:port; write e.g. 127.0.0.1:9464") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"metrics_address {address!r}: port {number} is not in 0..65535")
    return host, number


_USERINFO: Final = re.compile(r"(://)[^/@\s]+@")
"""``scheme://user:secret@host``: what ``describe`` hides of a URL."""

SOURCES: Final = ("default", "file", "env", "flag")
"""Where a setting's value came from, lowest precedence first."""


TUNABLES = [f for f in dataclasses.fields(AgentConfig) if f.name not in ("runtime_dir", "state_dir")]


def _convert(name: str, kind: Any, raw: object) -> object:
    try:
        if kind in (bool, "bool"):
            if isinstance(raw, bool):
                return raw
            return str(raw).strip().lower() in ("1", "true", "yes", "on")
        if kind in (int, "int"):
            return int(raw)  # type: ignore[call-overload]
        if kind in (float, "float"):
            return float(raw)  # type: ignore[arg-type]
        if kind in (Path, "Path"):
            return Path(str(raw))
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}={raw!r} is not a valid {kind}") from exc


def load(environ: Mapping[str, str], flags: Mapping[str, object] | None = None, path: str | None = None) -> AgentConfig:
    """Resolve the configuration from a TOML file, the environment and flags (pure but for reading ``path``)."""
    return load_with_sources(environ, flags, path)[0]


def config_path(environ: Mapping[str, str], given: str | None = None) -> str | None:
    """The TOML file to read: ``--config``, else ``$DASHCAR_CONFIG``, else none."""
    return given or environ.get("DASHCAR_CONFIG") or None


def load_with_sources(
    environ: Mapping[str, str], flags: Mapping[str, object] | None = None, path: str | None = None
) -> tuple[AgentConfig, dict[str, str]]:
    """The configuration and, per setting, where its value came from (one of ``SOURCES``)."""
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    if path:
        # Every use of tomllib sits under the version check, which mypy (python_version 3.10) reads as never taken.
        if sys.version_info >= (3, 11):
            import tomllib

            try:
                with open(path, "rb") as fp:
                    loaded = tomllib.load(fp)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read config {path}: {exc}; fix the file or leave out --config") from exc
            for k, v in loaded.items():
                values[k] = ",".join(str(x) for x in v) if isinstance(v, list) else v
                sources[k] = "file"
        else:
            raise ConfigError("a TOML config needs Python 3.11+; use DASHCAR_* variables instead")
    for f in dataclasses.fields(AgentConfig):
        env = environ.get(f"DASHCAR_{f.name.upper()}")
        if env is not None and env != "":
            values[f.name] = env
            sources[f.name] = "env"
    for k, v in (flags or {}).items():
        if v is not None:
            values[k] = v
            sources[k] = "flag"
    unknown = set(values) - {f.name for f in dataclasses.fields(AgentConfig)}
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}; `dashcar config show` lists the settings")
    kinds = {f.name: f.type for f in dataclasses.fields(AgentConfig)}
    typed = {k: _convert(k, kinds[k], v) for k, v in values.items()}
    if "runtime_dir" not in typed:
        typed["runtime_dir"] = runtime_dir(environ)
        sources["runtime_dir"] = "env" if environ.get("XDG_RUNTIME_DIR") else "default"
    if "state_dir" not in typed:
        typed["state_dir"] = state_dir(environ)
        sources["state_dir"] = "env" if environ.get("XDG_STATE_HOME") else "default"
    cfg = AgentConfig(**typed)  # type: ignore[arg-type]
    if cfg.metrics_address:
        try:
            parse_address(cfg.metrics_address)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    for f in dataclasses.fields(AgentConfig):
        sources.setdefault(f.name, "default")
    return cfg, sources


def describe(cfg: AgentConfig, sources: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every setting as ``{name, value, source, help, env, flag}``, in definition order (for ``config show``)."""
    helps = field_help()
    out = []
    for f in dataclasses.fields(AgentConfig):
        value = getattr(cfg, f.name)
        if isinstance(value, str):
            value = _USERINFO.sub(r"\1***@", value)
        out.append({
            "name": f.name, "value": str(value) if isinstance(value, Path) else value, "source": sources.get(f.name, "default"),
            "help": helps.get(f.name, ""), "env": f"DASHCAR_{f.name.upper()}", "flag": "--" + f.name.replace("_", "-"),
        })
    return out
