"""The call at 1 kHz while other producers keep the agent busy, against the raw path in the same run.

Two background producer processes burst into the agent (about 20 000 frames/s each, in bursts
of 2000 frames), so ingest, the core and the JSONL sink stay busy. The measured process logs a
6-DOF state at 1 kHz, in interleaved one-second turns: the raw path (``packb`` + PUSH
``NOBLOCK`` to a PULL in another process), dashcar, and dashcar with coalescing. The goal
(DESIGN §4): p99.9 and max within 2× the raw path's in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from typing import Any

from bench._util import Agent, emit, percentiles
from bench.bench_hotpath import COALESCE_MS, RawPath, paced, sdk_call


def _burster(env: dict[str, str], root: str, idx: int, rate: float, stop: Any) -> None:
    os.environ.update(env)
    import dashcar

    exp = dashcar.Experiment(prefix=f"bench/loaded/bg{idx}", dash_root=root, echo_logs=False).start()
    track = exp.tracks("robot/state")
    q = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    burst, i = 2000, 0
    t0 = time.perf_counter()
    while not stop.is_set():
        for _ in range(burst):
            track.append(q=q, qd=q, tau=q, _ts=i * 0.001)
            i += 1
        wait = t0 + i / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
    exp.complete()


def run(seconds: int, bg_rate: float) -> dict[str, Any]:
    import dashcar
    from dashcar import _transport

    with Agent("--merge-window-s", "0.2") as agent:
        os.environ.update(agent.env)
        ctx = mp.get_context("spawn")
        stop = ctx.Event()
        bg = [ctx.Process(target=_burster, args=(agent.env, str(agent.data_dir), i, bg_rate, stop)) for i in range(2)]
        for p in bg:
            p.start()
        raw = RawPath()
        plain = dashcar.Experiment(prefix="bench/loaded/fg", dash_root=agent.data_dir, echo_logs=False).start()
        grouped = dashcar.Experiment(prefix="bench/loaded/fgc", dash_root=agent.data_dir, echo_logs=False,
                                     coalesce_ms=0).start()
        calls = {"raw": raw.call, "dashcar": sdk_call(plain), "dashcar_coalesced": sdk_call(grouped)}
        samples: dict[str, list[int]] = {k: [] for k in calls}
        time.sleep(1.0)
        before = agent.status()["frames"]
        t0 = time.perf_counter()
        transport = _transport.get_transport(agent.runtime_dir)
        for _ in range(seconds):
            for name, call in calls.items():
                transport.set_coalescing(COALESCE_MS if name == "dashcar_coalesced" else 0)
                samples[name] += paced(call, 1000, 1000.0)
        elapsed = time.perf_counter() - t0
        after = agent.status()["frames"]
        stop.set()
        for p in bg:
            p.join(60)
        plain.complete()
        grouped.complete()
        raw.close()
        busy = round((after["received"] - before["received"]) / elapsed)
    out: dict[str, Any] = {"seconds_per_path": seconds, "agent_frames_per_s_during": busy}
    for name, s in samples.items():
        out[name] = percentiles(s)
    r = out["raw"]
    out["ratio_over_raw"] = {k: {q: round(out[k][q] / r[q], 2) for q in ("p50_us", "p99_us", "p999_us", "max_us")}
                             for k in ("dashcar", "dashcar_coalesced")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=10, help="one-second turns per path")
    ap.add_argument("--bg-rate", type=float, default=20_000.0, help="frames/s of each background producer")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.seconds = 2
    emit("loaded", run(args.seconds, args.bg_rate))


if __name__ == "__main__":
    main()
