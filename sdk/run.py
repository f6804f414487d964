"""``from dashcar.run import RUN``: the spelling of ``from ml_dash.run import RUN``."""

from __future__ import annotations

from ._run import RUN as RUN
from ._run import RunConfig as RunConfig

__all__ = ["RUN", "RunConfig"]
