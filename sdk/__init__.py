"""dashcar: fire-and-forget experiment logging for 1 kHz control loops and training jobs.

``import dashcar`` loads only msgpack and pyzmq; the agent (LMDB, anyio) runs in its own
process and pyarrow is imported only when Parquet is asked for.
"""

from __future__ import annotations

from dashcar.proto import ConfigError as ConfigError
from dashcar.proto import DashcarError as DashcarError
from dashcar.proto import InvalidName as InvalidName

from ._experiment import Experiment as Experiment
from ._experiment import MetricBuilder as MetricBuilder
from ._experiment import MetricsManager as MetricsManager
from ._experiment import ParamsBuilder as ParamsBuilder
from ._experiment import RunContext as RunContext
from ._experiment import TrackBuilder as TrackBuilder
from ._experiment import TracksManager as TracksManager

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DashcarError",
    "Experiment",
    "InvalidName",
    "MetricBuilder",
    "MetricsManager",
    "ParamsBuilder",
    "RunContext",
    "TrackBuilder",
    "TracksManager",
    "__version__",
]
