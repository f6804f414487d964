"""``dxp`` (``dashcar.auto_start``), the experiment decorators, and ML-Dash's module spellings."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import dashcar
from dashcar import Experiment, dashcar_experiment, ml_dash_experiment
from tests.conftest import AgentHandle, read_json, read_jsonl, wait_until

DXP_RUN = ("alice", "scratch", "2024", "05-06", "experiments", "quick", "07.08.09", "000")
"""Where the scripts below put dxp: RUN's default prefix for user alice, RUN.now and experiments/quick.py."""

DXP_SCRIPT = """
import sys
from datetime import datetime
from dashcar.run import RUN
from dashcar.auto_start import dxp

RUN.entry = __file__
RUN.now = datetime(2024, 5, 6, 7, 8, 9)
dxp.log("Starting quick experiment")
dxp.params.set(lr=0.001, batch_size=32)
dxp.metrics("train").log(loss=0.5, step=0)
dxp.metrics("train").log(loss=0.4, step=1)
"""
"""ML-Dash's documented dxp example (auto-started, completed at exit) with RUN.entry set after the import."""


def run_in_project(tmp_path: Path, body: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run ``body`` as ``experiments/quick.py`` of a project in ``tmp_path``; the result and dxp's run dir."""
    project = tmp_path / "proj"
    (project / "experiments").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    script = project / "experiments" / "quick.py"
    script.write_text(textwrap.dedent(body))
    res = subprocess.run([sys.executable, str(script)], cwd=project, env={**env, "ML_DASH_USER": "alice"},
                         capture_output=True, text=True, timeout=60)
    return res, project.joinpath(".dash", *DXP_RUN)


@pytest.mark.parametrize(
    ("ending", "status", "reason", "code"),
    [
        ("", "completed", None, 0),
        ("sys.exit(0)", "completed", None, 0),
        ("raise ValueError('boom')", "failed", "ValueError: boom", 1),
        ("raise KeyboardInterrupt", "cancelled", "KeyboardInterrupt", -2),
    ],
)
def test_dxp_starts_on_first_use_and_closes_at_exit_with_the_right_status(
    agent: AgentHandle, tmp_path: Path, ending: str, status: str, reason: str | None, code: int
) -> None:
    res, run = run_in_project(tmp_path, DXP_SCRIPT + ending + "\n", agent.env())
    assert res.returncode == code, res.stderr
    closed = wait_until(lambda: (read_json(run / "experiment.json") or {}).get("status") not in (None, "running"),
                        20, "dxp's run closed")
    meta = read_json(run / "experiment.json")
    assert closed and meta["status"] == status and meta["dashcar"]["reason"] == reason
    assert [p["data"]["loss"] for p in read_jsonl(run / "metrics" / "train" / "data.jsonl")] == [0.5, 0.4]
    assert read_json(run / "parameters.json")["data"] == {"lr": 0.001, "batch_size": 32}
    assert [e["message"] for e in read_jsonl(run / "logs" / "logs.jsonl")] == ["Starting quick experiment"]


def test_dxp_with_its_run_block_as_ml_dash_readme_shows(agent: AgentHandle, tmp_path: Path) -> None:
    res, run = run_in_project(tmp_path, """
        from datetime import datetime
        from dashcar import RUN
        from dashcar.auto_start import dxp

        RUN.now = datetime(2024, 5, 6, 7, 8, 9)
        with dxp.run:
            dxp.log("Training started", level="info")
            dxp.params.set(learning_rate=0.001, batch_size=32)
            for epoch in range(3):
                dxp.metrics("train").log(loss=1.0 / (epoch + 1), epoch=epoch)
            assert dxp.run.prefix == "alice/scratch/2024/05-06/experiments/quick/07.08.09/000"
        print(len(dxp.metrics("train").read()["data"]))
    """, agent.env())
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "3"
    assert read_json(run / "experiment.json")["status"] == "completed"


def test_importing_auto_start_starts_nothing(tmp_path: Path) -> None:
    res, _ = run_in_project(tmp_path, """
        from dashcar.auto_start import dxp
        print(dxp._open, dxp._transport is None, repr(dxp))
    """, dict(os.environ, DASHCAR_AUTOSPAWN="0", DASHCAR_RUNTIME_DIR=str(tmp_path / "rt")))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split(" ", 2)[:2] == ["False", "True"] and "derived when first needed" in res.stdout
    assert not (tmp_path / "proj" / ".dash").exists() and not (tmp_path / "rt").exists()


def test_ml_dash_experiment_decorator_runs_the_documented_example(agent: AgentHandle) -> None:
    @ml_dash_experiment(prefix="alice/project/my-experiment", dash_root=agent.data_dir, echo_logs=False)
    def train_model(experiment: Experiment) -> str:
        experiment.log("Training started")
        experiment.params.set(learning_rate=0.001)
        for epoch in range(10):
            experiment.metrics("train").log(loss=1.0 / (epoch + 1), epoch=epoch)
        return "Training complete!"

    assert train_model() == "Training complete!" and train_model.__name__ == "train_model"
    run = agent.data_dir / "alice" / "project" / "my-experiment"
    assert read_json(run / "experiment.json")["status"] == "completed"
    assert [p["data"]["epoch"] for p in read_jsonl(run / "metrics" / "train" / "data.jsonl")] == list(range(10))
    assert dashcar_experiment is ml_dash_experiment


def test_a_decorated_function_that_raises_fails_its_run(agent: AgentHandle) -> None:
    @dashcar_experiment(prefix="alice/project/broken", dash_root=agent.data_dir, echo_logs=False)
    def train(lr: float, experiment: Experiment) -> None:
        experiment.params.set(lr=lr)
        raise RuntimeError("diverged")

    with pytest.raises(RuntimeError, match="diverged"):
        train(0.1)
    meta = read_json(agent.data_dir / "alice" / "project" / "broken" / "experiment.json")
    assert meta["status"] == "failed" and meta["dashcar"]["reason"] == "RuntimeError: diverged"


def test_run_as_a_decorator_as_ml_dash_documents_it(agent: AgentHandle) -> None:
    """ML-Dash's API reference shows ``@exp.run``; its 0.11 raises ``TypeError`` there."""
    exp = Experiment(prefix="alice/my-project/training-run", dash_root=agent.data_dir, echo_logs=False)

    @exp.run
    def train_model(experiment: Experiment) -> dict[str, float]:
        experiment.params.set(lr=0.001, epochs=50, model="resnet50")
        experiment.metrics("train").log(loss=0.5, epoch=0)
        return {"final_loss": 0.5}

    assert train_model() == {"final_loss": 0.5}
    assert read_json(exp.run_dir / "experiment.json")["status"] == "completed"


@pytest.mark.parametrize(
    ("module", "name"),
    [("auto_start", "dxp"), ("run", "RUN"), ("params", "ParametersBuilder"), ("", "RUN"), ("", "ParametersBuilder"),
     ("", "ml_dash_experiment"), ("", "Experiment")],
)
def test_ml_dash_import_spellings_work_with_dashcar(module: str, name: str) -> None:
    """``from ml_dash<.module> import <name>`` becomes ``from dashcar<.module> import <name>``."""
    theirs = "ml_dash" + (f".{module}" if module else "")
    assert importlib.util.find_spec(theirs) is not None, f"{theirs} is an ML-Dash module"
    ours: Any = importlib.import_module("dashcar" + (f".{module}" if module else ""))
    assert getattr(ours, name) is not None
    if module == "run":
        assert ours.RUN is dashcar.RUN
    if module == "params":
        assert ours.ParametersBuilder is dashcar.ParamsBuilder
