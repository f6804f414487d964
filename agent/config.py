"""Agent settings: one frozen tree, the only place that defines a setting and its default.

Precedence: built-in defaults < TOML file (``--config``) < ``DASHCAR_<NAME>`` environment
variables < command-line flags (``--<name>``). The CLI reads its flag list from here.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dashcar.proto import ConfigError, runtime_dir, state_dir


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Every agent setting; field names are the config keys, env names and flag names."""

    runtime_dir: Path
    state_dir: Path
    wal_max_bytes: int = 16 * 1024**3
    wal_sync: bool = True
    merge_window_s: float = 1.0
    max_open_rows: int = 20_000
    ingest_batch: int = 4096
    group_commit_s: float = 0.02
    core_batch: int = 8192
    rcvhwm: int = 1024
    watch_interval_s: float = 0.25
    shutdown_timeout_s: float = 10.0
    nice: int = 0
    sink_nice: int = 10
    log_level: str = "INFO"
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
    archive_roll_rows: int = 100_000
    archive_roll_bytes: int = 8 << 20
    archive_roll_s: float = 60.0
    """An archive object is written once it has this many rows, this many bytes, this age, or its run ended."""

    def sink_specs(self) -> list[str]:
        """The sinks to run, in order, each once; ``dash`` always (a run may name its own server)."""
        specs: list[str] = []
        for spec in self.sinks.split(","):
            spec = spec.strip()
            if spec and spec not in specs:
                specs.append(spec)
        if "dash" not in specs:
            specs.append("dash")
        return specs


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
    values: dict[str, object] = {}
    if path:
        # Every use of tomllib sits under the version check, which mypy (python_version 3.10) reads as never taken.
        if sys.version_info >= (3, 11):
            import tomllib

            try:
                with open(path, "rb") as fp:
                    values.update(tomllib.load(fp))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read config {path}: {exc}") from exc
        else:
            raise ConfigError("a TOML config needs Python 3.11+; use DASHCAR_* variables instead")
    for f in dataclasses.fields(AgentConfig):
        env = environ.get(f"DASHCAR_{f.name.upper()}")
        if env is not None and env != "":
            values[f.name] = env
    for k, v in (flags or {}).items():
        if v is not None:
            values[k] = v
    unknown = set(values) - {f.name for f in dataclasses.fields(AgentConfig)}
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    kinds = {f.name: f.type for f in dataclasses.fields(AgentConfig)}
    typed = {k: _convert(k, kinds[k], v) for k, v in values.items()}
    typed.setdefault("runtime_dir", runtime_dir(environ))
    typed.setdefault("state_dir", state_dir(environ))
    return AgentConfig(**typed)  # type: ignore[arg-type]
