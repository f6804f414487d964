"""Every example of the DreamLake tracks document, run against dashcar's ``Session``."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dashcar import Session
from tests.conftest import AgentHandle, read_json, read_jsonl


@pytest.fixture
def data(agent: AgentHandle) -> str:
    return str(agent.data_dir)


def test_basic_append_returns_the_index(data: str) -> None:
    with Session(name="demo", workspace="test", local_path=data) as session:
        result = session.track("train_loss").append(value=0.5, epoch=1)
        assert f"Appended at index {result['index']}" == "Appended at index 0"
        assert session.track("train_loss").append(value=0.4, epoch=2)["index"] == 1
    lines = read_jsonl(Path(data) / "test" / "demo" / "tracks" / "train_loss" / "data.jsonl")
    assert [(x["index"], x["data"]["value"], x["data"]["epoch"]) for x in lines] == [(0, 0.5, 1), (1, 0.4, 2)]


def test_flexible_schema(data: str) -> None:
    with Session(name="demo", workspace="test", local_path=data) as session:
        session.track("loss").append(value=0.5)
        session.track("accuracy").append(value=0.85, step=100, epoch=1)
        session.track("metrics").append(loss=0.5, accuracy=0.85, learning_rate=0.001, epoch=1)
        now = time.time()
        session.track("system").append(cpu_percent=45.2, memory_mb=1024, timestamp=now)
        system = session.track("system").read()["data"][0]["data"]
    assert system["timestamp"] == now and system["cpu_percent"] == 45.2


def test_batch_append_and_read(data: str) -> None:
    with Session(name="demo", workspace="test", local_path=data) as session:
        result = session.track("train_loss").append_batch([
            {"value": 0.5, "step": 1, "epoch": 1},
            {"value": 0.45, "step": 2, "epoch": 1},
            {"value": 0.40, "step": 3, "epoch": 1},
            {"value": 0.38, "step": 4, "epoch": 1},
        ])
        assert f"Appended {result['count']} data points" == "Appended 4 data points"
        assert f"Index range: {result['startIndex']} to {result['endIndex']}" == "Index range: 0 to 3"
        for i in range(100):
            session.track("loss").append(value=1.0 / (i + 1), step=i)
        result = session.track("loss").read(start_index=0, limit=10)
        assert result["total"] == 10
        lines = [f"Index {point['index']}: {point['data']['step']}" for point in result["data"]]
        assert lines[:2] == ["Index 0: 0", "Index 1: 1"]


def test_stats_and_list_all(data: str) -> None:
    with Session(name="demo", workspace="test", local_path=data) as session:
        for i in range(1000):
            session.track("loss").append(value=1.0 / (i + 1), step=i)
        stats = session.track("loss").stats()
        counts = (stats["totalDataPoints"], stats["bufferedDataPoints"], stats["chunkedDataPoints"])
        assert (stats["name"], *counts) == ("loss", "1000", "1000", "0")
        session.track("train_loss").append(value=0.5)
        session.track("val_loss").append(value=0.6)
        session.track("train_acc").append(value=0.85)
        session.track("val_acc").append(value=0.83)
        tracks = session.track("train_loss").list_all()
    assert {t["name"]: t["totalDataPoints"] for t in tracks} == {
        "loss": "1000", "train_loss": "1", "val_loss": "1", "train_acc": "1", "val_acc": "1"}


def test_training_loop_and_learning_rate_tracking(data: str) -> None:
    with Session(name="mnist-training", workspace="computer-vision", local_path=data) as session:
        session.parameters().set(learning_rate=0.001, batch_size=32, epochs=10)
        session.log("Starting training")
        learning_rate = 0.1
        for epoch in range(10):
            session.track("train_loss").append(value=1 / (epoch + 1), epoch=epoch + 1)
            session.track("train_accuracy").append(value=0.1 * epoch, epoch=epoch + 1)
            session.track("val_loss").append(value=1.1 / (epoch + 1), epoch=epoch + 1)
            session.track("val_accuracy").append(value=0.09 * epoch, epoch=epoch + 1)
            session.track("learning_rate").append(value=learning_rate, epoch=epoch)
            if (epoch + 1) % 3 == 0:
                learning_rate *= 0.1
                session.log(f"Learning rate reduced to {learning_rate}")
            session.log(f"Epoch {epoch + 1}/10 complete", metadata={"train_loss": 1 / (epoch + 1)})
        session.log("Training complete")
    run = Path(data) / "computer-vision" / "mnist-training"
    params = read_json(run / "parameters.json")["data"]
    assert params == {"learning_rate": 0.001, "batch_size": 32, "epochs": 10}
    assert len(read_jsonl(run / "tracks" / "val_accuracy" / "data.jsonl")) == 10
    last_lr = read_jsonl(run / "tracks" / "learning_rate" / "data.jsonl")[-1]["data"]["value"]
    assert last_lr == pytest.approx(0.0001)
    assert len(read_jsonl(run / "logs" / "logs.jsonl")) == 15


def test_system_monitoring_batching_and_params_call(data: str) -> None:
    with Session(name="system-monitor", workspace="monitoring", local_path=data) as session:
        for i in range(5):
            session.track("system_metrics").append(
                timestamp=1000.0 + i, cpu_percent=10.0 * i, memory_percent=50.0,
                memory_used_gb=4.0, memory_available_gb=12.0,
            )
        session.params(learning_rate=0.001, batch_size=32)
        session.log("Training started", level="info")
        batch = []
        for step in range(1000):
            batch.append({"value": 1 / (step + 1), "step": step, "epoch": step // 100})
            if len(batch) >= 100:
                session.track("train_loss").append_batch(batch)
                batch = []
        if batch:
            session.track("train_loss").append_batch(batch)
        assert session.track("train_loss").stats()["totalDataPoints"] == "1000"
    run = Path(data) / "monitoring" / "system-monitor"
    assert read_json(run / "parameters.json")["data"] == {"learning_rate": 0.001, "batch_size": 32}
    system = read_jsonl(run / "tracks" / "system_metrics" / "data.jsonl")
    assert [x["data"]["cpu_percent"] for x in system] == [0, 10, 20, 30, 40]


def test_track_metadata_and_storage_format(data: str) -> None:
    with Session(name="demo", workspace="test", local_path=data) as session:
        session.track(
            name="train_loss", description="Training loss (cross-entropy)", tags=["training", "loss"],
            metadata={"unit": "nats", "goal": "minimize"},
        ).append(value=0.5, epoch=1)
        session.track("train_loss").append(value=0.45, epoch=2)
        session.track("train_loss").append(value=0.40, epoch=3)
    d = Path(data) / "test" / "demo" / "tracks" / "train_loss"
    assert [(x["index"], x["data"]["value"], x["data"]["epoch"]) for x in read_jsonl(d / "data.jsonl")] == [
        (0, 0.5, 1), (1, 0.45, 2), (2, 0.40, 3)]
    meta = read_json(d / "metadata.json")
    counts = (meta["totalDataPoints"], meta["bufferedDataPoints"], meta["chunkedDataPoints"])
    assert (meta["name"], *counts) == ("train_loss", 3, 3, 0)
    assert meta["description"] == "Training loss (cross-entropy)" and meta["tags"] == ["training", "loss"]
    assert meta["metadata"] == {"unit": "nats", "goal": "minimize"}
