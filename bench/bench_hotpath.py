"""Call cost of ``tracks(...).append`` in a paced 1 kHz loop, against the raw pyzmq+msgpack path.

The raw path is ``msgpack.packb`` of an equivalent dict + ``send(NOBLOCK)`` on a PUSH socket
to a PULL in another process, measured in the same run, so the ratio is the headline figure.
dashcar is measured with the agent up, up with 2 ms coalescing, down (killed after the run
opened: frames queue, then drop) and absent (never started); ``metrics("train").log`` of three
scalars and ``log(...)`` are measured against their own raw equivalents in the same run.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import msgpack
import zmq

import dashcar
from bench._util import Agent, emit, percentiles

COALESCE_MS = 2.0
STATE = {"q": [0.0] * 6, "qd": [0.0] * 6, "tau": [0.0] * 6, "gripper_pos": 0.04, "gripper_force": 10.0}


def _sink(endpoint: str, ready: Any) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.bind(endpoint)
    ready.set()
    while True:
        if s.recv() == b"stop":
            break
    s.close(0)
    ctx.term()


def _state(i: int) -> dict[str, Any]:
    t = i * 0.001
    return {"q": [math.sin(t + j) for j in range(6)], "qd": [math.cos(t + j) for j in range(6)],
            "tau": [0.1 * j for j in range(6)]}


def paced(call: Any, n: int, rate: float) -> list[int]:
    """Call ``call(i)`` n times at ``rate`` Hz; return each call's duration in ns."""
    period = 1.0 / rate
    out = [0] * n
    t0 = time.perf_counter()
    clock = time.perf_counter_ns
    for i in range(n):
        s = _state(i)
        a = clock()
        call(i, s)
        out[i] = clock() - a
        wait = t0 + (i + 1) * period - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
    return out


def tight(call: Any, n: int) -> tuple[list[int], float]:
    """Call ``call(i)`` n times back to back; durations in ns and calls/s."""
    out = [0] * n
    s = _state(0)
    clock = time.perf_counter_ns
    t0 = time.perf_counter()
    for i in range(n):
        a = clock()
        call(i, s)
        out[i] = clock() - a
    return out, n / (time.perf_counter() - t0)


class RawPath:
    """``packb`` of an equivalent dict + ``send(NOBLOCK)`` to a PULL in another process."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="dcr-", dir="/tmp")
        self.endpoint = f"ipc://{self.dir}/raw.sock"
        ready = mp.Event()
        self.proc = mp.Process(target=_sink, args=(self.endpoint, ready), daemon=True)
        self.proc.start()
        ready.wait()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.connect(self.endpoint)

    def call(self, i: int, st: dict[str, Any], packb: Any = msgpack.packb) -> None:
        try:
            row = {"topic": "robot/state", "_ts": i * 0.001, **st, "gripper_pos": 0.04, "gripper_force": 10.0}
            self.sock.send(packb(row), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def metric(self, i: int, st: dict[str, Any], packb: Any = msgpack.packb) -> None:
        try:
            point = {"name": "train", "loss": st["q"][0], "accuracy": st["qd"][0], "lr": 0.001, "_ts": i * 0.001}
            self.sock.send(packb(point), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def log(self, i: int, st: dict[str, Any], packb: Any = msgpack.packb) -> None:
        try:
            entry = {"message": "cycle done", "level": "info", "time": time.time(), "metadata": {"i": i}}
            self.sock.send(packb(entry), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        self.sock.send(b"stop")
        self.sock.close(1000)
        self.ctx.term()
        self.proc.join(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def sdk_call(exp: dashcar.Experiment) -> Any:
    """One ``tracks("robot/state").append`` of the 6-DOF state."""
    track = exp.tracks("robot/state")

    def call(i: int, st: dict[str, Any]) -> None:
        track.append(q=st["q"], qd=st["qd"], tau=st["tau"], gripper_pos=0.04, gripper_force=10.0, _ts=i * 0.001)

    return call


def _nothing() -> None:
    pass


def metric_call(exp: dashcar.Experiment) -> Any:
    """``metrics("train").log`` of 3 scalars."""
    metric = exp.metrics("train")

    def call(i: int, st: dict[str, Any]) -> None:
        metric.log(loss=st["q"][0], accuracy=st["qd"][0], lr=0.001)

    return call


def log_call(exp: dashcar.Experiment) -> Any:
    """``log(...)`` of one line with metadata."""

    def call(i: int, st: dict[str, Any]) -> None:
        exp.log("cycle done", metadata={"i": i})

    return call


def array_calls(exp: dashcar.Experiment, raw: RawPath) -> dict[str, Any]:
    """A 1000-float numpy array per call: dashcar (raw bytes) against the raw path (``tolist``)."""
    import numpy as np

    cloud = np.random.default_rng(0).random(1000)
    track = exp.tracks("lidar")

    def sdk(i: int, st: dict[str, Any]) -> None:
        track.append(cloud=cloud, _ts=i * 0.001)

    def plain(i: int, st: dict[str, Any], packb: Any = msgpack.packb) -> None:
        try:
            raw.sock.send(packb({"topic": "lidar", "_ts": i * 0.001, "cloud": cloud.tolist()}), zmq.NOBLOCK)
        except zmq.Again:
            pass

    return {"raw": plain, "sdk": sdk}


def interleaved(calls: dict[str, Any], seconds: float, rate: float, tight_n: int, blocks: int,
                turns: dict[str, tuple[Any, Any]] | None = None, idle: Any = _nothing) -> dict[str, Any]:
    """Measure each path in turns of ``seconds / blocks`` (paced) and ``tight_n / blocks`` calls (tight).

    Turns rather than one stretch per path: this machine's background noise drifts over
    seconds, and interleaving gives every path the same share of it; calls/s is the median
    over turns, so one turn that lost its core to another tenant does not set the figure. ``turns`` holds, per
    path, what to do (untimed) before and after each of its turns; ``idle`` waits until the
    agent has written everything, before each tight turn, so no turn pays for the last one's
    frames.
    """
    turns = turns or {}
    paced_s: dict[str, list[int]] = {k: [] for k in calls}
    tight_s: dict[str, list[int]] = {k: [] for k in calls}
    tight_rates: dict[str, list[float]] = {k: [] for k in calls}
    per_block = max(1, int(seconds * rate / blocks))
    for _ in range(blocks):
        for name, call in calls.items():
            enter, leave = turns.get(name, (_nothing, _nothing))
            enter()
            paced_s[name] += paced(call, per_block, rate)
            leave()
    for _ in range(blocks):
        for name, call in calls.items():
            enter, leave = turns.get(name, (_nothing, _nothing))
            idle()
            enter()
            t, cps = tight(call, max(1, tight_n // blocks))
            leave()
            tight_s[name] += t
            tight_rates[name].append(cps)
    return {
        name: {"paced": percentiles(paced_s[name]),
               "tight": {**percentiles(tight_s[name]), "calls_per_s": round(statistics.median(tight_rates[name]))}}
        for name in calls
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--tight", type=int, default=20_000)
    ap.add_argument("--blocks", type=int, default=10, help="turns each path gets, interleaved with the others")
    ap.add_argument("--quick", action="store_true", help="1 s, 2000 tight calls: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.tight, args.blocks = 1.0, 2000, 2
    raw = RawPath()
    with Agent("--merge-window-s", "1.0", *os.environ.get("BENCH_AGENT_ARGS", "").split()) as agent:
        os.environ.update(agent.env)
        up = dashcar.Experiment(prefix="bench/hotpath/up", dash_root=agent.data_dir, echo_logs=False).start()
        co = dashcar.Experiment(prefix="bench/hotpath/coalesced", dash_root=agent.data_dir).start()
        transport = up._transport
        assert transport is not None

        def coalescing_off() -> None:
            transport.set_coalescing(0)
            transport.producer().ship()

        same_run = interleaved(
            {"raw": raw.call, "up": sdk_call(up), "coalesced": sdk_call(co), "raw_metric": raw.metric, "metric": metric_call(up),
             "raw_log": raw.log, "log": log_call(up)},
            args.seconds, args.rate, args.tight, args.blocks,
            turns={"coalesced": (lambda: transport.set_coalescing(COALESCE_MS), coalescing_off)},
            idle=lambda: up.flush(30) and co.flush(30),
        )
        arrays = interleaved(array_calls(up, raw), 0, args.rate, args.tight // 4, args.blocks, idle=lambda: up.flush(30))
        up.complete()
        co.complete()
        down_exp = dashcar.Experiment(prefix="bench/hotpath/down", dash_root=agent.data_dir).start()
        assert down_exp.flush()
        agent.proc.kill()
        agent.proc.wait()
        down = interleaved({"down": sdk_call(down_exp)}, args.seconds, args.rate, args.tight, 1)["down"]
    raw.close()
    absent_exp = dashcar.Experiment(prefix="bench/hotpath/absent", dash_root=agent.data_dir).start()
    absent = interleaved({"absent": sdk_call(absent_exp)}, args.seconds, args.rate, args.tight, 1)["absent"]
    ratio = {k: round(same_run["up"]["paced"][k] / same_run["raw"]["paced"][k], 2) for k in ("p50_us", "p99_us")}
    emit("hotpath", {"raw": same_run["raw"], "sdk_agent_up": same_run["up"], "sdk_agent_up_coalesced": same_run["coalesced"],
                     "raw_metric": same_run["raw_metric"], "sdk_metric": same_run["metric"], "raw_log": same_run["raw_log"],
                     "sdk_log": same_run["log"], "array_1000_raw": arrays["raw"]["tight"],
                     "array_1000_sdk": arrays["sdk"]["tight"],
                     "sdk_agent_down": down, "sdk_agent_absent": absent, "paced_ratio_sdk_over_raw": ratio,
                     "coalesce_ms": COALESCE_MS,
                     "seconds": args.seconds, "rate_hz": args.rate})

if __name__ == "__main__":
    main()
