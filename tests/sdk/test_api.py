"""API details beyond the seed examples: run statuses, _ts=-1, log builders, echo, metadata, portability."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dashcar
from tests.conftest import AgentHandle, read_json, read_jsonl, wait_until


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ("raise KeyboardInterrupt", "cancelled", -2),
        ("sys.exit(0)", "completed", 0),
        ("sys.exit(3)", "failed", 3),
        ("raise ValueError('bad lr')", "failed", 1),
        ("pass", "completed", 0),
    ],
)
def test_leaving_the_run_block_sets_the_status(agent: AgentHandle, body: str, status: str, code: int) -> None:
    script = textwrap.dedent(
        f"""
        import sys, dashcar
        with dashcar.Experiment(prefix="a/status/run", dash_root={str(agent.data_dir)!r}).run as exp:
            exp.metrics("m").log(x=1)
            {body}
        """
    )
    res = subprocess.run([sys.executable, "-c", script], env=agent.env(), capture_output=True, timeout=60)
    assert res.returncode == code
    meta = read_json(agent.data_dir / "a" / "status" / "run" / "experiment.json")
    assert meta["status"] == status
    if body.startswith("raise ValueError"):
        assert meta["dashcar"]["reason"] == "ValueError: bad lr"


def test_ts_minus_one_reuses_this_threads_previous_timestamp(agent: AgentHandle) -> None:
    with dashcar.Experiment(prefix="a/ts/reuse", dash_root=agent.data_dir).run as exp:
        with pytest.raises(ValueError, match="previous timestamp"):
            exp.tracks("cam").append(frame=0, _ts=-1)
        exp.tracks("robot/pose").append(x=1.0, _ts=12.5)
        exp.tracks("camera/left").append(width=640, _ts=-1)
        exp.metrics("m").log(v=1, _ts=-1)
        assert exp.tracks("camera/left").list_entries() == [{"timestamp": 12.5, "width": 640}]
        assert exp.metrics("m").read()["data"][0]["data"]["_ts"] == 12.5


def test_log_builder_levels_and_echo_switch(agent: AgentHandle, capsys: pytest.CaptureFixture[str]) -> None:
    with dashcar.Experiment(prefix="a/logs/builder", dash_root=agent.data_dir, echo_logs=False).run as exp:
        exp.logs.debug("d", step=1)
        exp.logs.info("i")
        exp.logs.warn("w", memory_available="1GB")  # noqa: G010 - ML-Dash's LogBuilder.warn is under test, not logging's
        exp.logs.error("e", error_code=500)
        exp.logs.fatal("f")
        exp.log("x", level="warning", metadata={"a": 1}, b=2)
        with pytest.raises(ValueError, match="debug, info, warn, error, fatal"):
            exp.log("x", level="verbose")
    assert capsys.readouterr() == ("", ""), "echo off: nothing printed"
    logs = read_jsonl(agent.data_dir / "a" / "logs" / "builder" / "logs" / "logs.jsonl")
    assert [(e["level"], e["message"], e.get("metadata")) for e in logs] == [
        ("debug", "d", {"step": 1}), ("info", "i", None), ("warn", "w", {"memory_available": "1GB"}),
        ("error", "e", {"error_code": 500}), ("fatal", "f", None), ("warn", "x", {"a": 1, "b": 2}),
    ]


def test_track_and_metric_descriptions_land_in_metadata(agent: AgentHandle) -> None:
    with dashcar.Experiment(prefix="a/meta/desc", dash_root=agent.data_dir).run as exp:
        exp.tracks("robot/state", description="arm state", tags=["arm"], metadata={"fps": 100}).append(q=1, _ts=0.0)
        exp.tracks("robot/state").append(q=2, _ts=0.5)
        exp.metrics("train", description="training loss", tags=["loss"]).log(loss=1.0)
        listed = exp.tracks.list("robot/*")
        mocap = exp.tracks("robot/state").read(format="mocap")
        stats = exp.metrics("train").stats()
    assert listed[0]["description"] == "arm state" and listed[0]["tags"] == ["arm"]
    assert mocap["metadata"]["fps"] == 100 and mocap["metadata"]["description"] == "arm state"
    assert stats["description"] == "training loss" and stats["tags"] == ["loss"]
    assert exp.tracks.list("camera/*") == []


def test_reading_needs_no_agent_and_works_on_a_copied_run(agent: AgentHandle, tmp_path: Path) -> None:
    with dashcar.Experiment(prefix="a/copy/run", dash_root=agent.data_dir).run as exp:
        exp.params.set(lr=0.1)
        exp.metrics("m").log(v=1)
        exp.tracks("t").append(x=1, _ts=1.0)
    assert agent.stop() == 0
    shutil.copytree(agent.data_dir, tmp_path / "elsewhere")
    copy = dashcar.Experiment(prefix="a/copy/run", dash_root=tmp_path / "elsewhere")
    assert copy.params.get() == {"lr": 0.1}
    assert copy.metrics("m").read()["data"][0]["data"]["v"] == 1
    assert copy.tracks("t").read() == {"entries": [{"timestamp": 1.0, "x": 1}], "count": 1}


def test_read_right_after_write_sees_it(agent: AgentHandle) -> None:
    exp = dashcar.Experiment(prefix="a/fresh/read", dash_root=agent.data_dir).start()
    for i in range(100):
        exp.tracks("t").append(i=i, _ts=float(i))
        exp.metrics("m").log(i=i)
    assert len(exp.tracks("t").list_entries()) == 100
    assert exp.metrics("m").read()["endIndex"] == 99
    exp.complete()


def test_unknown_read_format_is_a_clear_error(agent: AgentHandle) -> None:
    with dashcar.Experiment(prefix="a/fmt/bad", dash_root=agent.data_dir).run as exp:
        with pytest.raises(ValueError, match="json, jsonl, parquet, mocap"):
            exp.tracks("t").read(format="csv")


@pytest.mark.parametrize("module", ["dashcar", "dashcar.auto_start", "dashcar.run", "dashcar.params"])
def test_import_stays_light(module: str) -> None:
    heavy = ("lmdb", "pyarrow", "anyio", "numpy", "orjson", "params_proto", "ml_dash", "rich", "prometheus_client", "mcap",
             "dashcar.cli", "dashcar.agent", "httpx", "keyring", "cryptography")
    code = f"import sys, {module}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_closed_run_closes_once_every_process_is_done(agent: AgentHandle) -> None:
    first = dashcar.Experiment(prefix="a/ddp/run", dash_root=agent.data_dir).start()
    assert first.flush(), "rank 0 is attached before rank 1 starts"
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import dashcar
        with dashcar.Experiment(prefix="a/ddp/run", dash_root={str(agent.data_dir)!r}).run as exp:
            exp.metrics("rank1").log(x=1)
        """)], env=agent.env(), timeout=60)
    assert res.returncode == 0
    meta_path = agent.data_dir / "a" / "ddp" / "run" / "experiment.json"
    assert read_json(meta_path)["status"] == "running", "rank 0 still holds the run open"
    first.complete()
    wait_until(lambda: read_json(meta_path)["status"] == "completed", 10, "run completed")
