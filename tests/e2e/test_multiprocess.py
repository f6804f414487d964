"""Many processes: multiprocessing with fork, spawn and forkserver, DataLoader-style workers,
8 ranks on one run and 8 processes on 8 runs, with and without equal timestamps."""

from __future__ import annotations

import multiprocessing as mp
import os
from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext
from pathlib import Path
from typing import Any, cast

import pytest

import dashcar
from tests.conftest import AgentHandle, read_json, read_jsonl, wait_until

N = 2000


def _rank(root: str, prefix: str, rank: int, shared_ts: bool, env: dict[str, str]) -> None:
    os.environ.update(env)
    exp = dashcar.Experiment(prefix=prefix, dash_root=root, echo_logs=False)
    with exp.run:
        for i in range(N):
            ts = i * 0.001 if shared_ts else rank * 10 + i * 0.001
            exp.tracks("robot/state").append(**{f"r{rank}": i}, _ts=ts)
            if i % 100 == 0:
                exp.metrics(f"rank{rank}").log(step=i)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_multiprocessing_start_methods(agent: AgentHandle, method: str) -> None:
    # The stubs give BaseContext (no .Process) for a str; the three methods' contexts all have it.
    ctx = cast("ForkContext | SpawnContext | ForkServerContext", mp.get_context(method))
    procs = [ctx.Process(target=_rank, args=(str(agent.data_dir), f"mp/{method}/run", r, True, agent.env())) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    run = agent.data_dir / "mp" / method / "run"
    wait_until(lambda: (read_json(run / "experiment.json") or {}).get("status") == "completed", 20, "run completed")
    rows = read_jsonl(run / "tracks" / "robot_state" / "data.jsonl")
    bad = [r for i, r in enumerate(rows) if not r.get("r0") == r.get("r1") == r.get("r2") == i]
    assert len(rows) == N and not bad, (bad[:3], len(bad), read_json(run / "experiment.json")["dashcar"], agent.log()[-3000:])


@pytest.mark.parametrize("shared_ts", [True, False], ids=["equal-ts", "distinct-ts"])
def test_eight_ranks_on_one_run(agent: AgentHandle, shared_ts: bool) -> None:
    ctx = mp.get_context("spawn")
    prefix = f"ddp/{'eq' if shared_ts else 'ne'}/run"
    procs = [ctx.Process(target=_rank, args=(str(agent.data_dir), prefix, r, shared_ts, agent.env())) for r in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0] * 8
    run = agent.data_dir / Path(prefix)
    wait_until(lambda: (read_json(run / "experiment.json") or {}).get("status") == "completed", 30, "run completed")
    rows = read_jsonl(run / "tracks" / "robot_state" / "data.jsonl")
    stamps = [r["timestamp"] for r in rows]
    assert stamps == sorted(set(stamps))
    if shared_ts:
        bad = [r for i, r in enumerate(rows) if any(r.get(f"r{k}") != i for k in range(8))]
        assert len(rows) == N and not bad, (bad[:2], len(bad), read_json(run / "experiment.json")["dashcar"], agent.log()[-3000:])
    else:
        assert len(rows) == 8 * N
    for k in range(8):
        assert len(read_jsonl(run / "metrics" / f"rank{k}" / "data.jsonl")) == N // 100


def test_eight_processes_on_eight_runs(agent: AgentHandle) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(str(agent.data_dir), f"many/runs/r{r}", r, True, agent.env())) for r in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0] * 8
    for r in range(8):
        run = agent.data_dir / "many" / "runs" / f"r{r}"
        wait_until(lambda run=run: (read_json(run / "experiment.json") or {}).get("status") == "completed", 30, "run completed")
        rows = read_jsonl(run / "tracks" / "robot_state" / "data.jsonl")
        assert [row[f"r{r}"] for row in rows] == list(range(N))


def _worker(exp: dashcar.Experiment, worker_id: int, q: Any) -> None:
    for i in range(200):
        exp.metrics(f"loader/w{worker_id}").log(batch=i)
    q.put(exp.flush(10))


def test_dataloader_style_workers_inherit_the_experiment(agent: AgentHandle) -> None:
    """Forked workers log through the parent's Experiment object; each gets its own identity."""
    exp = dashcar.Experiment(prefix="loader/workers/run", dash_root=agent.data_dir, echo_logs=False).start()
    exp.metrics("main").log(step=0)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(exp, w, q)) for w in range(4)]
    for proc in workers:
        proc.start()
    assert [q.get(timeout=60) for _ in workers] == [True] * 4
    for proc in workers:
        proc.join(30)
    exp.metrics("main").log(step=1)
    exp.complete()
    run = agent.data_dir / "loader" / "workers" / "run"
    for w in range(4):
        assert [p["data"]["batch"] for p in read_jsonl(run / "metrics" / "loader" / f"w{w}" / "data.jsonl")] == list(range(200))
    assert [p["data"]["step"] for p in read_jsonl(run / "metrics" / "main" / "data.jsonl")] == [0, 1]
    wait_until(lambda: read_json(run / "experiment.json")["status"] == "completed", 20, "run completed")
