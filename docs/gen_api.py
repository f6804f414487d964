"""Write ``docs/api.md`` from the public classes' signatures and docstrings: ``python docs/gen_api.py``."""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

import dashcar

OUT = Path(__file__).with_name("api.md")
NOTES = Path(__file__).with_name("mldash-compat.md")
"""The hand-written part: what changes, and what deliberately differs, coming from ML-Dash 0.11."""
ORDER = ["Experiment", "RunContext", "RunConfig", "ParamsBuilder", "MetricsManager", "Series", "SummaryCache",
         "BufferManager", "TracksManager", "TrackBuilder", "TrackSlice", "LogBuilder", "FilesAccessor", "FileBuilder", "Session"]
FUNCTIONS = ["dashcar_experiment"]
MODULES = ["dashcar.auto_start", "dashcar.run", "dashcar.params"]


def _sig(obj: object) -> str:
    try:
        sig = str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"
    return re.sub(r"<object object at 0x[0-9a-f]+>", "<required>", sig)


def _doc(obj: object) -> str:
    return inspect.cleandoc(getattr(obj, "__doc__", None) or "")


def _class(name: str) -> list[str]:
    cls = getattr(dashcar, name)
    lines = [f"## `{name}{_sig(cls)}`", "", _doc(cls), ""]
    for attr, member in cls.__dict__.items():
        if attr.startswith("_") and attr not in ("__call__", "__enter__"):
            continue
        if isinstance(member, property):
            kind = "property, settable" if member.fset is not None else "property"
            lines.append(f"- **`{attr}`** ({kind}): {_doc(member)}")
            continue
        static = isinstance(member, staticmethod)
        func = member.__func__ if static else member
        if inspect.isfunction(func) and func.__doc__:
            summary = _doc(func).split("\n\n")[0].replace("\n", " ")
            lines.append(f"- **`{attr}{_sig(func)}`**{' (static)' if static else ''}: {summary}")
    return [*lines, ""]


def render() -> str:
    """The whole reference page as markdown."""
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/gen_api.py`; a test keeps it current.",
        "`dashcar.MetricBuilder` is another name for `Series`, `dashcar.ParametersBuilder` for `ParamsBuilder`,",
        "and `dashcar.ml_dash_experiment` for `dashcar_experiment`; `dashcar.RUN` is the one `RunConfig`.",
        "",
        "## Prefix templates",
        "",
        _doc(sys.modules["dashcar._run"]),
        "",
    ]
    for name in ORDER:
        lines += _class(name)
    for name in FUNCTIONS:
        func = getattr(dashcar, name)
        lines += [f"## `{name}{_sig(func)}`", "", _doc(func), ""]
    lines += ["## Modules with ML-Dash's import paths", ""]
    for module in MODULES:
        lines += [f"### `{module}`", "", _doc(importlib.import_module(module)), ""]
    lines += [NOTES.read_text().rstrip("\n"), ""]
    lines += ["## Errors", "", "```", _doc(sys.modules["dashcar.proto._errors"]), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
