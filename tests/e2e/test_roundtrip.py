"""Every frame kind travels SDK → ZeroMQ → agent → WAL → ML-Dash files and reads back."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dashcar
from dashcar.agent.main import ALREADY_RUNNING
from tests.conftest import AgentHandle, read_json, read_jsonl, run_producer, wait_until


def make(agent: AgentHandle, prefix: str = "alice/robotics/run1") -> dashcar.Experiment:
    return dashcar.Experiment(prefix=prefix, dash_root=agent.data_dir)


def test_every_kind_lands_in_the_ml_dash_layout(agent: AgentHandle) -> None:
    exp = make(agent)
    with exp.run:
        exp.params.set(lr=0.001, model={"arch": "resnet", "depth": 50})
        exp.params.set(model={"depth": 101}, seed=3)
        exp.metrics("train").log(loss=0.5, epoch=1)
        exp.metrics("train").log(loss=0.25, epoch=2)
        exp.metrics.log(step=7)
        exp.tracks("robot/state").append(q=[0.1, 0.2], _ts=1.0)
        exp.log("started", level="info", metadata={"gpu": 0})
        exp.log("careful", level="warn")
    run = exp.run_dir
    params = read_json(run / "parameters.json")
    assert params["data"] == {"lr": 0.001, "model.arch": "resnet", "model.depth": 101, "seed": 3}
    assert params["version"] == 2 and "updatedAt" in params
    points = read_jsonl(run / "metrics" / "train" / "data.jsonl")
    assert [(p["index"], p["data"]["loss"], p["data"]["epoch"]) for p in points] == [(0, 0.5, 1), (1, 0.25, 2)]
    assert all(isinstance(p["data"]["_ts"], float) and p["createdAt"].endswith("Z") for p in points)
    assert read_json(run / "metrics" / "train" / "metadata.json")["totalDataPoints"] == 2
    assert read_jsonl(run / "metrics" / "None" / "data.jsonl")[0]["data"]["step"] == 7
    assert read_jsonl(run / "tracks" / "robot_state" / "data.jsonl") == [{"timestamp": 1.0, "q": [0.1, 0.2]}]
    assert read_json(run / "tracks" / "robot_state" / "metadata.json")["topic"] == "robot/state"
    logs = read_jsonl(run / "logs" / "logs.jsonl")
    assert [(entry["sequenceNumber"], entry["level"], entry["message"]) for entry in logs] == [
        (0, "info", "started"), (1, "warn", "careful"),
    ]
    assert logs[0]["metadata"] == {"gpu": 0} and "metadata" not in logs[1]
    assert (run / "logs" / ".log_sequence").read_text() == "2"
    meta = read_json(run / "experiment.json")
    assert meta["status"] == "completed" and meta["name"] == "run1" and meta["prefix"] == "alice/robotics/run1"
    assert meta["dashcar"]["counters"]["frames"] == 9


def test_equal_ts_entries_merge_deeply_and_files_stay_sorted(agent: AgentHandle) -> None:
    exp = make(agent)
    with exp.run:
        t = exp.tracks("fused")
        t.append(x=1, pose={"p": [1, 2]}, _ts=2.0).append(vx=2, pose={"q": [0, 1]}, _ts=2.0)
        t.append(x=0, _ts=1.0)
        t.append(x=3, _ts=3.0)
        assert exp.flush()
        t.append(y=9, _ts=2.0)
        t.append(z=5, _ts=0.5)
    rows = read_jsonl(exp.run_dir / "tracks" / "fused" / "data.jsonl")
    assert rows == [
        {"timestamp": 0.5, "z": 5},
        {"timestamp": 1.0, "x": 0},
        {"timestamp": 2.0, "x": 1, "pose.p": [1, 2], "vx": 2, "pose.q": [0, 1], "y": 9},
        {"timestamp": 3.0, "x": 3},
    ]
    meta = read_json(exp.run_dir / "tracks" / "fused" / "metadata.json")
    assert (meta["totalEntries"], meta["firstTimestamp"], meta["lastTimestamp"]) == (4, 0.5, 3.0)


def test_equal_ts_entries_from_two_processes_merge(agent: AgentHandle) -> None:
    code = """
        import sys, dashcar
        exp = dashcar.Experiment(prefix="lab/ddp/run", dash_root=sys.argv[1])
        field = sys.argv[2]
        with exp.run:
            for i in range(500):
                exp.tracks("robot/state").append(**{field: i}, _ts=i * 0.001)
    """
    env = agent.env()
    import subprocess
    import sys
    import textwrap

    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(agent.data_dir), f], env=env)
        for f in ("rank0", "rank1")
    ]
    assert [p.wait(60) for p in procs] == [0, 0]
    rows = read_jsonl(agent.data_dir / "lab" / "ddp" / "run" / "tracks" / "robot_state" / "data.jsonl")
    assert [r["timestamp"] for r in rows] == [i * 0.001 for i in range(500)]
    assert all(r["rank0"] == r["rank1"] == i for i, r in enumerate(rows))


def test_numpy_values_are_accepted_everywhere(agent: AgentHandle) -> None:
    exp = make(agent)
    with exp.run:
        exp.params.set(shape=np.array([3, 4]), lr=np.float32(0.5))
        exp.metrics("m").log(loss=np.float64(0.25), step=np.int64(3))
        exp.tracks("arm").append(q=np.arange(3, dtype=np.float64), n=np.int32(2), _ts=np.float64(1.5))
    assert read_json(exp.run_dir / "parameters.json")["data"] == {"shape": [3, 4], "lr": 0.5}
    assert read_jsonl(exp.run_dir / "metrics" / "m" / "data.jsonl")[0]["data"]["step"] == 3
    assert read_jsonl(exp.run_dir / "tracks" / "arm" / "data.jsonl") == [{"timestamp": 1.5, "q": [0.0, 1.0, 2.0], "n": 2}]


def test_large_numpy_arrays_land_as_the_lists_tolist_gives(agent: AgentHandle) -> None:
    """Big arrays travel as raw bytes; the files hold the same lists, in tracks, metrics and params."""
    exp = make(agent)
    cloud = np.random.default_rng(1).random((64, 3), dtype=np.float32)
    image = np.arange(48 * 4, dtype=np.uint8).reshape(48, 4)
    with exp.run:
        exp.params.set(weights=np.linspace(0, 1, 50))
        exp.tracks("lidar").append(points=cloud, mask=np.ones(40, dtype=bool), _ts=0.5)
        exp.tracks("lidar").append(image=image, _ts=0.5)
        exp.metrics("grads").log(norms=np.arange(100, dtype=np.int64))
    assert read_json(exp.run_dir / "parameters.json")["data"]["weights"] == np.linspace(0, 1, 50).tolist()
    rows = read_jsonl(exp.run_dir / "tracks" / "lidar" / "data.jsonl")
    assert rows == [{"timestamp": 0.5, "points": cloud.tolist(), "mask": [True] * 40, "image": image.tolist()}]
    assert read_jsonl(exp.run_dir / "metrics" / "grads" / "data.jsonl")[0]["data"]["norms"] == list(range(100))


@pytest.mark.parametrize("bad", [None, "1.0", True, float("nan"), float("inf"), [1.0]])
def test_bad_track_timestamps_raise_in_the_caller(agent: AgentHandle, bad: Any) -> None:
    exp = make(agent)
    with exp.run:
        with pytest.raises(ValueError, match="_ts"):
            if bad is None:
                exp.tracks("t").append(x=1)
            else:
                exp.tracks("t").append(x=1, _ts=bad)
        with pytest.raises(ValueError, match="timestamp"):
            exp.tracks("t").append(timestamp=3.0, _ts=1.0)
        with pytest.raises(ValueError, match="level"):
            exp.log("x", level="loud")


def test_nan_values_are_kept_as_ml_dash_writes_them(agent: AgentHandle) -> None:
    exp = make(agent)
    with exp.run:
        exp.metrics("m").log(loss=float("nan"))
    line = (exp.run_dir / "metrics" / "m" / "data.jsonl").read_text()
    assert '"loss": NaN' in line
    assert math.isnan(read_jsonl(exp.run_dir / "metrics" / "m" / "data.jsonl")[0]["data"]["loss"])


def test_seed_constructor_and_failed_run(agent: AgentHandle) -> None:
    exp = dashcar.Experiment(name="my-experiment", project="project", local_path=str(agent.data_dir))
    with pytest.raises(RuntimeError):
        with exp.run:
            exp.metrics("train").log(loss=1.0)
            raise RuntimeError("diverged")
    run = agent.data_dir / "project" / "my-experiment"
    assert exp.run_dir == run
    meta = read_json(run / "experiment.json")
    assert meta["status"] == "failed" and "diverged" in meta["dashcar"]["reason"]


def test_run_left_open_at_exit_is_closed_and_written(agent: AgentHandle) -> None:
    run_producer(
        f"""
        import dashcar
        exp = dashcar.Experiment(prefix="a/b/open", dash_root={str(agent.data_dir)!r}).start()
        for i in range(100):
            exp.tracks("t").append(i=i, _ts=float(i))
        """,
        agent.env(),
    )
    run = agent.data_dir / "a" / "b" / "open"
    wait_until(lambda: (read_json(run / "experiment.json") or {}).get("status") == "completed", 10, "run closed")
    assert len(read_jsonl(run / "tracks" / "t" / "data.jsonl")) == 100


def test_topics_sharing_a_folder_are_refused(agent: AgentHandle) -> None:
    exp = make(agent)
    other = make(agent)
    with exp.run:
        exp.tracks("a/b").append(x=1, _ts=1.0)
        with pytest.raises(ValueError, match="share the folder"):
            exp.tracks("a_b")
        assert exp.flush()
        other.tracks("a_b").append(y=2, _ts=1.0)
        assert other.flush()
    assert read_jsonl(exp.run_dir / "tracks" / "a_b" / "data.jsonl") == [{"timestamp": 1.0, "x": 1}]
    assert read_json(exp.run_dir / "experiment.json")["dashcar"]["counters"]["rejected_topic_collision"] == 1


def test_sigterm_drains_open_rows_to_files(agent_factory: Any) -> None:
    agent = agent_factory("--merge-window-s", "3600").start()
    exp = make(agent).start()
    for i in range(50):
        exp.tracks("t").append(i=i, _ts=float(i))
    wait_stored(agent, 51)
    assert agent.stop() == 0
    rows = read_jsonl(exp.run_dir / "tracks" / "t" / "data.jsonl")
    assert [r["i"] for r in rows] == list(range(50))


def wait_stored(agent: AgentHandle, n: int) -> None:
    wait_until(lambda: agent.status()["frames"]["stored"] >= n, 10, f"{n} frames stored")


def test_second_agent_on_the_same_runtime_dir_refuses(agent: AgentHandle) -> None:
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "dashcar.agent", "--runtime-dir", str(agent.runtime_dir), "--state-dir", str(agent.state_dir)],
        env=agent.env(), capture_output=True, text=True, timeout=30,
    )
    assert res.returncode == ALREADY_RUNNING and "already" in res.stderr
    assert agent.status()["pid"] == agent.proc.pid  # type: ignore[union-attr]


def test_read_back_by_the_real_ml_dash_reader(agent: AgentHandle) -> None:
    ml_dash = pytest.importorskip("ml_dash")
    exp = make(agent, "alice/robotics/compat")
    with exp.run:
        exp.params.set(lr=0.1, model={"depth": 3})
        for i in range(5):
            exp.metrics("train").log(loss=1.0 / (i + 1), step=i)
        exp.tracks("robot/pos").append(q=[1, 2], _ts=1.0).append(v=[3], _ts=1.0).append(q=[2, 3], _ts=2.0)
    reader = ml_dash.Experiment(prefix="alice/robotics/compat", dash_root=str(agent.data_dir))
    with reader.run as r:
        got = r.metrics("train").read(start_index=1, limit=2)
        assert [p["data"]["step"] for p in got["data"]] == [1, 2] and got["hasMore"] is True
        assert r.metrics("train").stats()["totalDataPoints"] == "5"
        assert r.tracks("robot/pos").read() == {
            "entries": [{"timestamp": 1.0, "q": [1, 2], "v": [3]}, {"timestamp": 2.0, "q": [2, 3]}], "count": 2,
        }
        mocap = r.tracks("robot/pos").read(format="mocap")
        assert mocap["channels"] == ["q", "v"] and [f["time"] for f in mocap["frames"]] == [1.0, 2.0]
        assert r.params.get() == {"lr": 0.1, "model.depth": 3}


def test_files_are_private_to_the_run_root(agent: AgentHandle, dirs: Path) -> None:
    exp = make(agent)
    with exp.run:
        exp.tracks("x").append(v=1, _ts=0.0)
    outside = {p for p in dirs.rglob("*") if agent.data_dir not in p.parents and p != agent.data_dir}
    assert all(str(p).startswith((str(agent.runtime_dir), str(agent.state_dir), str(dirs / "agent.log"))) for p in outside)
