"""The public surface and the error tree stay what the docs say."""

from __future__ import annotations

import importlib
import re

import pytest

import dashcar
from dashcar import proto
from dashcar.agent import errors as agent_errors
from dashcar.proto import DashcarError, InvalidName, _errors

DASHCAR_API = [
    "RUN", "BufferManager", "ConfigError", "DashcarError", "Experiment", "FileBuilder", "FilesAccessor", "InvalidName",
    "LogBuilder", "MetricBuilder",
    "MetricsManager", "ParametersBuilder", "ParamsBuilder", "RunConfig", "RunContext", "Series", "Session",
    "SummaryCache", "TrackBuilder", "TrackSlice", "TracksManager", "__version__", "dashcar_experiment",
    "ml_dash_experiment",
]
PROTO_API = [
    "ACKS_SOCKET", "AGENT_LOCK", "CONTROL_SOCKET", "COUNTER", "COUNTERS_DIR", "FILES_DIR", "FILES_INDEX", "FILES_LOCK",
    "FILE_INLINE_MAX_BYTES", "HELLO_TOPIC", "INGEST_SOCKET", "LOG_LEVELS", "MAX_FRAME_BYTES", "NDARRAY_MIN_SIZE",
    "PROTOCOL_MINOR", "PROTOCOL_VERSION", "RUN_STATUSES", "SPAWN_LOCK", "SPOOL_DIR", "ConfigError", "DashcarError",
    "DecodeError", "FileCopy", "FileDelete", "FilePut", "FileUpdate", "Flush", "Frame", "FrameTooLarge", "InvalidName",
    "Kind", "Log", "Meta", "Metric", "Params", "ProducerGone", "ProtocolError", "RunClose", "RunOpen", "Track",
    "UnsupportedVersion", "check_file_id", "check_file_name", "check_prefix", "check_record", "check_root", "coalesce",
    "counter_path", "decode", "decode_message", "encode", "ensure_private_dir", "file_dir", "file_dir_parts",
    "files_dir", "frame_count", "frame_from", "frame_head", "internal_record", "message_ids", "metric_dir_parts",
    "ndarray_ext", "parse_counter_name", "refusal_reason", "run_dir", "runtime_dir", "split_name", "spool_dir",
    "state_dir", "stored_file_path", "track_dir_name", "unpack_stored", "validate",
]


def _all_subclasses(cls: type[DashcarError]) -> set[str]:
    out: set[str] = set()
    for sub in cls.__subclasses__():
        out.add(sub.__name__)
        out |= _all_subclasses(sub)
    return out


def test_error_tree_drawing_names_every_error() -> None:
    error_name = r"[A-Z][A-Za-z]+(?:Error|Version|Large|Name|Full|Corrupt|Retryable|Rejected)"
    drawn = set(re.findall(error_name, _errors.__doc__ or ""))
    assert issubclass(agent_errors.WALFull, DashcarError), "the agent's branches hang off proto's root"
    assert _all_subclasses(DashcarError) == drawn - {"DashcarError", "ValueError"}


def test_exported_members() -> None:
    assert dashcar.__all__ == DASHCAR_API
    assert proto.__all__ == PROTO_API
    public = {name for name in vars(proto) if not name.startswith("_")} - {"annotations"}
    assert public == set(PROTO_API), "every public name of dashcar.proto is in __all__"


@pytest.mark.parametrize("module", ["dashcar", "dashcar.proto"])
def test_star_import_brings_exactly_the_exported_names(module: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {module} import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(importlib.import_module(module).__all__)


def test_names_map_to_paths_inside_the_run_directory() -> None:
    assert proto.run_dir("/data", "alice/p/r") == "/data/alice/p/r"
    assert proto.track_dir_name("robot/state") == "robot_state"
    assert proto.metric_dir_parts("eval/top1") == ("eval", "top1")
    assert proto.metric_dir_parts(None) == ("None",), "the unnamed metric's folder, as ML-Dash reads it"


@pytest.mark.parametrize("prefix", ["../escape", "a/../../b", "/abs", "a//b", "a/\x00/b", "a\\b", "", "."])
def test_names_never_escape_the_run_directory(prefix: str) -> None:
    with pytest.raises(InvalidName):
        proto.run_dir("/data", prefix)
    with pytest.raises(InvalidName):
        proto.track_dir_name(prefix)
