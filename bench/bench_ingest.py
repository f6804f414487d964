"""Agent ingest: frames/s from N producer processes into the WAL and into merged JSONL, and drops.

Each producer sends ``--frames`` 6-DOF track entries as fast as it can (distinct timestamps,
so every entry is one JSONL row); the figures are the agent's own counters over wall time:
the frames that were not dropped, by the time all of them were stored, and by the time all
were written. A
last run repeats 4 producers with 2 ms coalescing. Producers in tight loops saturate the
agent on purpose: the first drops show where saturation starts.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from typing import Any

from bench._util import Agent, emit


def _producer(env: dict[str, str], root: str, idx: int, n: int, ready: Any, go: Any, out: Any, coalesce_ms: float) -> None:
    os.environ.update(env)
    import dashcar

    exp = dashcar.Experiment(prefix=f"bench/ingest/p{idx}", dash_root=root, coalesce_ms=coalesce_ms).start()
    track = exp.tracks("robot/state")
    q = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    ready.release()
    go.wait()
    for i in range(n):
        track.append(q=q, qd=q, tau=q, gripper_pos=0.04, gripper_force=10.0, _ts=i * 0.001)
    from dashcar import _transport

    out.put(_transport.get_transport(exp._runtime_dir).dropped())
    exp.complete()


def run(producers: int, frames: int, coalesce_ms: float = 0.0) -> dict[str, Any]:
    with Agent("--merge-window-s", "0.2") as agent:
        ctx = mp.get_context("spawn")
        ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_producer, args=(agent.env, str(agent.data_dir), i, frames, ready, go, out, coalesce_ms)) for i in range(producers)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.acquire()
        base = agent.status()["frames"]
        t0 = time.perf_counter()
        go.set()
        total = producers * frames
        samples: list[tuple[float, int]] = []
        peak_rss = 0
        while True:
            st = agent.status()
            now = time.perf_counter() - t0
            peak_rss = max(peak_rss, agent.rss_anon_kb())
            fr = st["frames"]
            samples.append((now, fr["stored"] - base["stored"]))
            settled = fr["written"] - base["written"] + fr["dropped_by_producers"] + fr["missing"]
            if st["wal"]["backlog"] == 0 and settled >= total:
                break
            if now > 600:
                break
            time.sleep(0.02)
        t_jsonl = time.perf_counter() - t0
        written = agent.status()["frames"]["written"] - base["written"]
        dropped = sum(out.get(timeout=60) for _ in procs)
        t_wal = next((t for t, n in samples if n >= total - dropped), None)
        for p in procs:
            p.join(60)
        fr = agent.status()["frames"]
        return {
            "producers": producers,
            "coalesce_ms": coalesce_ms,
            "frames": total,
            "wal_frames_per_s": round((total - dropped) / t_wal) if t_wal else None,
            "jsonl_frames_per_s": round(written / t_jsonl),
            "dropped_by_producers": dropped,
            "missing": fr["missing"],
            "agent_rss_anon_mb_peak": round(peak_rss / 1024, 1),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--producers", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--frames", type=int, default=200_000, help="in total, split over the producers")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.producers, args.frames = [1, 4], 20_000
    for n in args.producers:
        emit("ingest", run(n, args.frames // n))
    emit("ingest", run(4, args.frames // 4, coalesce_ms=2.0))


if __name__ == "__main__":
    main()
