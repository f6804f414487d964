"""``dashcar status``: the agent's status document, readable (once or live) or as JSON.

Every figure comes from the agent's counter table (``dashcar.agent.signals``); the help lines
shown beside drops are that table's.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from dashcar.agent.signals import BY_NAME

from ._common import NO_AGENT, OK, UNHEALTHY, ask, err, human_bytes, human_seconds, out, try_ask
from ._runs import parse_iso

DROPS = (
    ("dropped_by_producers", "frames_dropped_by_producers"),
    ("missing", "frames_missing"),
    ("lost_in_producer_queue", "frames_lost_in_producer_queue"),
    ("dropped_disk_full", "frames_dropped_disk_full"),
)


def _n(v: float) -> str:
    return f"{v:,.0f}"


def exit_code(st: dict[str, Any]) -> int:
    """``OK`` when the agent is healthy, ``UNHEALTHY`` when it is losing data or failing."""
    return OK if st.get("health", {}).get("ok", True) else UNHEALTHY


def render(st: dict[str, Any]) -> RenderableType:
    """The status document as a few readable blocks."""
    fr, wal, rates = st["frames"], st["wal"], st.get("rates", {})
    version = st.get("version", {})
    proto = ".".join(str(x) for x in version.get("protocol", []))
    head = Text.assemble(
        ("dashcar agent ", "bold"), f"pid {st['pid']} (ingest {st.get('ingest_pid')})  up {human_seconds(st['uptime_s'])}  ",
        f"v{version.get('agent', '?')} protocol {proto}  runtime {st['runtime_dir']}",
    )
    if st.get("stopping"):
        head.append("  DRAINING", style="yellow bold")
    health = st.get("health", {"ok": True, "problems": []})
    if health["ok"]:
        verdict = Text("healthy: nothing lost in the last minute, no sink failing", style="green")
    else:
        verdict = Text("\n".join(("LOSING DATA: " if health.get("losing_data") and i == 0 else "PROBLEM: ") + p
                                 for i, p in enumerate(health["problems"])), style="red bold")

    figures = Table.grid(padding=(0, 2))
    figures.add_column(style="bold")
    figures.add_column()
    figures.add_row("rate", f"in {_n(rates.get('in_fps', 0))} frames/s   out {_n(rates.get('out_fps', 0))} frames/s "
                            f"(last {rates.get('window_s', 5):g} s)")
    figures.add_row("frames", f"received {_n(fr['received'])}   stored {_n(fr['stored'])}   written {_n(fr['written'])}   "
                              f"duplicates {_n(fr.get('duplicates', 0))}   clashes {_n(fr.get('clashes', 0))}")
    cap = max(1, wal.get("cap_bytes", 1))
    figures.add_row("WAL", f"backlog {_n(wal['backlog'])} records   {human_bytes(wal['bytes'])} of {human_bytes(cap)} "
                           f"({wal['bytes'] / cap * 100:.1f}%)   {human_bytes(wal.get('free_bytes', 0))} free on the state disk"
                           + ("   FULL" if wal.get("full") else ""))
    producers = st.get("producers", {})
    figures.add_row("producers", f"{producers.get('live', 0)} live   open rows {_n(st['sink'].get('open_rows', 0))}   "
                                 f"metrics {st.get('metrics_address') or 'off'}")

    drops = Table(title="drops (since the WAL was created)", title_justify="left", show_edge=False, box=None, padding=(0, 2))
    drops.add_column("reason")
    drops.add_column("frames", justify="right")
    drops.add_column("what it means", style="dim")
    for key, sig in DROPS:
        if fr.get(key):
            drops.add_row(key.replace("_", " "), _n(fr[key]), BY_NAME[sig].help)
    for reason, n in sorted(fr.get("rejected_by", {}).items()):
        drops.add_row(f"rejected: {reason}", _n(n), BY_NAME["frames_rejected"].help)
    for reason, n in sorted(producers.get("refused_by", {}).items()):
        drops.add_row(f"producer refused: {reason}", _n(n), BY_NAME["producers_refused"].help)

    sinks = Table(title="sinks", title_justify="left", show_edge=False, padding=(0, 2))
    for col, just in (("sink", "left"), ("out/s", "right"), ("lag frames", "right"), ("lag bytes", "right"),
                      ("oldest", "right"), ("skipped", "right"), ("dead letters", "right"), ("state", "left")):
        sinks.add_column(col, justify=just)  # type: ignore[arg-type]
    for name, s in sorted(st.get("sinks", {}).items()):
        lag = s["lag"]
        counters = s.get("counters", {})
        if s.get("error"):
            retry = s.get("retry") or {}
            state = Text(f"failing (attempt {retry.get('attempt', '?')}, next in {retry.get('next_in_s', 0):.1f}s): "
                         f"{s['error']}", style="red")
        else:
            state = Text("ok", style="green")
        sinks.add_row(name, _n(s.get("rate_fps", 0)), _n(lag["frames"]), human_bytes(lag["bytes"]),
                      human_seconds(lag.get("oldest_age_s")), _n(counters.get("skipped_frames", 0)),
                      _n(counters.get("dead_letters", 0)), state)

    runs = Table(title=f"open runs ({len(st.get('runs', {}))})", title_justify="left", show_edge=False, padding=(0, 2))
    for col in ("run", "status", "pids", "started", "rows", "points", "logs", "lost"):
        runs.add_column(col, justify="left" if col in ("run", "status", "pids", "started") else "right",
                        overflow="fold" if col == "run" else "ellipsis")
    now = time.time()
    for path, run in sorted(st.get("runs", {}).items()):
        c = run.get("counters", {})
        started = parse_iso(run.get("created_at"))
        lost = sum(int(c.get(k, 0)) for k in ("missing", "dropped_by_producer", "lost_in_producer_queue"))
        runs.add_row(path, run["status"], ",".join(str(p) for p in run.get("pids", [])) or "-",
                     f"{human_seconds(now - started)} ago" if started else "-", _n(c.get("rows", 0)), _n(c.get("points", 0)),
                     _n(c.get("logs", 0)), Text(_n(lost), style="red" if lost else ""))
    parts: list[RenderableType] = [head, verdict, figures]
    if drops.row_count:
        parts.append(drops)
    parts += [sinks, runs]
    return Group(*parts)


def run(args: argparse.Namespace) -> int:
    """Show the status once, live (``--watch``), or as JSON."""
    if args.json:
        st = ask(args, {"op": "status"})
        st.pop("ok", None)
        print(json.dumps(st, indent=2, sort_keys=True))
        return exit_code(st)
    if not args.watch:
        st = ask(args, {"op": "status"})
        out().print(render(st))
        return exit_code(st)
    return _watch(args)


def _watch(args: argparse.Namespace) -> int:
    """Refresh every ``--interval`` seconds until Ctrl-C (or ``--count`` refreshes)."""
    console = out()
    code = NO_AGENT
    n = 0

    def frame() -> RenderableType:
        nonlocal code
        st = try_ask(args, {"op": "status"})
        if st is None:
            code = NO_AGENT
            return Text(f"no agent answers at {args.runtime_dir or 'the default runtime dir'} (still watching)", style="red")
        code = exit_code(st)
        return render(st)

    try:
        if console.is_terminal:
            with Live(frame(), console=console, auto_refresh=False, screen=False) as live:
                while True:
                    n += 1
                    if args.count and n >= args.count:
                        break
                    time.sleep(args.interval)
                    live.update(frame(), refresh=True)
        else:
            while True:
                console.print(frame())
                console.print()
                n += 1
                if args.count and n >= args.count:
                    break
                time.sleep(args.interval)
    except KeyboardInterrupt:
        return OK
    if code == NO_AGENT:
        err().print("dashcar: no agent answered the last refresh")
    return code

