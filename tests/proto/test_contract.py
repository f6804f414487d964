"""The public surface and the error tree stay what the docs say."""

from __future__ import annotations

import re

import dashcar
import dashcar.agent.errors as agent_errors
from dashcar import proto
from dashcar.proto import DashcarError, _errors


def _all_subclasses(cls: type) -> set[str]:
    out = set()
    for sub in cls.__subclasses__():
        out.add(sub.__name__)
        out |= _all_subclasses(sub)
    return out


def test_error_tree_drawing_names_every_error() -> None:
    drawn = set(re.findall(r"[A-Z][A-Za-z]+(?:Error|Version|Large|Name|Full|Corrupt|Retryable|Rejected)", _errors.__doc__ or ""))
    assert agent_errors.WALFull  # the agent's branch is part of the tree
    assert _all_subclasses(DashcarError) == drawn - {"DashcarError", "ValueError"}


def test_exported_members() -> None:
    assert set(dashcar.__all__) == {
        "BufferManager", "ConfigError", "DashcarError", "Experiment", "InvalidName", "LogBuilder", "MetricBuilder",
        "MetricsManager", "ParametersBuilder", "ParamsBuilder", "RUN", "RunConfig", "RunContext", "Series", "Session",
        "SummaryCache", "TrackBuilder", "TrackSlice", "TracksManager", "__version__", "dashcar_experiment",
        "ml_dash_experiment",
    }
    for name in proto.__all__:
        assert getattr(proto, name) is not None


def test_names_never_escape_the_run_directory() -> None:
    run = proto.run_dir("/data", "alice/p/r")
    assert run == "/data/alice/p/r"
    assert proto.track_dir_name("robot/state") == "robot_state"
    assert proto.metric_dir_parts("eval/top1") == ("eval", "top1")
    assert proto.metric_dir_parts(None) == ("None",), "the unnamed metric's folder, as ML-Dash reads it"
