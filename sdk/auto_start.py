"""``from dashcar.auto_start import dxp``: a ready run, as ``from ml_dash.auto_start import dxp``.

``dxp`` starts on first use (a log, metric, track or param call, or ``with dxp.run``). Its
prefix comes from ``RUN`` when it starts, so ``RUN.entry = __file__`` or ``RUN.project = ...``
set after this import still apply. A run still open at interpreter exit is closed: completed,
or failed if an unhandled exception ends the interpreter (cancelled on Ctrl-C). It is written
under ``./.dash`` through the local agent; ML-Dash 0.11's ``dxp`` writes to its server instead.
"""

from __future__ import annotations

from ._experiment import Experiment

dxp = Experiment()
"""The auto-started experiment."""

__all__ = ["dxp"]
