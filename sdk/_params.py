"""``exp.params``: set, merge and read back run parameters."""

from __future__ import annotations

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
    """Parameters: nested dicts are flattened with dots and merged across calls by the agent."""

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
