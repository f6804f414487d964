"""Shared fixtures: a real agent subprocess in private directories, and producer subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dashcar import _agent, _transport

READY_TIMEOUT_S = 20.0


def wait_until(predicate: Any, timeout_s: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.01)


@dataclass
class AgentHandle:
    """A real ``python -m dashcar.agent`` process in its own runtime and state dirs."""

    runtime_dir: Path
    state_dir: Path
    data_dir: Path
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DASHCAR_RUNTIME_DIR=str(self.runtime_dir),
            DASHCAR_STATE_DIR=str(self.state_dir),
            DASHCAR_AUTOSPAWN="0",
        )
        return env

    def start(self) -> AgentHandle:
        assert self.proc is None or self.proc.poll() is not None, "agent already running"
        self.log_path = self.state_dir.parent / "agent.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dashcar.agent", "--runtime-dir", str(self.runtime_dir),
                 "--state-dir", str(self.state_dir), *self.extra_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env(),
            )
        wait_until(lambda: self.proc.poll() is not None or self.request({"op": "ping"}, 0.2), READY_TIMEOUT_S, "agent ready")
        assert self.proc.poll() is None, f"agent exited at start:\n{self.log()}"
        return self

    def request(self, msg: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any] | None:
        return _agent.request(self.runtime_dir, msg, timeout_s)

    def status(self) -> dict[str, Any]:
        st = self.request({"op": "status"})
        assert st is not None, f"agent did not answer status:\n{self.log()[-4000:]}"
        return st

    def flush(self) -> None:
        reply = self.request({"op": "flush", "timeout_s": 20.0}, 21.0)
        assert reply and reply["ok"], "agent flush failed"

    def stop(self, timeout_s: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def pids(self) -> list[int]:
        """The agent and its ingest process."""
        assert self.proc is not None
        ingest = self.status()["ingest_pid"]
        return [self.proc.pid] + ([ingest] if ingest else [])

    def signal_all(self, signum: int, pids: list[int]) -> None:
        """Send ``signum`` to each of ``pids`` (the agent's processes, from ``pids()``)."""
        for pid in pids:
            os.kill(pid, signum)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


@pytest.fixture
def dirs() -> Iterator[Path]:
    """A short private temp dir (IPC socket paths must stay under ~100 bytes)."""
    base = Path(tempfile.mkdtemp(prefix="dc-", dir="/tmp"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def agent_factory(dirs: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Make (not start) agents in private dirs; every one is stopped at teardown."""
    made: list[AgentHandle] = []

    def make(*extra_args: str) -> AgentHandle:
        h = AgentHandle(dirs / "rt", dirs / "state", dirs / "data", list(extra_args))
        made.append(h)
        monkeypatch.setenv("DASHCAR_RUNTIME_DIR", str(h.runtime_dir))
        monkeypatch.setenv("DASHCAR_STATE_DIR", str(h.state_dir))
        monkeypatch.setenv("DASHCAR_AUTOSPAWN", "0")
        monkeypatch.setenv("DASHCAR_LINGER_MS", "200")
        return h

    yield make
    _transport.close_all()
    for h in made:
        if h.proc is not None and h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait(10)


@pytest.fixture
def agent(agent_factory: Callable[..., AgentHandle]) -> AgentHandle:
    """A running agent with a short merge window."""
    return agent_factory("--merge-window-s", "0.2").start()


def run_producer(code: str, env: dict[str, str], timeout_s: float = 60.0, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run producer code in a fresh Python process; fail with its output if it fails."""
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout_s, **kw
    )
    assert res.returncode == 0, f"producer failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture
def producers() -> Iterator[Any]:
    """Start producer code in fresh Python processes (stdin/stdout piped for handshakes); all reaped at teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(code: str, env: dict[str, str]) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file, parsed; asserts no torn line."""
    text = path.read_text()
    assert text == "" or text.endswith("\n"), f"{path} ends with a torn line"
    return [json.loads(line) for line in text.splitlines()]


def read_json(path: Path) -> Any:
    """A JSON file's value, or None if it does not exist (yet)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


@pytest.fixture
def anyio_backend() -> str:
    """pyzmq's async sockets are asyncio sockets: the in-process agent runs on asyncio."""
    return "asyncio"
