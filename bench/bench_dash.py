"""Shipping to an ML-Dash server: frames/s from 4 producers to a loopback server, with JSONL's rate in the same run.

The server is the recording ML-Dash server of the tests (``tests/fakes/mldash_server.py``) in
its own process, honouring ``Idempotency-Key``; the agent ships every run to it (its
``dash_url``) and writes JSONL at the same time. Producers log 6-DOF ``tracks(...).append``
rows with distinct timestamps (one frame, one row), as in ``bench_ingest``.

- ``dash_frames_per_s``: frames / seconds from the producers' start until the server holds
  every row and every run's status (``flush --remote`` would return then);
- ``jsonl_frames_per_s``: frames / seconds until JSONL has written every frame, same run;
  ``jsonl_alone_frames_per_s`` the same with no server to ship to (an agent without ``dash_url``);
- ``backlog``: the same frames logged while the server is down (connection refused), then the
  server started: rows/s from its start until it holds everything.

DESIGN §4: shipping ≥ 50 000 frames/s while local JSONL keeps its own rate.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench._util import Agent, emit
from bench.bench_ingest import producer

REPO = Path(__file__).resolve().parent.parent


class Server:
    """The recording ML-Dash server in its own process."""

    def __init__(self, port: int = 0) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.mldash_server", "--port", str(port)],
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()

    def summary(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_fake/summary", timeout=10) as r:
            result: dict[str, Any] = json.load(r)
            return result

    def rows(self, tag: str) -> tuple[int, int]:
        """Rows held for this tag's runs, and how many of those runs are marked completed."""
        exps = {k: v for k, v in self.summary()["experiments"].items() if f"/{tag}-" in k}
        return sum(sum(e["tracks"].values()) for e in exps.values()), sum(e["status"] == "COMPLETED" for e in exps.values())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(agent: Agent, tag: str, producers: int, frames: int) -> tuple[list[Any], Any, Any]:
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=producer, args=(agent.env, str(agent.data_dir), f"bench/dash/{tag}-p{i}", frames, ready, go, out))
             for i in range(producers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    return procs, go, out


def run(producers: int, frames: int, ship: bool = True) -> dict[str, Any]:
    """Producers → agent → JSONL and (``ship``) the server at once."""
    server = Server()
    try:
        with Agent("--merge-window-s", "0.2", *(["--dash-url", server.url] if ship else [])) as agent:
            procs, go, out = _start(agent, "live" if ship else "alone", producers, frames)
            total = producers * frames
            base = agent.status()["frames"]["written"]
            t0 = time.perf_counter()
            go.set()
            t_jsonl = t_dash = None
            dropped: list[int] = []
            while t_dash is None or t_jsonl is None:
                now = time.perf_counter() - t0
                while len(dropped) < producers and not out.empty():
                    dropped.append(out.get())
                want = total - sum(dropped) if len(dropped) == producers else total
                if t_jsonl is None and agent.status()["frames"]["written"] - base >= want:
                    t_jsonl = now
                if not ship:
                    t_dash = now
                elif t_dash is None:
                    rows, done = server.rows("live")
                    if rows >= want and done == producers:
                        t_dash = now
                if now > 600:
                    break
                time.sleep(0.02)
            for p in procs:
                p.join(60)
            st = agent.status()["sinks"]["dash"]
            result: dict[str, Any] = {
                "producers": producers, "frames": total, "dropped_by_producers": sum(dropped),
                "jsonl_frames_per_s": round(total / t_jsonl) if t_jsonl else None,
            }
            if ship:
                result.update(dash_frames_per_s=round(total / t_dash) if t_dash else None,
                              requests=st["remote"]["counters"].get("requests", 0), rows_on_server=server.rows("live")[0])
            return result
    finally:
        server.close()


def backlog(producers: int, frames: int) -> dict[str, Any]:
    """The same frames logged with the server down, then the server started: its catch-up rate."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with Agent("--merge-window-s", "0.2", "--dash-url", url, "--dash-retry-max-s", "0.5") as agent:
        procs, go, out = _start(agent, "backlog", producers, frames)
        total = producers * frames
        go.set()
        total -= sum(out.get(timeout=600) for _ in procs)
        for p in procs:
            p.join(120)
        deadline = time.monotonic() + 600
        while agent.status()["sinks"]["dash"]["lag"]["frames"] < total and time.monotonic() < deadline:
            time.sleep(0.05)
        server = Server(port)
        try:
            t0 = time.perf_counter()
            while True:
                rows, done = server.rows("backlog")
                if rows >= total and done == producers:
                    break
                if time.perf_counter() - t0 > 600:
                    break
                time.sleep(0.02)
            dt = time.perf_counter() - t0
            return {"frames": total, "rows_per_s": round(rows / dt), "seconds": round(dt, 2)}
        finally:
            server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--producers", type=int, default=4)
    ap.add_argument("--frames", type=int, default=400_000, help="in total, split over the producers")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.frames = 40_000
    alone = run(args.producers, args.frames // args.producers, ship=False)
    r = run(args.producers, args.frames // args.producers)
    emit("dash", {**r, "jsonl_alone_frames_per_s": alone["jsonl_frames_per_s"]})
    emit("dash_backlog", backlog(args.producers, args.frames // args.producers))


if __name__ == "__main__":
    main()
