"""``from dashcar.params import ParametersBuilder``: the spelling of ``from ml_dash.params import ...``."""

from __future__ import annotations

from ._params import ParametersBuilder as ParametersBuilder
from ._params import ParamsBuilder as ParamsBuilder

__all__ = ["ParametersBuilder", "ParamsBuilder"]
