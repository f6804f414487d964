"""Helpers shared by the benchmarks: private agent processes, percentiles, JSON + markdown output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dashcar import _agent


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    """p50/p99/p99.9/max of nanosecond samples, in microseconds."""
    s = sorted(samples_ns)
    n = len(s)

    def at(q: float) -> float:
        return round(s[min(n - 1, int(q * n))] / 1000, 2)

    return {"p50_us": at(0.5), "p99_us": at(0.99), "p999_us": at(0.999), "max_us": round(s[-1] / 1000, 2), "n": n}


class Agent:
    """A private agent subprocess (own runtime and state dirs), stopped on exit."""

    def __init__(self, *args: str) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="dcb-", dir="/tmp"))
        self.runtime_dir = self.base / "rt"
        self.state_dir = self.base / "state"
        self.data_dir = self.base / "data"
        self.env = {**os.environ, "DASHCAR_RUNTIME_DIR": str(self.runtime_dir), "DASHCAR_STATE_DIR": str(self.state_dir),
                    "DASHCAR_AUTOSPAWN": "0"}
        self.args = args
        self.log = open(self.base / "agent.log", "wb")  # noqa: SIM115 - open for the agent's lifetime, closed in close()
        self.restart()

    def restart(self) -> None:
        """Start the agent process (again, after a kill) and wait until it answers."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dashcar.agent", "--runtime-dir", str(self.runtime_dir), "--state-dir", str(self.state_dir),
             *self.args],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env=self.env,
        )
        deadline = time.monotonic() + 20
        while not _agent.request(self.runtime_dir, {"op": "ping"}, 0.2):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("agent did not start")

    def status(self) -> dict[str, Any]:
        st = _agent.request(self.runtime_dir, {"op": "status"}, 10.0)
        assert st is not None
        return st

    def pids(self) -> list[int]:
        """The agent and its ingest process."""
        out = [self.proc.pid]
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            out += [int(p) for p in (task / "children").read_text().split()]
        return out

    def rss_anon_kb(self) -> int:
        """Private memory of the agent's processes together (LMDB's mapped pages are page cache)."""
        total = 0
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
        return total

    def close(self) -> None:
        """Stop the agent and remove its directories (``BENCH_KEEP=1`` keeps them, with ``agent.log``)."""
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def emit(name: str, result: dict[str, Any]) -> None:
    """Print one benchmark's result as a JSON line on stdout."""
    print(json.dumps({"bench": name, **result}), flush=True)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
