"""ML-Dash 0.11 spellings beyond prefixes: readme=, ParametersBuilder's helpers, _ts messages, dash_url, names."""

from __future__ import annotations

from typing import Any

import pytest

from dashcar import Experiment, InvalidName, ParametersBuilder
from tests.conftest import AgentHandle, read_json

flatten = ParametersBuilder.flatten_dict
unflatten = ParametersBuilder.unflatten_dict


@pytest.mark.parametrize("spelling", ["readme", "description"])
def test_readme_and_description_are_the_experiments_description(agent: AgentHandle, spelling: str) -> None:
    text = "ResNet-50 training with new augmentation"
    kwargs: dict[str, Any] = {spelling: text}
    with Experiment(prefix=f"alice/computer-vision/{spelling}", dash_root=agent.data_dir, tags=["resnet", "imagenet"],
                    **kwargs).run as exp:
        exp.log("Training started")
        assert exp.readme == exp.description == text
    meta = read_json(exp.run_dir / "experiment.json")
    assert (meta["description"], meta["tags"]) == (text, ["resnet", "imagenet"])


def test_readme_and_description_must_agree(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="same field"):
        Experiment(prefix="a/b/c", dash_root=tmp_path, readme="x", description="y")


@pytest.mark.parametrize(
    ("nested", "flat"),
    [
        ({}, {}),
        ({"a": 1, "b": 2}, {"a": 1, "b": 2}),
        ({"a": {"b": 1, "c": 2}}, {"a.b": 1, "a.c": 2}),
        ({"a": {"b": {"c": {"d": 42}}}}, {"a.b.c.d": 42}),
        ({"a": {"b": 1, "c": {"d": 2}}, "e": 3}, {"a.b": 1, "a.c.d": 2, "e": 3}),
        ({"a": [1, 2, 3]}, {"a": [1, 2, 3]}),
        ({"a": None, "b": {"c": None}}, {"a": None, "b.c": None}),
        ({"a": True, "b": {"c": False}}, {"a": True, "b.c": False}),
        ({"0": {"1": "val"}}, {"0.1": "val"}),
    ],
)
def test_flatten_and_unflatten_dict_as_ml_dash_has_them(nested: dict[str, Any], flat: dict[str, Any]) -> None:
    assert flatten(nested) == flat
    assert unflatten(flat) == nested


def test_flatten_dict_separator_and_parent_key() -> None:
    assert flatten({"a": {"b": 1}}, sep="/") == {"a/b": 1}
    assert flatten({"x": {"y": {"z": 99}}}, sep="__") == {"x__y__z": 99}
    assert flatten({"b": 1}, parent_key="a") == {"a.b": 1}
    assert unflatten({"a/b": 1}, sep="/") == {"a": {"b": 1}}


def test_params_store_what_flatten_dict_gives(agent: AgentHandle) -> None:
    """Stored params are ``flatten_dict`` of what was set; an empty dict stays (ML-Dash drops it)."""
    nested = {"model": {"architecture": "resnet50", "layers": {"hidden": 128}}, "lr": 0.001, "extra": {}}
    with Experiment(prefix="alice/project/params", dash_root=agent.data_dir).run as exp:
        exp.params.set(**nested)
        assert exp.params.get() == flatten(nested)
        assert exp.params.get(flatten=False) == unflatten(flatten(nested)) == nested


def test_a_missing_or_non_numeric_ts_says_how_to_pass_it(tmp_path: Any) -> None:
    exp = Experiment(prefix="alice/sensors/ts", dash_root=tmp_path)
    with pytest.raises(ValueError, match=r"tracks\('sensor'\)\.append: .*pass _ts=<seconds>, e\.g\. append\(q=\.\.\., _ts=t\)"):
        exp.tracks("sensor").append(temp=27.0)
    with pytest.raises(ValueError, match=r"got '1\.0'; pass it as a number, e\.g\. append\(q=\.\.\., _ts=t\)"):
        exp.tracks("sensor").append(temp=27.0, _ts="1.0")
    with pytest.raises(ValueError, match="'timestamp' is the row's own key"):
        exp.tracks("sensor").append(temp=27.0, timestamp=5.0, _ts=1.0)
    assert not exp._open, "a refused entry does not start the run"


def test_dash_url_keeps_the_local_files_as_ml_dash_hybrid_mode_does(agent: AgentHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ML_DASH_API_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("DASHCAR_DASH_TOKEN", "tok-compat-0123456789")
    exp = Experiment(prefix="alice/ml/training", dash_url=True, dash_root=agent.data_dir, echo_logs=False)
    assert exp.dash_url == "http://127.0.0.1:9" and exp.dash_root == str(agent.data_dir)
    with exp.run:
        exp.log("Training...")
    assert read_json(exp.run_dir / "experiment.json")["status"] == "completed", "local files never wait for the server"
    assert not [p for p in exp.run_dir.rglob("*") if p.is_file() and b"tok-compat" in p.read_bytes()], "no token in the files"
    assert Experiment(prefix="a/b/c", dash_url="https://api.dash.ml").dash_url == "https://api.dash.ml"
    with pytest.raises(ValueError, match="not an http"):
        Experiment(prefix="a/b/c", dash_url="api.dash.ml")
    with pytest.raises(ValueError, match="dash_root=None keeps no local files"):
        Experiment(prefix="a/b/c", dash_root=None)


def test_a_metric_named_none_is_refused_and_the_unnamed_one_is_stored_as_ml_dash_reads_it(agent: AgentHandle) -> None:
    with Experiment(prefix="alice/ml/unnamed", dash_root=agent.data_dir, echo_logs=False).run as exp:
        with pytest.raises(InvalidName, match="unnamed metric"):
            exp.metrics("None")
        exp.metrics.log(epoch=1, train=dict(loss=0.5))
        assert exp.metrics(None).read()["data"][0]["data"]["epoch"] == 1
    meta = read_json(exp.run_dir / "metrics" / "None" / "metadata.json")
    assert meta["name"] is None and meta["totalDataPoints"] == 1
