"""On-disk compatibility with the real ``ml_dash`` (0.11) local reader and writer, both ways."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import dashcar
from tests.conftest import AgentHandle, read_jsonl

ml_dash = pytest.importorskip("ml_dash")


def write_with_dashcar(root: str, prefix: str) -> None:
    with dashcar.Experiment(prefix=prefix, dash_root=root, echo_logs=False).run as exp:
        exp.params.set(lr=0.001, model={"depth": 50, "act": "relu"}, tags=["a", "b"])
        for i in range(25):
            exp.metrics("train").log(loss=1.0 / (i + 1), step=i)
        exp.metrics("eval/top1").log(acc=0.5)
        exp.metrics.log(epoch=3)
        for i in range(50):
            exp.tracks("robot/pos").append(q=[i, i + 0.5], _ts=i * 0.01)
            exp.tracks("robot/pos").append(grip={"force": float(i)}, _ts=i * 0.01)
        exp.log("hello", metadata={"k": 1})


def write_with_ml_dash(root: str, prefix: str) -> None:
    with ml_dash.Experiment(prefix=prefix, dash_root=root).run as exp:
        exp.params.set(lr=0.001, model={"depth": 50, "act": "relu"})
        for i in range(25):
            exp.metrics("train").log(loss=1.0 / (i + 1), step=i)
        for i in range(50):
            exp.tracks("robot/pos").append(q=[i, i + 0.5], _ts=i * 0.01)
            exp.tracks("robot/pos").append(grip={"force": float(i)}, _ts=i * 0.01)
        exp.log("hello", metadata={"k": 1})


def readers(root: str, prefix: str) -> tuple[Any, Any]:
    theirs = ml_dash.Experiment(prefix=prefix, dash_root=root)
    return theirs, dashcar.Experiment(prefix=prefix, dash_root=root)


def compare(root: str, prefix: str) -> None:
    theirs, ours = readers(root, prefix)
    with theirs.run as t:
        for start, limit in ((0, 1000), (5, 10), (20, 100), (30, 5)):
            expected = t.metrics("train").read(start_index=start, limit=limit)
            assert ours.metrics("train").read(start, limit) == expected
        total = t.metrics("train").stats()["totalDataPoints"]
        assert ours.metrics("train").stats()["totalDataPoints"] == total
        for kw in ({}, {"start_timestamp": 0.1, "end_timestamp": 0.2}, {"columns": ["q"]}):
            assert ours.tracks("robot/pos").read(**kw) == t.tracks("robot/pos").read(**kw)
            expected_jsonl = t.tracks("robot/pos").read(format="jsonl", **kw)
            assert ours.tracks("robot/pos").read(format="jsonl", **kw) == expected_jsonl
        assert ours.tracks("robot/pos").read(format="mocap") == t.tracks("robot/pos").read(format="mocap")
        mine = pq.read_table(io.BytesIO(ours.tracks("robot/pos").read(format="parquet"))).to_pylist()
        ref = pq.read_table(io.BytesIO(t.tracks("robot/pos").read(format="parquet"))).to_pylist()
        assert mine == ref
        assert ours.params.get() == t.params.get()
        assert ours.params.get(flatten=False) == t.params.get(flatten=False)
        found = t.tracks("robot/pos").slice(0.1, 0.3).findByTime(0.155)
        assert ours.tracks("robot/pos").slice(0.1, 0.3).findByTime(0.155) == found


def test_ml_dash_reads_what_dashcar_wrote(agent: AgentHandle) -> None:
    root, prefix = str(agent.data_dir), "alice/compat/ours"
    write_with_dashcar(root, prefix)
    compare(root, prefix)
    _, ours = readers(root, prefix)
    names = {m["name"] for m in ours.metrics.list_all()}
    assert names == {"train", "eval/top1", None}, "metric names with '/' are listed"


def test_dashcar_reads_what_ml_dash_wrote(tmp_path: Path) -> None:
    root, prefix = str(tmp_path), "alice/compat/theirs"
    write_with_ml_dash(root, prefix)
    compare(root, prefix)


def test_dashcar_continues_a_run_ml_dash_started(agent: AgentHandle) -> None:
    root, prefix = str(agent.data_dir), "alice/compat/continued"
    write_with_ml_dash(root, prefix)
    with dashcar.Experiment(prefix=prefix, dash_root=root, echo_logs=False).run as exp:
        exp.metrics("train").log(loss=0.0, step=25)
        exp.tracks("robot/pos").append(q=[99], _ts=1.0)
        exp.tracks("robot/pos").append(q=[-1], _ts=0.005)
        exp.log("second")
        exp.params.set(seed=1)
    run = Path(root, *prefix.split("/"))
    points = read_jsonl(run / "metrics" / "train" / "data.jsonl")
    assert [p["index"] for p in points] == list(range(26))
    rows = read_jsonl(run / "tracks" / "robot_pos" / "data.jsonl")
    stamps = [r["timestamp"] for r in rows]
    assert stamps == sorted(set(stamps)) and len(rows) == 52
    assert [x["sequenceNumber"] for x in read_jsonl(run / "logs" / "logs.jsonl")] == [0, 1]
    with ml_dash.Experiment(prefix=prefix, dash_root=root).run as t:
        assert t.params.get() == {"lr": 0.001, "model.depth": 50, "model.act": "relu", "seed": 1}
        assert t.metrics("train").stats()["totalDataPoints"] == "26"


def test_parquet_columns_are_the_union_of_all_rows(agent: AgentHandle) -> None:
    with dashcar.Experiment(prefix="alice/compat/union", dash_root=agent.data_dir).run as exp:
        exp.tracks("t").append(a=1, _ts=0.0)
        exp.tracks("t").append(b="x", _ts=1.0)
        exp.tracks("t").append(c=[1.0, 2.0], _ts=2.0)
        table = pq.read_table(io.BytesIO(exp.tracks("t").read(format="parquet")))
    assert table.column_names == ["timestamp", "a", "b", "c"]
    assert table.to_pylist() == [
        {"timestamp": 0.0, "a": 1, "b": None, "c": None},
        {"timestamp": 1.0, "a": None, "b": "x", "c": None},
        {"timestamp": 2.0, "a": None, "b": None, "c": [1.0, 2.0]},
    ]
