"""dashcar: fire-and-forget experiment logging for 1 kHz control loops and training jobs.

``import dashcar`` loads only msgpack and pyzmq; the agent (LMDB, anyio) runs in its own
process and pyarrow is imported only when Parquet is asked for.
"""

from __future__ import annotations

from dashcar.proto import ConfigError as ConfigError
from dashcar.proto import DashcarError as DashcarError
from dashcar.proto import InvalidName as InvalidName

from ._experiment import Experiment as Experiment
from ._experiment import dashcar_experiment as dashcar_experiment
from ._experiment import ml_dash_experiment as ml_dash_experiment
from ._files import FileBuilder as FileBuilder
from ._files import FilesAccessor as FilesAccessor
from ._logs import LogBuilder as LogBuilder
from ._metrics import BufferManager as BufferManager
from ._metrics import MetricsManager as MetricsManager
from ._metrics import Series as Series
from ._metrics import SummaryCache as SummaryCache
from ._params import ParametersBuilder as ParametersBuilder
from ._params import ParamsBuilder as ParamsBuilder
from ._read import TrackSlice as TrackSlice
from ._run import RUN as RUN
from ._run import RunConfig as RunConfig
from ._run import RunContext as RunContext
from ._session import Session as Session
from ._tracks import TrackBuilder as TrackBuilder
from ._tracks import TracksManager as TracksManager

MetricBuilder = Series

__version__ = "0.1.0"

__all__ = [
    "RUN",
    "BufferManager",
    "ConfigError",
    "DashcarError",
    "Experiment",
    "FileBuilder",
    "FilesAccessor",
    "InvalidName",
    "LogBuilder",
    "MetricBuilder",
    "MetricsManager",
    "ParametersBuilder",
    "ParamsBuilder",
    "RunConfig",
    "RunContext",
    "Series",
    "Session",
    "SummaryCache",
    "TrackBuilder",
    "TrackSlice",
    "TracksManager",
    "__version__",
    "dashcar_experiment",
    "ml_dash_experiment",
]
