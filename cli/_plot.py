"""``dashcar plot``: fields of a track or metric over time (or index) as a PNG, with matplotlib.

matplotlib is an optional extra (``pip install 'dashcar[plot]'``); without it the command says
so and exits 1. A FIELD is a column of the rows (``q``, ``gripper.pos``, ``loss``); a list
field draws one line per element (``q[0]``, ``q[1]``, ...), or one element with ``q[2]``.
Tracks are drawn over their timestamp, metrics over their index (``--x step`` or ``--x _ts``
to choose another field).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from ._common import OK, CliError, err
from ._export import tabular
from ._runs import iter_rows, prefix_of, resolve_run, resolve_topic

_ELEMENT = re.compile(r"^(?P<name>.+)\[(?P<i>\d+)\]$")


def _value(row: dict[str, Any], field: str) -> Any:
    m = _ELEMENT.match(field)
    if m and m["name"] in row:
        seq = row[m["name"]]
        i = int(m["i"])
        return seq[i] if isinstance(seq, list) and i < len(seq) else None
    return row.get(field)


def series(rows: list[dict[str, Any]], fields: list[str], x: str) -> tuple[list[float], dict[str, list[float | None]]]:
    """The x values and one y series per line to draw (a list field gives one per element)."""
    xs: list[float] = []
    ys: dict[str, list[float | None]] = {}
    names: list[str] = []
    for f in fields:
        sample = next((v for r in rows if (v := _value(r, f)) is not None), None)
        if isinstance(sample, list):
            names += [f"{f}[{i}]" for i in range(len(sample))]
        else:
            names.append(f)
    for name in names:
        ys[name] = []
    for r in rows:
        xv = _value(r, x)
        if not isinstance(xv, (int, float)) or isinstance(xv, bool):
            continue
        xs.append(float(xv))
        for name in names:
            v = _value(r, name)
            ys[name].append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None)
    return xs, ys


def run(args: argparse.Namespace) -> int:
    """Draw the fields and save the PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("plot needs matplotlib, an optional extra: pip install 'dashcar[plot]'") from None
    root = Path(args.root)
    run_dir = resolve_run(args.run, root)
    topic = resolve_topic(run_dir, args.topic)
    if topic.kind == "logs":
        raise CliError("logs have no fields to plot; give a track topic or a metric")
    rows = [tabular(topic, r) for r in iter_rows(topic)]
    if not rows:
        raise CliError(f"{topic.kind} {topic.name!r} of {run_dir} has no rows yet; plot it once it has some")
    x = args.x or ("timestamp" if topic.kind == "track" else "index")
    columns = sorted({k for r in rows for k in r})
    for f in [*args.fields, x]:
        base = _ELEMENT.match(f)
        if (base["name"] if base else f) not in columns:
            raise CliError(f"{topic.kind} {topic.name!r} has no field {f!r}; its fields are {', '.join(columns)}")
    xs, ys = series(rows, args.fields, x)
    fig, ax = plt.subplots(figsize=(args.width, args.height), dpi=100)
    for name, values in ys.items():
        ax.plot(xs, [float("nan") if v is None else v for v in values], label=name, linewidth=1)
    ax.set_xlabel(x + (" (s)" if x == "timestamp" else ""))
    ax.set_title(f"{prefix_of(run_dir, root if root.is_dir() else None)} · {topic.name}")
    ax.grid(True, alpha=0.3)
    if len(ys) > 1:
        ax.legend(loc="best", fontsize="small")
    out = Path(args.out)
    try:
        fig.savefig(out, format="png", bbox_inches="tight")
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc.strerror or exc}; pick another --out") from exc
    finally:
        plt.close(fig)
    err().print(f"plotted {len(ys)} series over {len(xs)} {x} values to {out}")
    return OK
