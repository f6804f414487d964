"""Every example of the ML-Dash seed documents, run against dashcar with only the import changed.

Stand-ins replace the user's model, robot and data; each test asserts what the document says
the example produces.
"""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow.parquet as pq
import pytest

from dashcar import Experiment
from tests.conftest import AgentHandle, read_json, read_jsonl


@pytest.fixture
def root(agent: AgentHandle) -> str:
    return str(agent.data_dir)


def run_dir(root: str, prefix: str) -> Path:
    return Path(root, *prefix.split("/"))


# ---------------------------------------------------------------- tracks API


def test_tracks_basic_usage_merges_equal_timestamps(root: str) -> None:
    with Experiment(prefix="alice/robotics/manipulation", dash_root=root).run as exp:
        exp.tracks("robot/position").append(q=[0.1, 0.2, 0.3], e=[0.5, 0.0, 0.6], _ts=1.0)
        exp.tracks("robot/position").append(v=[0.01, 0.02, 0.03], _ts=1.0)
        exp.tracks("robot/position").append(q=[0.2, 0.3, 0.4], e=[0.6, 0.1, 0.7], _ts=2.0)
        entries = exp.tracks("robot/position").read()["entries"]
    assert entries == [
        {"timestamp": 1.0, "q": [0.1, 0.2, 0.3], "e": [0.5, 0.0, 0.6], "v": [0.01, 0.02, 0.03]},
        {"timestamp": 2.0, "q": [0.2, 0.3, 0.4], "e": [0.6, 0.1, 0.7]},
    ]
    run = run_dir(root, "alice/robotics/manipulation")
    assert (run / "tracks" / "robot_position" / "data.jsonl").exists()


def test_timestamp_requirements(root: str) -> None:
    with Experiment(prefix="alice/sensors/ts", dash_root=root).run as experiment:
        experiment.tracks("sensor").append(temp=25.5, _ts=0.0)
        experiment.tracks("sensor").append(temp=26.0, _ts=0.5)
        experiment.tracks("sensor").append(temp=26.5, _ts=1.0)
        with pytest.raises(ValueError):
            experiment.tracks("sensor").append(temp=27.0)
        with pytest.raises(ValueError):
            experiment.tracks("sensor").append(temp=27.0, _ts="1.0")
        assert [e["temp"] for e in experiment.tracks("sensor").list_entries()] == [25.5, 26.0, 26.5]


def test_track_builder_append_chaining_and_topics(root: str) -> None:
    with Experiment(prefix="alice/robotics/builder", dash_root=root).run as experiment:
        for topic in ("robot/joints", "robot/gripper", "camera/rgb", "camera/depth", "sensors/imu"):
            experiment.tracks(topic)
        experiment.tracks("robot/state").append(
            q=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], qd=[0.01, 0.02, 0.03, 0.04, 0.05, 0.06],
            tau=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], gripper_pos=0.04, gripper_force=10.5, _ts=1.5,
        )
        events = experiment.tracks("events")
        events.append(event="start", _ts=0.0).append(event="calibration", _ts=1.0)
        events.append(event="ready", _ts=2.0).flush()
        experiment.tracks("robot/position").flush()
        experiment.tracks.flush()
        assert [e["event"] for e in events.list_entries()] == ["start", "calibration", "ready"]
        state = experiment.tracks("robot/state").list_entries()
    assert state == [{
        "timestamp": 1.5, "q": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "qd": [0.01, 0.02, 0.03, 0.04, 0.05, 0.06],
        "tau": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "gripper_pos": 0.04, "gripper_force": 10.5,
    }]


def test_reading_filters_and_export_formats(root: str) -> None:
    with Experiment(prefix="alice/robotics/read", dash_root=root).run as experiment:
        for i in range(20):
            experiment.tracks("robot/position").append(q=[i, i], e=[-i], qd=[i * 0.5], _ts=float(i))
        data = experiment.tracks("robot/position").read()
        assert data["count"] == 20
        assert [e["timestamp"] for e in data["entries"]] == [float(i) for i in range(20)]
        ranged = experiment.tracks("robot/position").read(start_timestamp=0.0, end_timestamp=10.0)
        assert [e["timestamp"] for e in ranged["entries"]] == [float(i) for i in range(11)]
        cols = experiment.tracks("robot/position").read(columns=["q", "e"])["entries"]
        assert cols[3] == {"timestamp": 3.0, "q": [3, 3], "e": [-3]}
        both = experiment.tracks("robot/position").read(
            start_timestamp=5.0, end_timestamp=15.0, columns=["q", "qd"]
        )
        assert [e["timestamp"] for e in both["entries"]] == [float(i) for i in range(5, 16)]
        assert set(both["entries"][0]) == {"timestamp", "q", "qd"}
        entries = experiment.tracks("robot/position").list_entries()
        assert [f"t={entry['timestamp']}: q={entry.get('q')}" for entry in entries[:2]] == [
            "t=0.0: q=[0, 0]", "t=1.0: q=[1, 1]"]
        assert entries == data["entries"]
        jsonl = experiment.tracks("robot/position").read(format="jsonl")
        assert isinstance(jsonl, bytes) and [json.loads(x) for x in jsonl.splitlines()] == data["entries"]
        table = pq.read_table(io.BytesIO(experiment.tracks("robot/position").read(format="parquet")))
        assert table.num_rows == 20 and set(table.column_names) == {"timestamp", "q", "e", "qd"}
        mocap = experiment.tracks("robot/position").read(format="mocap")
        assert mocap["version"] == "1.0" and mocap["metadata"]["frameCount"] == 20
        assert mocap["channels"] == ["e", "q", "qd"] and mocap["frames"][1]["time"] == 1.0


class Robot:
    """A stand-in robot: deterministic joint state."""

    def __init__(self) -> None:
        self.t = 0.0

    def q(self) -> npt.NDArray[np.float64]:
        q: npt.NDArray[np.float64] = np.sin(np.arange(7) + self.t)
        return q


def test_robot_trajectory_logging(root: str) -> None:
    robot = Robot()
    with Experiment(prefix="alice/robotics/pick-place", dash_root=root).run as exp:
        exp.params.set(robot="franka_panda", task="pick_and_place", controller="impedance")
        dt = 0.01
        for i in range(1000):
            t = i * dt
            robot.t = t
            q, qd = robot.q(), robot.q() * 0.1
            exp.tracks("robot/state").append(
                q=q.tolist(), qd=qd.tolist(), ee_pos=q[:3].tolist(), ee_quat=q[:4].tolist(), _ts=t
            )
            exp.tracks("robot/gripper").append(position=0.04, force=float(q[0]), _ts=t)
        exp.tracks.flush()
        trajectory = exp.tracks("robot/state").read()
        exp.log(f"Logged {len(trajectory['entries'])} trajectory points")
    run = run_dir(root, "alice/robotics/pick-place")
    assert len(trajectory["entries"]) == 1000
    assert read_jsonl(run / "logs" / "logs.jsonl")[-1]["message"] == "Logged 1000 trajectory points"
    assert read_json(run / "tracks" / "robot_gripper" / "metadata.json")["totalEntries"] == 1000


def test_multi_sensor_logging(root: str) -> None:
    ax = ay = az = gx = gy = gz = 0.1
    fx = fy = fz = tx = ty = tz = 1.0
    with Experiment(prefix="alice/sensors/calibration", dash_root=root).run as exp:
        for i in range(2000):
            exp.tracks("sensors/imu").append(accel=[ax, ay, az], gyro=[gx, gy, gz], _ts=i * 0.005)
        for i in range(300):
            exp.tracks("sensors/camera").append(frame_id=i, exposure=0.01, _ts=i * 0.033)
        for i in range(10000):
            exp.tracks("sensors/force").append(fx=fx, fy=fy, fz=fz, tx=tx, ty=ty, tz=tz, _ts=i * 0.001)
        exp.tracks.flush()
        counts = {t["topic"]: t["totalEntries"] for t in exp.tracks.list("sensors/*")}
    assert counts == {"sensors/imu": 2000, "sensors/camera": 300, "sensors/force": 10000}


def test_time_range_analysis_on_a_resumed_experiment(root: str, tmp_path: Path) -> None:
    with Experiment(prefix="alice/robotics/experiment-1", dash_root=root).run as first:
        for i in range(1000):
            first.tracks("sensors/force").append(fx=math.sin(i / 100), _ts=i * 0.01)
            first.tracks("robot/state").append(q=[i, i + 1], _ts=i * 0.01)
    exp = Experiment(prefix="alice/robotics/experiment-1", dash_root=root)
    with exp.run:
        contact_data = exp.tracks("sensors/force").read(start_timestamp=5.0, end_timestamp=7.0)
        forces = [e["fx"] for e in contact_data["entries"]]
        max_force = max(forces)
        exp.log(f"Max contact force: {max_force:.2f}N")
        parquet_data = exp.tracks("robot/state").read(format="parquet")
        (tmp_path / "trajectory.parquet").write_bytes(parquet_data)
    assert len(forces) == 201 and max_force == pytest.approx(max(math.sin(i / 100) for i in range(500, 701)))
    assert pq.read_table(tmp_path / "trajectory.parquet").num_rows == 1000


def test_merging_data_at_the_same_timestamp(root: str) -> None:
    x = y = z = vx = vy = vz = qx = qy = qz = 0.0
    qw = 1.0
    with Experiment(prefix="alice/fusion/experiment", dash_root=root).run as experiment:
        for t in np.arange(0, 10, 0.1):
            experiment.tracks("fused").append(x=x, y=y, z=z, _ts=t)
            experiment.tracks("fused").append(vx=vx, vy=vy, vz=vz, _ts=t)
            experiment.tracks("fused").append(qw=qw, qx=qx, qy=qy, qz=qz, _ts=t)
        experiment.tracks.flush()
        entries = experiment.tracks("fused").list_entries()
    assert len(entries) == 100
    fields = {"timestamp", "x", "y", "z", "vx", "vy", "vz", "qw", "qx", "qy", "qz"}
    assert [set(e) for e in entries] == [fields] * 100


# ---------------------------------------------------------------- data tracking


def test_parameters_plain_nested_config_and_argparse(root: str, tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"data": {"path": "/data", "workers": 4}}))
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.001)
    args = parser.parse_args([])
    with Experiment(prefix="alice/params/all", dash_root=root).run as experiment:
        experiment.params.set(learning_rate=0.001, batch_size=32, optimizer="adam", epochs=100)
        experiment.params.set(**{"model": {"architecture": "resnet50", "pretrained": True},
                                 "optimizer": {"type": "adam", "lr": 0.001}})
        with open(cfg) as f:
            config = json.load(f)
        experiment.params.set(**config)
        experiment.params.set(**vars(args))
        flat = experiment.params.get()
        nested = experiment.params.get(flatten=False)
    assert flat["model.architecture"] == "resnet50" and flat["model.pretrained"] is True
    assert flat["optimizer.type"] == "adam" and flat["data.workers"] == 4 and flat["lr"] == 0.001
    assert flat["learning_rate"] == 0.001 and flat["batch_size"] == 32
    assert nested["model"] == {"architecture": "resnet50", "pretrained": True}


def test_metrics_streams_schema_read_and_stats(root: str) -> None:
    with Experiment(prefix="alice/metrics/ts", dash_root=root).run as experiment:
        experiment.metrics("train").log(loss=0.5, epoch=1)
        experiment.metrics("eval").log(accuracy=0.85, step=100, epoch=1)
        experiment.metrics("metrics").log(loss=0.5, accuracy=0.85, learning_rate=0.001, epoch=1)
        for epoch in range(5):
            experiment.metrics("train").log(loss=0.5 - epoch * 0.1, epoch=epoch)
            experiment.metrics("eval").log(loss=0.6 - epoch * 0.1, epoch=epoch)
        experiment.metrics("flexible").log(field_a=1, field_b=2)
        experiment.metrics("flexible").log(field_a=3, field_c=4)
        experiment.metrics("flexible").log(field_a=5, field_b=6, field_c=7)
        for i in range(20):
            experiment.metrics("loss").log(value=1 / (i + 1))
        result = experiment.metrics("loss").read(start_index=0, limit=10)
        lines = [f"Index {point['index']}: {point['data']}" for point in result["data"]]
        stats = experiment.metrics("train").stats()
        flexible = experiment.metrics("flexible").read()["data"]
    assert len(lines) == 10 and lines[0].startswith("Index 0: {'value': 1.0")
    assert stats["totalDataPoints"] == "6"
    assert [sorted(k for k in p["data"] if k != "_ts") for p in flexible] == [
        ["field_a", "field_b"], ["field_a", "field_c"], ["field_a", "field_b", "field_c"]]


def test_logging_levels_metadata_and_error_tracking(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    with Experiment(prefix="alice/logs/all", dash_root=root).run as experiment:
        experiment.log("Training started")
        experiment.log("Model: ResNet-50", level="info")
        experiment.log("GPU memory low", level="warn")
        experiment.log("Failed to load", level="error")
        experiment.log(
            "Epoch completed", level="info", metadata={"epoch": 5, "train_loss": 0.234, "val_loss": 0.456}
        )
        with pytest.raises(ZeroDivisionError):
            try:
                _ = 1 / 0
            except Exception as e:
                metadata = {"error_type": type(e).__name__}
                experiment.log(f"Operation failed: {e}", level="error", metadata=metadata)
                raise
    logs = read_jsonl(run_dir(root, "alice/logs/all") / "logs" / "logs.jsonl")
    assert [entry["level"] for entry in logs] == ["info", "info", "warn", "error", "info", "error"]
    assert logs[4]["metadata"] == {"epoch": 5, "train_loss": 0.234, "val_loss": 0.456}
    assert logs[5]["metadata"] == {"error_type": "ZeroDivisionError"}
    out, err = capsys.readouterr()
    assert "[INFO] Training started" in out and "[ERROR] Failed to load" in err


# ---------------------------------------------------------------- metrics page


def test_grouped_metrics_prefixes_and_custom_groups(root: str) -> None:
    with Experiment(name="my-experiment", project="project", local_path=root).run as experiment:
        for epoch in range(10):
            experiment.metrics.log(
                epoch=epoch,
                train=dict(loss=1 / (epoch + 1), accuracy=0.1 * epoch),
                eval=dict(loss=2 / (epoch + 1), accuracy=0.05 * epoch),
            )
        experiment.metrics("train").log(loss=0.01, accuracy=0.99)
        experiment.metrics.log(epoch=10).flush()
        experiment.metrics.log(
            step=100, train=dict(loss=0.5, accuracy=0.85), eval=dict(loss=0.6, accuracy=0.82),
            system=dict(gpu_memory=4.2, cpu_percent=45), lr=dict(value=0.001),
        )
        train = experiment.metrics("train").read(limit=100)["data"]
        system = experiment.metrics("system").read()["data"]
        names = {m["name"] for m in experiment.metrics.list_all()}
    assert len(train) == 12 and train[0]["data"]["epoch"] == 0 and train[0]["data"]["loss"] == 1.0
    first_eval = experiment.metrics("eval").read()["data"][0]
    assert train[0]["data"]["_ts"] == first_eval["data"]["_ts"], "one shared _ts"
    assert system[0]["data"]["step"] == 100 and system[0]["data"]["gpu_memory"] == 4.2
    assert names == {None, "train", "eval", "system", "lr"}
    assert (run_dir(root, "project/my-experiment") / "metrics" / "train" / "data.jsonl").exists()


def test_batch_append_read_and_batch_collection(root: str) -> None:
    with Experiment(name="my-experiment", project="project", local_path=root).run as experiment:
        result = experiment.metrics("train_loss").append_batch([
            {"value": 0.5, "step": 1, "epoch": 1},
            {"value": 0.45, "step": 2, "epoch": 1},
            {"value": 0.40, "step": 3, "epoch": 1},
            {"value": 0.38, "step": 4, "epoch": 1},
        ])
        assert (result["count"], result["startIndex"], result["endIndex"]) == (4, 0, 3)
        for i in range(100):
            experiment.metrics("loss").append(value=1.0 / (i + 1), step=i)
        result = experiment.metrics("loss").read(start_index=0, limit=10)
        assert [point["index"] for point in result["data"]] == list(range(10)) and result["hasMore"] is True
        batch = []
        for step in range(1000):
            batch.append({"value": 1 / (step + 1), "step": step, "epoch": step // 100})
            if len(batch) >= 100:
                experiment.metrics("batched").append_batch(batch)
                batch = []
        if batch:
            experiment.metrics("batched").append_batch(batch)
        assert experiment.metrics("batched").stats()["totalDataPoints"] == "1000"
        for epoch in range(10):
            experiment.metrics("all_metrics").append(
                epoch=epoch, train_loss=0.5 / (epoch + 1), val_loss=0.6 / (epoch + 1),
                train_acc=0.8 + epoch * 0.01, val_acc=0.75 + epoch * 0.01,
            )
        last = experiment.metrics("all_metrics").append(epoch=10)
    assert last["index"] == 10
    points = read_jsonl(run_dir(root, "project/my-experiment") / "metrics" / "train_loss" / "data.jsonl")
    assert [(p["index"], p["data"]["value"]) for p in points] == [(0, 0.5), (1, 0.45), (2, 0.40), (3, 0.38)]


def test_summary_cache_rolling_and_cumulative(root: str) -> None:
    with Experiment(name="sc", project="project", local_path=root).run as experiment:
        for epoch in range(3):
            for batch in range(4):
                experiment.metrics("train").summary_cache.store(loss=float(epoch * 10 + batch))
            experiment.metrics("train").summary_cache.set(epoch=epoch)
            last_two = {"loss": [epoch * 10 + 2.0, epoch * 10 + 3.0]}
            assert experiment.metrics("train").summary_cache.peek("loss", limit=2) == last_two
            experiment.metrics("train").summary_cache.summarize()
        metric = experiment.metrics("cumulative")
        metric.summary_cache.store(x=1.0)
        metric.summary_cache.summarize(clear=False)
        metric.summary_cache.store(x=3.0, y=None)
        metric.summary_cache.summarize(clear=False)
        train = [p["data"] for p in experiment.metrics("train").read()["data"]]
        cumulative = [p["data"] for p in metric.read()["data"]]
    assert [(d["epoch"], d["loss.mean"], d["loss.min"], d["loss.max"], d["loss.count"]) for d in train] == [
        (0, 1.5, 0.0, 3.0, 4), (1, 11.5, 10.0, 13.0, 4), (2, 21.5, 20.0, 23.0, 4)]
    assert train[0]["loss.std"] == pytest.approx(np.std([0, 1, 2, 3], ddof=1))
    assert [d["x.count"] for d in cumulative] == [1, 2]
    assert cumulative[1]["x.mean"] == 2.0 and "y.mean" not in cumulative[1]


def test_metric_buffer_log_summary_aggregations(root: str) -> None:
    with Experiment(name="buf", project="project", local_path=root).run as experiment:
        for v in [1.0, 2.0, 3.0, 4.0, float("nan")]:
            experiment.metrics("train").buffer(loss=v, acc=v / 10)
        experiment.metrics("eval").buffer(loss=9.0)
        assert experiment.metrics.buffer.peek("train", "loss", limit=2)["loss"][0] == 4.0
        experiment.metrics.buffer.log_summary("mean", "std", "min", "max", "count", "median", "sum",
                                              "p50", "p90", "p95", "p99", "first", "last", step=7)
        with pytest.raises(ValueError, match="aggregation"):
            experiment.metrics.buffer.log_summary("mode")
        train = experiment.metrics("train").read()["data"][0]["data"]
        ev = experiment.metrics("eval").read()["data"][0]["data"]
    assert (train["step"], train["loss.mean"], train["loss.sum"], train["loss.count"]) == (7, 2.5, 10.0, 4)
    assert train["loss.median"] == train["loss.p50"] == 2.5
    assert (train["loss.first"], train["loss.last"]) == (1.0, 4.0)
    assert train["loss.p90"] == pytest.approx(3.7) and ev["loss.max"] == 9.0


def test_training_loop_example(root: str) -> None:
    def train_one_epoch(epoch: int) -> float:
        return 1.0 / (epoch + 1)

    with Experiment(name="mnist-training", project="cv", local_path=root).run as experiment:
        experiment.params.set(learning_rate=0.001, batch_size=32)
        experiment.log("Starting training")
        for epoch in range(10):
            train_loss = train_one_epoch(epoch)
            val_loss, val_accuracy = train_loss * 1.1, 0.5 + epoch * 0.04
            experiment.metrics.log(epoch=epoch + 1)
            experiment.metrics("train").log(loss=train_loss, accuracy=val_accuracy)
            experiment.metrics("eval").log(loss=val_loss, accuracy=val_accuracy)
            experiment.metrics.flush()
            losses = {"train_loss": train_loss, "val_loss": val_loss}
            experiment.log(f"Epoch {epoch + 1}/10 complete", metadata=losses)
        experiment.log("Training complete")
    run = run_dir(root, "cv/mnist-training")
    assert len(read_jsonl(run / "metrics" / "train" / "data.jsonl")) == 10
    unnamed = read_jsonl(run / "metrics" / "None" / "data.jsonl")
    assert [p["data"]["epoch"] for p in unnamed] == list(range(1, 11))
    assert len(read_jsonl(run / "logs" / "logs.jsonl")) == 12
    assert read_json(run / "experiment.json")["status"] == "completed"
