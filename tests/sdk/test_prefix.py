"""Run prefixes as ML-Dash 0.11 spells them: ``RUN``, template fields, ``exp.run.prefix``, derived prefixes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from dashcar import RUN, Experiment, RunConfig, Session
from dashcar._run import SNOWFLAKE_EPOCH_MS
from tests.conftest import AgentHandle, read_json

NOW = datetime(2024, 5, 6, 7, 8, 9)
SETTINGS = ("user", "project", "prefix", "job_name", "now", "entry", "project_root")


@pytest.fixture
def run_defaults() -> Iterator[RunConfig]:
    """``RUN`` with its clock fixed at ``NOW``; every setting back to its default afterwards."""
    counter = RUN.job_counter
    RUN.now = NOW
    yield RUN
    for name in SETTINGS:
        setattr(RUN, name, None)
    RUN.job_counter = counter


def run_script(script: Path, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run ``script`` in a fresh interpreter (ML-Dash's version check off); its stdout."""
    full = {**(env if env is not None else os.environ), "ML_DASH_NO_VERSION_CHECK": "1", "ML_DASH_USER": "alice"}
    res = subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"{script.name} {args} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project directory (it has a pyproject.toml) whose scripts live in ``experiments/``."""
    root = tmp_path / "proj"
    (root / "experiments").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    return root


def test_fields_resolve_when_the_prefix_is_given(run_defaults: RunConfig, tmp_path: Path) -> None:
    n = RUN.job_counter
    exp = Experiment(prefix="alice/proj/{now:%Y-%m-%d}/{EXP.date}/{EXP.datetime_str}/r{job_counter:03d}", dash_root=tmp_path)
    assert exp.prefix == f"alice/proj/2024-05-06/20240506/20240506.070809/r{n:03d}"
    assert exp.run.prefix == exp.prefix and exp.run.job_counter == n and RUN.job_counter == n + 1
    assert (exp.run.owner, exp.run.project, exp.run.name) == ("alice", "proj", f"r{n:03d}")


def test_exp_fields_resolve_when_the_prefix_is_set_before_start(run_defaults: RunConfig, tmp_path: Path) -> None:
    exp = Experiment(prefix="alice/proj/base", dash_root=tmp_path)
    exp.run.prefix = "{EXP.owner}/{EXP.project}/{EXP.name}-{EXP.id}"
    run_id = exp.run.id
    assert exp.prefix == f"alice/proj/base-{run_id}" and exp.run.id == run_id
    assert abs((run_id >> 22) + SNOWFLAKE_EPOCH_MS - time.time() * 1000) < 60_000, "ms since 2024-01-01 in the high bits"
    assert (run_id >> 12) & 0x3FF == os.getpid() & 0x3FF, "then 10 bits of the pid"


def test_an_id_put_in_the_prefix_is_the_runs_id(run_defaults: RunConfig, tmp_path: Path) -> None:
    """ML-Dash 0.11 resets ``run.id`` to None after using one in a prefix given at construction."""
    exp = Experiment(prefix="alice/proj/{EXP.id}", dash_root=tmp_path)
    assert exp.run.name == str(exp.run.id)


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("alice/proj/{EXP.name}", "has none yet"),
        ("alice/proj/{bogus}", "unknown field 'bogus'"),
        ("alice/proj/{EXP.nope}", "unknown field 'nope'"),
        ("alice/proj/{job_counter:%Y}", "Invalid format specifier"),
        ("alice/proj/{EXP[0]}", "fields are"),
    ],
)
def test_a_field_that_cannot_be_filled_is_a_value_error(run_defaults: RunConfig, tmp_path: Path, template: str,
                                                        match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Experiment(prefix=template, dash_root=tmp_path)


def test_setting_the_prefix_before_start_moves_the_run_and_after_start_raises(agent: AgentHandle) -> None:
    exp = Experiment(prefix="alice/proj/first", dash_root=agent.data_dir, echo_logs=False)
    exp.run.prefix = "alice/proj/{EXP.name}-renamed"
    with exp.run:
        exp.metrics("m").log(x=1)
        with pytest.raises(RuntimeError, match="after it started"):
            exp.run.prefix = "alice/proj/other"
        assert exp.prefix == "alice/proj/first-renamed"
    assert read_json(agent.data_dir / "alice" / "proj" / "first-renamed" / "experiment.json")["status"] == "completed"
    assert sorted(p.name for p in (agent.data_dir / "alice" / "proj").iterdir()) == ["first-renamed"]

    implicit = Experiment(prefix="alice/proj/implicit", dash_root=agent.data_dir, echo_logs=False)
    implicit.log("the first call opens the run")
    with pytest.raises(RuntimeError, match="after it started"):
        implicit.run.prefix = "alice/proj/too-late"
    implicit.complete()


def _targets(exp: Experiment) -> dict[str, Any]:
    return {
        "exp.run": exp.run, "exp": exp, "exp.params": exp.params, "exp.metrics": exp.metrics,
        "exp.metrics('m')": exp.metrics("m"), "exp.metrics.buffer": exp.metrics.buffer,
        "summary_cache": exp.metrics("m").summary_cache, "exp.tracks": exp.tracks, "exp.tracks('t')": exp.tracks("t"),
        "exp.logs": exp.logs, "RUN": RUN,
    }


@pytest.mark.parametrize("target", ["exp.run", "exp", "exp.params", "exp.metrics", "exp.metrics('m')", "exp.metrics.buffer",
                                    "summary_cache", "exp.tracks", "exp.tracks('t')", "exp.logs", "RUN"])
def test_no_part_of_a_run_accepts_an_unknown_attribute(tmp_path: Path, target: str) -> None:
    obj = _targets(Experiment(prefix="alice/proj/strict", dash_root=tmp_path))[target]
    with pytest.raises(AttributeError):
        obj.prefx = "alice/proj/typo"
    assert not hasattr(obj, "prefx")


def test_the_run_object_says_what_can_be_set(tmp_path: Path) -> None:
    exp = Experiment(prefix="alice/proj/strict", dash_root=tmp_path)
    with pytest.raises(AttributeError, match=r"only exp.run.prefix can be set"):
        exp.run.prefx = "alice/proj/typo"
    with pytest.raises(AttributeError, match=r"exp.run.name is read-only; set exp.run.prefix"):
        exp.run.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError, match=r"RUN has no setting 'prefx'; the settings are user, project, prefix"):
        RUN.prefx = "x"
    with pytest.raises(AttributeError):
        Session(name="s", workspace="w", local_path=tmp_path).nmae = "x"  # type: ignore[attr-defined]
    exp.run.prefix = "alice/proj/fixed"
    assert exp.prefix == "alice/proj/fixed" and not (tmp_path / "alice").exists(), "nothing starts before first use"


def test_prefixes_resolve_as_ml_dash_resolves_them(project: Path) -> None:
    """One script, run with ``ml_dash`` and with ``dashcar``: every prefix is the same path."""
    script = project / "experiments" / "train.py"
    script.write_text(textwrap.dedent("""
        import sys
        from datetime import datetime
        if sys.argv[1] == "ml_dash":
            from ml_dash import RUN, Experiment
        else:
            from dashcar import RUN, Experiment
        RUN.now = datetime(2024, 5, 6, 7, 8, 9)
        RUN.entry = __file__
        out = [Experiment(prefix="alice/p/{now:%Y-%m-%d}/r{job_counter}/{user}").run.prefix]
        e = Experiment(prefix="alice/p/base")
        e.run.prefix = "alice/p/{EXP.name}/{EXP.date}/{EXP.datetime_str}/{EXP.owner}"
        out.append(e.run.prefix)
        out.append(Experiment().run.prefix)
        RUN.project = "bob/robotics"
        out.append(Experiment().run.prefix)
        RUN.job_name = "{now:%H%M}-{job_counter}"
        out.append(Experiment().run.prefix)
        RUN.prefix = "{user}/runs/{now:%Y%m%d}/{job_counter:03d}"
        out.append(Experiment().run.prefix)
        print("\\n".join(out))
    """))
    theirs = run_script(script, "ml_dash", cwd=project).splitlines()
    ours = run_script(script, "dashcar", cwd=project).splitlines()
    assert ours == theirs
    assert ours == [
        "alice/p/2024-05-06/r0/alice",
        "alice/p/base/20240506/20240506.070809/alice",
        "alice/scratch/2024/05-06/experiments/train/07.08.09/002",
        "bob/robotics/2024/05-06/experiments/train/07.08.09/003",
        "bob/robotics/2024/05-06/experiments/train/0708-4",
        "alice/runs/20240506/005",
    ]


def test_a_derived_prefix_names_the_script_that_made_the_run(project: Path) -> None:
    """ML-Dash 0.11 names its own ``experiment.py`` unless ``RUN.entry`` is set; dashcar finds the caller."""
    script = project / "experiments" / "vision" / "resnet.py"
    script.parent.mkdir()
    script.write_text(textwrap.dedent("""
        from datetime import datetime
        from dashcar import RUN, Experiment
        RUN.now = datetime(2024, 5, 6, 7, 8, 9)
        exp = Experiment()
        print(exp.run.path_stem, exp.prefix, Experiment(prefix="a/b/{EXP.date}").prefix)
    """))
    stem, prefix, dated = run_script(script, cwd=project / "experiments").split()
    assert stem == "experiments/vision/resnet"
    assert prefix == "alice/scratch/2024/05-06/experiments/vision/resnet/07.08.09/000"
    assert dated == "a/b/20240506", "RUN.now applies at construction too (ML-Dash 0.11 uses its import time there)"


def test_ml_dash_prefix_from_the_environment(project: Path) -> None:
    script = project / "experiments" / "env.py"
    script.write_text(textwrap.dedent("""
        import sys
        if sys.argv[1] == "ml_dash":
            from ml_dash import Experiment
        else:
            from dashcar import Experiment
        print(Experiment().run.prefix)
    """))
    env = {**os.environ, "ML_DASH_PREFIX": "alice/envp/{job_counter:02d}"}
    assert run_script(script, "dashcar", cwd=project, env=env) == run_script(script, "ml_dash", cwd=project, env=env)
    assert run_script(script, "dashcar", cwd=project, env=env).strip() == "alice/envp/00"


@pytest.mark.parametrize(
    ("setting", "value"),
    [("job_counter", -1), ("job_counter", True), ("now", "2024-05-06"), ("prefix", 3), ("entry", 1.5)],
)
def test_run_settings_are_type_checked(run_defaults: RunConfig, setting: str, value: object) -> None:
    with pytest.raises(TypeError):
        setattr(RUN, setting, value)


def test_none_restores_a_default(run_defaults: RunConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ML_DASH_USER", "carol")
    RUN.user = "dave"
    RUN.project = "x/y"
    assert (RUN.user, RUN.project) == ("dave", "x/y")
    RUN.user = None
    RUN.project = None
    assert (RUN.user, RUN.project) == ("carol", "{user}/scratch")


def test_a_derived_prefix_is_fixed_when_first_needed(run_defaults: RunConfig, tmp_path: Path) -> None:
    exp = Experiment(dash_root=tmp_path)
    RUN.project = "late/settings"
    first = exp.prefix
    RUN.project = "later/still"
    assert first.startswith("late/settings/2024/05-06/tests/sdk/test_prefix/07.08.09/") and exp.prefix == first
