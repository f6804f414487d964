"""Write ``docs/api.md`` from the public classes' signatures and docstrings: ``python docs/gen_api.py``."""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path

import dashcar

OUT = Path(__file__).with_name("api.md")
ORDER = [
    "Experiment", "RunContext", "ParamsBuilder", "MetricsManager", "Series", "SummaryCache", "BufferManager",
    "TracksManager", "TrackBuilder", "TrackSlice", "LogBuilder", "Session",
]


def _sig(obj: Callable[..., object]) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return re.sub(r"<object object at 0x[0-9a-f]+>", "<required>", sig)


def render() -> str:
    """The whole reference page as markdown."""
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/gen_api.py`; a test keeps it current.",
        "`dashcar.MetricBuilder` is another name for `Series`.",
        "",
    ]
    for name in ORDER:
        cls = getattr(dashcar, name)
        lines += [f"## `{name}{_sig(cls)}`", "", inspect.cleandoc(cls.__doc__ or ""), ""]
        for attr, member in cls.__dict__.items():
            if attr.startswith("_") and attr not in ("__call__", "__enter__"):
                continue
            if isinstance(member, property):
                lines.append(f"- **`{attr}`** (property): {inspect.cleandoc(member.__doc__ or '')}")
            elif inspect.isfunction(member) and member.__doc__:
                summary = inspect.cleandoc(member.__doc__).split("\n\n")[0].replace("\n", " ")
                lines.append(f"- **`{attr}{_sig(member)}`**: {summary}")
        lines.append("")
    tree = inspect.cleandoc(sys.modules["dashcar.proto._errors"].__doc__ or "")
    lines += ["## Errors", "", "```", tree, "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
