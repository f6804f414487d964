"""Agent throughput: N producer processes → WAL → merged JSONL, a WAL backlog draining, and the
naive pipeline measured in the same run.

- ``naive``: the same producers with the raw path (``packb`` + PUSH ``NOBLOCK``) into one PULL
  process that unpacks each frame and writes it as an orjson line to a buffered file. No
  durability, no merge, no checks: the ceiling a pipeline of this shape reaches here.
- ``ingest``: dashcar producers (6-DOF ``tracks(...).append``, distinct timestamps, so every
  entry is one JSONL row) into a private agent. Frames/s into the WAL is counted until every
  frame not dropped was stored; into JSONL until every one was written (or counted lost).
- ``drain``: a backlog already in the WAL (written there as ingest would have, the agent not
  running), then the agent started: frames/s until all of it is in JSONL.

Each figure is the agent's own counters over wall time. The JSONL figures are reported as a
ratio to the naive pipeline's rate in the same run (DESIGN §4).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._util import Agent, emit

Q = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]


def _fields(i: int) -> dict[str, Any]:
    return {"q": Q, "qd": Q, "tau": Q, "gripper_pos": 0.04, "gripper_force": 10.0 + i % 7}


def producer(env: dict[str, str], root: str, prefix: str, n: int, ready: Any, go: Any, out: Any,
             coalesce_ms: float = 0.0) -> None:
    """A process logging ``n`` 6-DOF track frames to run ``prefix`` in a tight loop once ``go`` is set;
    puts the frames it dropped on ``out``."""
    os.environ.update(env)
    import dashcar

    exp = dashcar.Experiment(prefix=prefix, dash_root=root, coalesce_ms=coalesce_ms, echo_logs=False).start()
    track = exp.tracks("robot/state")
    ready.release()
    go.wait()
    for i in range(n):
        track.append(**_fields(i), _ts=i * 0.001)
    from dashcar import _transport

    assert exp._runtime_dir is not None
    out.put(_transport.get_transport(exp._runtime_dir).dropped())
    exp.complete()


def _raw_producer(endpoint: str, idx: int, n: int, ready: Any, go: Any) -> None:
    import msgpack
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.connect(endpoint)
    packb = msgpack.packb
    ready.release()
    go.wait()
    for i in range(n):
        sock.send(packb([idx, "robot/state", i * 0.001, _fields(i)]), zmq.NOBLOCK)
    sock.close(linger=-1)
    ctx.term()


def _raw_consumer(endpoint: str, path: str, total: int, bound: Any, done: Any) -> None:
    import msgpack
    import orjson
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.bind(endpoint)
    bound.set()
    unpackb, dumps = msgpack.unpackb, orjson.dumps
    with open(path, "wb") as f:
        for _ in range(total):
            idx, _, ts, fields = unpackb(sock.recv())
            f.write(dumps({"timestamp": ts, "producer": idx, **fields}) + b"\n")
    done.set()
    sock.close(linger=0)
    ctx.term()


def naive(producers: int, frames: int) -> dict[str, Any]:
    """The raw PUSH → PULL → orjson-lines pipeline with the same producers and rows."""
    base = Path(tempfile.mkdtemp(prefix="dcn-", dir="/tmp"))
    try:
        ctx = mp.get_context("spawn")
        endpoint = f"ipc://{base / 'naive.sock'}"
        total = producers * frames
        bound, done, ready, go = ctx.Event(), ctx.Event(), ctx.Semaphore(0), ctx.Event()
        consumer = ctx.Process(target=_raw_consumer, args=(endpoint, str(base / "out.jsonl"), total, bound, done))
        consumer.start()
        bound.wait(30)
        procs = [ctx.Process(target=_raw_producer, args=(endpoint, i, frames, ready, go)) for i in range(producers)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.acquire()
        t0 = time.perf_counter()
        go.set()
        done.wait(600)
        dt = time.perf_counter() - t0
        for p in [*procs, consumer]:
            p.join(60)
        return {"producers": producers, "frames": total, "frames_per_s": round(total / dt)}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(producers: int, frames: int, coalesce_ms: float = 0.0) -> dict[str, Any]:
    """dashcar producers into a private agent: frames/s into the WAL and into merged JSONL."""
    with Agent("--merge-window-s", "0.2") as agent:
        ctx = mp.get_context("spawn")
        ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
        args = [(agent.env, str(agent.data_dir), f"bench/ingest/p{i}", frames, ready, go, out, coalesce_ms)
                for i in range(producers)]
        procs = [ctx.Process(target=producer, args=a) for a in args]
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
            time.sleep(0.01)
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


def wal_backlog(state: Path, root: str, tag: str, frames: int, runs: int = 4) -> int:
    """Write ``frames`` track frames of ``runs`` runs (``bench/<tag>/p<i>``) into a fresh WAL, as ingest
    stores them; returns the records written."""
    import msgpack

    from dashcar.agent.wal import Wal
    from dashcar.proto import Frame, Kind, RunOpen, encode, frame_head

    wal = Wal(state / "wal", 16 << 30)
    pid = os.getpid()
    records = [encode(Frame(Kind.RUN_OPEN, 100 + p, pid, root, f"bench/{tag}/p{p}", 1, RunOpen({}))) for p in range(runs)]
    heads = [frame_head(Kind.TRACK, 100 + p, pid, root, f"bench/{tag}/p{p}") for p in range(runs)]
    for i in range(frames // runs):
        for p in range(runs):
            records.append(heads[p] + msgpack.packb(i + 2) + msgpack.packb(["robot/state", i * 0.001, _fields(i)]))
    for i in range(0, len(records), 8192):
        wal.append(records[i:i + 8192], {})
    wal.close()
    return len(records)


def drain(frames: int, producers: int = 4) -> dict[str, Any]:
    """A backlog of ``frames`` in the WAL (as ingest stores them), drained by a starting agent."""
    base = Path(tempfile.mkdtemp(prefix="dcd-", dir="/tmp"))
    try:
        state = base / "state"
        written = wal_backlog(state, str(base / "data"), "drain", frames, producers)
        t0 = time.perf_counter()
        agent = Agent("--merge-window-s", "0.2", "--state-dir", str(state))
        try:
            while True:
                st = agent.status()
                if st["frames"]["written"] >= written or time.perf_counter() - t0 > 600:
                    break
                time.sleep(0.01)
            dt = time.perf_counter() - t0
        finally:
            agent.close()
        return {"frames": frames, "frames_per_s": round(frames / dt), "seconds": round(dt, 2)}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--producers", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--frames", type=int, default=400_000, help="in total, split over the producers")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.producers, args.frames = [1, 4], 20_000
    ref = naive(4, args.frames // 4)
    emit("naive", ref)
    for n in args.producers:
        r = run(n, args.frames // n)
        emit("ingest", {**r, "vs_naive": round(r["jsonl_frames_per_s"] / ref["frames_per_s"], 2)})
    r = run(4, args.frames // 4, coalesce_ms=2.0)
    emit("ingest", {**r, "vs_naive": round(r["jsonl_frames_per_s"] / ref["frames_per_s"], 2)})
    emit("drain", drain(args.frames))


if __name__ == "__main__":
    main()
