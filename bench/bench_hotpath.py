"""Call cost of ``tracks(...).append`` in a paced 1 kHz loop, against the raw pyzmq+msgpack path.

The raw path is ``msgpack.packb`` of an equivalent dict + ``send(NOBLOCK)`` on a PUSH socket
to a PULL in another process, measured in the same run, so the ratio is the headline figure.
dashcar is measured with the agent up, up with 2 ms coalescing, down (killed after the run
opened: frames queue, then drop) and absent (never started).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
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
    return {"q": [math.sin(t + j) for j in range(6)], "qd": [math.cos(t + j) for j in range(6)], "tau": [0.1 * j for j in range(6)]}


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


def raw_path(seconds: float, rate: float, tight_n: int) -> dict[str, Any]:
    d = tempfile.mkdtemp(prefix="dcr-", dir="/tmp")
    endpoint = f"ipc://{d}/raw.sock"
    ready = mp.Event()
    proc = mp.Process(target=_sink, args=(endpoint, ready), daemon=True)
    proc.start()
    ready.wait()
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 100_000)
    s.connect(endpoint)
    packb = msgpack.packb

    def call(i: int, st: dict[str, Any]) -> None:
        try:
            s.send(packb({"topic": "robot/state", "_ts": i * 0.001, **st, "gripper_pos": 0.04, "gripper_force": 10.0}), zmq.NOBLOCK)
        except zmq.Again:
            pass

    p = paced(call, int(seconds * rate), rate)
    t, cps = tight(call, tight_n)
    s.send(b"stop")
    s.close(1000)
    ctx.term()
    proc.join(5)
    return {"paced": percentiles(p), "tight": {**percentiles(t), "calls_per_s": round(cps)}}


def sdk_path(exp: dashcar.Experiment, seconds: float, rate: float, tight_n: int) -> dict[str, Any]:
    track = exp.tracks("robot/state")

    def call(i: int, st: dict[str, Any]) -> None:
        track.append(q=st["q"], qd=st["qd"], tau=st["tau"], gripper_pos=0.04, gripper_force=10.0, _ts=i * 0.001)

    p = paced(call, int(seconds * rate), rate)
    t, cps = tight(call, tight_n)
    return {"paced": percentiles(p), "tight": {**percentiles(t), "calls_per_s": round(cps)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--tight", type=int, default=20_000)
    ap.add_argument("--quick", action="store_true", help="1 s, 2000 tight calls: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.tight = 1.0, 2000
    raw = raw_path(args.seconds, args.rate, args.tight)
    with Agent("--merge-window-s", "1.0") as agent:
        os.environ.update(agent.env)
        exp = dashcar.Experiment(prefix="bench/hotpath/up", dash_root=agent.data_dir).start()
        up = sdk_path(exp, args.seconds, args.rate, args.tight)
        exp.complete()
        co = dashcar.Experiment(prefix="bench/hotpath/coalesced", dash_root=agent.data_dir, coalesce_ms=COALESCE_MS).start()
        coalesced = sdk_path(co, args.seconds, args.rate, args.tight)
        co.complete()
        down_exp = dashcar.Experiment(prefix="bench/hotpath/down", dash_root=agent.data_dir, coalesce_ms=0).start()
        assert down_exp.flush()
        agent.proc.kill()
        agent.proc.wait()
        down = sdk_path(down_exp, args.seconds, args.rate, args.tight)
    absent_exp = dashcar.Experiment(prefix="bench/hotpath/absent", dash_root=agent.data_dir).start()
    absent = sdk_path(absent_exp, args.seconds, args.rate, args.tight)
    ratio = {k: round(up["paced"][k] / raw["paced"][k], 2) for k in ("p50_us", "p99_us")}
    emit("hotpath", {"raw": raw, "sdk_agent_up": up, "sdk_agent_up_coalesced": coalesced, "sdk_agent_down": down,
                     "sdk_agent_absent": absent, "paced_ratio_sdk_over_raw": ratio, "coalesce_ms": COALESCE_MS,
                     "seconds": args.seconds, "rate_hz": args.rate})

if __name__ == "__main__":
    main()
