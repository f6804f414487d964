"""``exp.params``: set, merge and read back run parameters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dashcar.proto import Kind

from . import _read

if TYPE_CHECKING:
    from ._experiment import Experiment


def _class_to_dict(value: object) -> object:
    """A config class (``Args`` with class attributes) becomes a dict of its public attributes."""
    if not isinstance(value, type):
        return value
    return {
        k: v
        for k, v in vars(value).items()
        if not k.startswith("_") and not callable(v) and not isinstance(v, type)
    }


class ParamsBuilder:
    """Parameters: nested dicts are flattened with dots and merged across calls by the agent.

    ``ParametersBuilder`` is the same class under ML-Dash's name.
    """

    __slots__ = ("_exp",)

    def __init__(self, exp: Experiment) -> None:
        self._exp = exp

    def set(self, **params: object) -> ParamsBuilder:
        """Merge ``params`` into the run's parameters (``vars(args)`` and JSON configs work as is)."""
        if params:
            self._exp._emit(Kind.PARAMS, {k: _class_to_dict(v) for k, v in params.items()})
        return self

    log = set

    def __call__(self, **params: object) -> ParamsBuilder:
        """``session.params(lr=...)``: the DreamLake spelling of ``set``."""
        return self.set(**params)

    def get(self, flatten: bool = True) -> dict[str, Any]:
        """The run's parameters after everything sent so far is written."""
        self._exp._barrier()
        return _read.read_params(self._exp.run_dir, flatten)

    @staticmethod
    def flatten_dict(d: Mapping[str, Any], parent_key: str = "", sep: str = ".") -> dict[str, Any]:
        """``{"a": {"b": 1}}`` → ``{"a.b": 1}``: the keys ``set(**d)`` stores.

        An empty nested dict stays a ``{}`` value, as the agent stores it (ML-Dash drops it).
        """
        out: dict[str, Any] = {}
        for key, value in d.items():
            name = f"{parent_key}{sep}{key}" if parent_key else key
            if isinstance(value, dict) and value:
                out.update(ParamsBuilder.flatten_dict(value, name, sep))
            else:
                out[name] = value
        return out

    @staticmethod
    def unflatten_dict(d: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
        """``{"a.b": 1}`` → ``{"a": {"b": 1}}``, what ``get(flatten=False)`` returns."""
        return _read.unflatten(d, sep)


ParametersBuilder = ParamsBuilder
