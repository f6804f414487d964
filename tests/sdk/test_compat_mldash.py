"""On-disk compatibility with the real ``ml_dash`` (0.11) local reader and writer, both ways."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import dashcar
from tests.conftest import AgentHandle, read_jsonl, wait_until

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
    return ml_dash.Experiment(prefix=prefix, dash_root=root), dashcar.Experiment(prefix=prefix, dash_root=root)


def compare(root: str, prefix: str) -> None:
    theirs, ours = readers(root, prefix)
    with theirs.run as t:
        for start, limit in ((0, 1000), (5, 10), (20, 100), (30, 5)):
            assert ours.metrics("train").read(start, limit) == t.metrics("train").read(start_index=start, limit=limit)
        assert ours.metrics("train").stats()["totalDataPoints"] == t.metrics("train").stats()["totalDataPoints"]
        for kw in ({}, {"start_timestamp": 0.1, "end_timestamp": 0.2}, {"columns": ["q"]}):
            assert ours.tracks("robot/pos").read(**kw) == t.tracks("robot/pos").read(**kw)
            assert ours.tracks("robot/pos").read(format="jsonl", **kw) == t.tracks("robot/pos").read(format="jsonl", **kw)
        assert ours.tracks("robot/pos").read(format="mocap") == t.tracks("robot/pos").read(format="mocap")
        mine = pq.read_table(io.BytesIO(ours.tracks("robot/pos").read(format="parquet"))).to_pylist()
        ref = pq.read_table(io.BytesIO(t.tracks("robot/pos").read(format="parquet"))).to_pylist()
        assert mine == ref
        assert ours.params.get() == t.params.get() and ours.params.get(flatten=False) == t.params.get(flatten=False)
        assert ours.tracks("robot/pos").slice(0.1, 0.3).findByTime(0.155) == t.tracks("robot/pos").slice(0.1, 0.3).findByTime(
            0.155
        )


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
    assert json.loads(json.dumps(table.to_pylist()))


SAME_SCRIPT = """
import sys
from datetime import datetime
if sys.argv[1] == "ml_dash":
    from ml_dash import RUN, Experiment
else:
    from dashcar import RUN, Experiment
root = sys.argv[2]
RUN.now = datetime(2024, 5, 6, 7, 8, 9)
Experiment(prefix="alice/compat/unused", dash_root=root)
exp = Experiment(prefix="alice/compat/{now:%Y-%m-%d}/r{job_counter:02d}", dash_root=root, readme="same script")
exp.run.prefix = "alice/compat/{EXP.date}/{EXP.name}"
with exp.run as e:
    e.params.set(lr=0.001, model={"depth": 50, "act": "relu"}, seeds=[1, 2])
    e.params.set(model={"depth": 101})
    for i in range(5):
        e.metrics("train").log(loss=1.0 / (i + 1), step=i, _ts=100.0 + i)
    e.metrics.log(epoch=1, eval=dict(acc=0.5), _ts=200.0)
    for i in range(10):
        e.tracks("robot/pos").append(q=[i, i + 0.5], _ts=i * 0.01)
        e.tracks("robot/pos").append(grip=float(i), _ts=i * 0.01)
    e.tracks("camera/rgb").append(frame=0, _ts=0.5)
    e.log("hello", metadata={"k": 1})
    e.log("careful", level="warn")
    import os
    import numpy as np
    small, big = os.path.join(os.path.dirname(root), "small.txt"), os.path.join(os.path.dirname(root), "big.bin")
    e.files("models").upload(small, description="a small one", tags=["s"], metadata={"k": 1})
    e.files("models").upload(big)
    e.files.upload(small, to="copies/renamed.txt")
    e.files("configs").save_json({"lr": 0.001, "layers": [1, 2]}, to="config.json")
    e.files.save_text("text \u00fc", to="notes/readme.txt")
    e.files("data").save_blob(bytes(range(256)) * 300, to="blob.bin")
    e.files("data").save_pkl({"a": 1}, to="obj.pkl")
    e.files("frames").save_image(np.arange(48, dtype=np.uint8).reshape(4, 4, 3), to="f.png")
    e.flush()
    first = {f["filename"]: f for f in e.files().list()}
    e.files().duplicate(first["config.json"]["id"], to="configs/copy.json")
    e.files(file_id=first["small.txt"]["id"], description="updated", tags=["u"]).update()
    e.files("data/obj.pkl").delete()
    print("prefix", e.run.prefix)
"""

WALL_CLOCK = {"createdAt", "updatedAt", "created_at", "updated_at", "timestamp"}
"""Fields holding when something was written (a log line's ``timestamp`` is when it was logged)."""


def _same_content(path: str, theirs: Any, ours: Any) -> None:
    """Equal but for wall-clock fields; dashcar may add keys (run status, counters), never drop or change one."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), path
        for key, value in theirs.items():
            assert key in ours, f"{path}: dashcar lacks {key!r}"
            if key not in WALL_CLOCK:
                _same_content(f"{path}.{key}", value, ours[key])
    else:
        assert ours == theirs, path


FILE_CLOCK = {"id", "uploadedAt", "updatedAt", "deletedAt"}
"""Index fields that differ between two runs of one script: the id (made per call) and when."""


def _compare_files(theirs_dir: Path, ours_dir: Path) -> None:
    """The two ``files/`` hold the same entries (but ids and times) and the same bytes under each."""

    def entries(run: Path) -> list[dict[str, Any]]:
        files: list[dict[str, Any]] = json.loads((run / "files" / ".files_metadata.json").read_text())["files"]
        return sorted(files, key=lambda e: (e["path"], e["filename"], e["deletedAt"] is None))

    theirs, ours = entries(theirs_dir), entries(ours_dir)
    assert [(e["path"], e["filename"]) for e in ours] == [(e["path"], e["filename"]) for e in theirs]
    for t, o in zip(theirs, ours, strict=True):
        assert list(o) == list(t), "the same keys in the same order"
        assert {k: v for k, v in o.items() if k not in FILE_CLOCK} == {k: v for k, v in t.items() if k not in FILE_CLOCK}
        assert (o["deletedAt"] is None) == (t["deletedAt"] is None)
        parts = [p for p in t["path"].split("/") if p]
        assert (ours_dir.joinpath("files", *parts, o["id"], o["filename"]).read_bytes()
                == theirs_dir.joinpath("files", *parts, t["id"], t["filename"]).read_bytes())


def test_the_same_script_writes_the_same_run_through_ml_dash_and_dashcar(agent: AgentHandle, tmp_path: Path) -> None:
    """Prefix template, params, metrics, tracks, logs and files: the two run directories hold the same files and data."""
    script = tmp_path / "same.py"
    script.write_text(SAME_SCRIPT)
    (tmp_path / "small.txt").write_text("small file")
    (tmp_path / "big.bin").write_bytes(bytes(range(256)) * 400)
    prefixes = {}
    # ML-Dash 0.11 deletes an uploaded file that lies under the temp dir (tmp_path does): give it another.
    (tmp_path / "mltmp").mkdir()
    ml_env = dict(os.environ, ML_DASH_NO_VERSION_CHECK="1", TMPDIR=str(tmp_path / "mltmp"))
    for lib, env in (("ml_dash", ml_env), ("dashcar", agent.env())):
        res = subprocess.run([sys.executable, str(script), lib, str(tmp_path / lib)], env=env, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        prefixes[lib] = next(line.split()[1] for line in res.stdout.splitlines() if line.startswith("prefix "))
    assert prefixes["dashcar"] == prefixes["ml_dash"] == "alice/compat/20240506/r01"
    theirs_dir, ours_dir = (tmp_path.joinpath(lib, *prefixes[lib].split("/")) for lib in ("ml_dash", "dashcar"))

    def files(run: Path) -> set[str]:
        """The run's files, an id directory under ``files/`` shown as ``<id>``."""
        ids = {e["id"] for e in json.loads((run / "files" / ".files_metadata.json").read_text())["files"]}
        return {"/".join("<id>" if part in ids else part for part in p.relative_to(run).parts) for p in run.rglob("*")
                if p.is_file()}

    wait_until(lambda: not (ours_dir / "files" / ".incoming").exists(), 20, "spool files released")
    assert files(ours_dir) == files(theirs_dir)
    _compare_files(theirs_dir, ours_dir)
    assert {p.parent.relative_to(tmp_path / "dashcar").as_posix() for p in (tmp_path / "dashcar").rglob("experiment.json")} == {
        prefixes["dashcar"]}, "no run directory is left with an unresolved template"
    for name in sorted(files(theirs_dir)):
        if name.startswith("files/"):
            continue
        theirs_path, ours_path = theirs_dir / name, ours_dir / name
        if name.endswith(".jsonl"):
            theirs_rows, ours_rows = read_jsonl(theirs_path), read_jsonl(ours_path)
            assert len(ours_rows) == len(theirs_rows), name
            for i, (t, o) in enumerate(zip(theirs_rows, ours_rows, strict=True)):
                _same_content(f"{name}:{i + 1}", t, o)
        elif name.endswith(".json"):
            _same_content(name, json.loads(theirs_path.read_text()), json.loads(ours_path.read_text()))
        elif not name.endswith(".lock"):
            assert ours_path.read_bytes() == theirs_path.read_bytes(), name
    assert read_jsonl(ours_dir / "tracks" / "robot_pos" / "data.jsonl") == read_jsonl(
        theirs_dir / "tracks" / "robot_pos" / "data.jsonl"
    )
