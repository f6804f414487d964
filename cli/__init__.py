"""The ``dashcar`` command: the agent, its status, the runs on disk, the service.

The command may import the SDK and the agent; the SDK imports neither the agent nor this
package. ``agent`` hands its arguments to ``dashcar.agent.main``, which owns the agent's flags
and their defaults (``dashcar.agent.config``). Commands that read runs (``ls``, ``tail``,
``export``, ``plot``) need no agent: they read the files, here or copied from elsewhere.

Exit codes (the same for every command; ``dashcar --help`` lists them): 0 OK, 1 FAILED (the
message says why), 2 USAGE, 3 NO_AGENT, 4 UNHEALTHY (losing data, failing, or a doctor
problem), 5 TIMEOUT, 6 and 7 from ``dashcar agent`` (could not start, already running).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from dashcar.proto import DashcarError

from ._common import FAILED, INTERRUPTED, NO_AGENT, OK, TIMEOUT, UNHEALTHY, USAGE, CliError, agent_dir, ask, err, out

__all__ = ["FAILED", "INTERRUPTED", "NO_AGENT", "OK", "TIMEOUT", "UNHEALTHY", "USAGE", "build_parser", "main"]

FLUSH_TIMEOUT_S: Final = 30.0
"""How long ``dashcar flush`` lets the agent write by default; the reply may take one second more."""
STOP_WAIT_S: Final = 30.0

EXIT_TEXT: Final = """exit codes:
  0 OK         done (status: the agent is healthy)
  1 FAILED     the command could not do it; the message says why and what to do
  2 USAGE      bad arguments
  3 NO_AGENT   no agent answers at the runtime dir
  4 UNHEALTHY  the agent is losing data or failing (status), or doctor found a problem
  5 TIMEOUT    the agent did not finish in time (flush, stop)
  6, 7         dashcar agent: could not start; another agent already runs
"""

EXAMPLES: Final = {
    "status": "dashcar status --watch            # live; Ctrl-C ends it\n  dashcar status --json | jq .health",
    "flush": "dashcar flush --remote --timeout 60   # wait until remote sinks have it too",
    "stop": "dashcar stop",
    "ls": "dashcar ls .dash\n  dashcar ls --json | jq '.[] | select(.lost > 0)'",
    "tail": "dashcar tail alice/robotics/run1 robot/state\n  dashcar tail .dash/alice/robotics/run1 train -n 0",
    "export": "dashcar export alice/robotics/run1 --topic robot/state --format parquet --out s.parquet\n"
              "  dashcar export alice/robotics/run1 --format mcap --out run1.mcap     # open it in Foxglove",
    "plot": "dashcar plot alice/robotics/run1 robot/state q --out q.png\n"
            "  dashcar plot alice/robotics/run1 train loss --x step --out loss.png",
    "doctor": "dashcar doctor",
    "config": "dashcar config show\n  dashcar config show --running --json",
    "config show": "dashcar config show --merge-window-s 0.5     # what `dashcar agent --merge-window-s 0.5` would run with",
    "service": "dashcar service install --user",
    "service install": "dashcar service install --user --dry-run\n"
                       "  sudo dashcar service install --data-root /srv/dash --group dashcar   # one agent for the machine",
    "service uninstall": "dashcar service uninstall --user",
    "demo": "dashcar demo --seconds 5",
}


# --------------------------------------------------------------------------------------- agent talk
def _agent_cmd(runtime_dir: str | None, agent_args: list[str]) -> int:
    """Run the agent in the foreground; ``--runtime-dir`` given after ``agent`` wins over the global one."""
    from dashcar.agent.main import main as agent_main

    given = ["--runtime-dir", runtime_dir] if runtime_dir else []
    return agent_main([*given, *agent_args])


def _flush(args: argparse.Namespace) -> int:
    """Have the agent settle and write every open row; with ``--remote``, wait for every sink."""
    reply = ask(args, {"op": "flush", "remote": args.remote, "timeout_s": args.timeout}, args.timeout + 2.0)
    if reply.get("ok"):
        err().print("flushed: " + ("every sink, remote ones too, has" if args.remote else "the local files have")
                    + " everything the agent had received")
        return OK
    lagging = ""
    st = _try_status(args)
    if st is not None:
        lag = [f"{n} ({s['lag']['frames']} frames behind" + (f", failing: {s['error']}" if s.get("error") else "") + ")"
               for n, s in sorted(st["sinks"].items()) if s["lag"]["frames"] or s.get("error")]
        lagging = ": still waiting for " + ", ".join(lag) if lag else ""
    raise CliError(f"flush did not finish within {args.timeout:g} s{lagging}; `dashcar status` shows why, "
                   "or give it longer with --timeout", TIMEOUT)


def _try_status(args: argparse.Namespace) -> dict[str, Any] | None:
    from ._common import try_ask

    return try_ask(args, {"op": "status"})


def _stop(args: argparse.Namespace) -> int:
    """Ask the agent to drain, write, commit and exit; wait until it has."""
    from dashcar import _agent

    st = ask(args, {"op": "status"})
    ask(args, {"op": "stop"})
    where = agent_dir(args)
    deadline = time.monotonic() + args.timeout
    while _agent.agent_running(where):
        if time.monotonic() > deadline:
            raise CliError(f"agent pid {st['pid']} still runs {args.timeout:g} s after the stop request; "
                           f"look at its log, or kill it (kill {st['pid']}): its WAL keeps what was stored", TIMEOUT)
        time.sleep(0.05)
    err().print(f"agent pid {st['pid']} stopped")
    return OK


# ------------------------------------------------------------------------------------------- runs
def _ls(args: argparse.Namespace) -> int:
    """List the runs under a data root."""
    from rich.table import Table
    from rich.text import Text

    from ._common import human_seconds
    from ._runs import find_runs, summary

    root = Path(args.dir or args.root)
    if not root.is_dir():
        raise CliError(f"no data root {root}; pass the directory your runs are under (dash_root), e.g. dashcar ls .dash")
    runs = sorted((summary(r, root) for r in find_runs(root)), key=lambda s: (s["started"] or "", s["prefix"]))
    if args.json:
        print(json.dumps(runs, indent=2))
        return OK
    if not runs:
        err().print(f"no runs under {root}")
        return OK
    table = Table(show_edge=False, padding=(0, 1))
    for col in ("run", "status", "started (UTC)", "duration", "rows", "points", "logs", "lost"):
        table.add_column(col, justify="right" if col in ("duration", "rows", "points", "logs", "lost") else "left",
                         no_wrap=col in ("run", "started (UTC)"))
    style = {"completed": "green", "running": "cyan", "failed": "red", "crashed": "red bold", "cancelled": "yellow"}
    for s in runs:
        started = (s["started"] or "-").replace("T", " ")[:19]
        table.add_row(s["prefix"], Text(s["status"], style=style.get(s["status"], "")), started,
                      human_seconds(s["duration_s"]), f"{s['rows']:,}", f"{s['points']:,}", f"{s['logs']:,}",
                      Text(f"{s['lost']:,}", style="red bold" if s["lost"] else ""))
    out().print(table)
    return OK


def _tail(args: argparse.Namespace) -> int:
    """Print a topic's rows as they are written, until Ctrl-C."""
    from ._runs import find_topic, follow, resolve_run, topics

    run = resolve_run(args.run, Path(args.root))
    topic = find_topic(run, args.topic)
    if topic is None:
        status = _status_of(run)
        if status not in ("running", "unknown"):
            have = ", ".join(t.name for t in topics(run)) or "nothing"
            raise CliError(f"run {run} ({status}) has no track, metric or logs named {args.topic!r}; it has: {have}")
        err().print(f"waiting for {args.topic!r} to appear in {run} (Ctrl-C ends)")
        while topic is None:
            time.sleep(0.2)
            topic = find_topic(run, args.topic)
    stdout = sys.stdout.buffer
    try:
        for line in follow(topic.path, args.lines):
            stdout.write(line)
            stdout.flush()
    except KeyboardInterrupt:
        return OK
    except BrokenPipeError:
        return OK
    return OK


def _status_of(run: Path) -> str:
    from dashcar._read import read_json

    doc = read_json(run / "experiment.json")
    return str(doc.get("status", "unknown")) if isinstance(doc, dict) else "unknown"


# ----------------------------------------------------------------------------------------- config
def _config_show(args: argparse.Namespace) -> int:
    """The effective settings and where each came from."""
    from rich.table import Table

    from dashcar.agent import config

    if args.running:
        st = ask(args, {"op": "status"})
        rows = st.get("config") or []
        title = f"settings of the running agent (pid {st['pid']})"
    else:
        flags = {f.name: getattr(args, f.name) for f in config.TUNABLES if getattr(args, f.name, None) is not None}
        for key in ("state_dir",):
            if getattr(args, key, None):
                flags[key] = getattr(args, key)
        if getattr(args, "runtime_dir", None):
            flags["runtime_dir"] = args.runtime_dir
        path = config.config_path(os.environ, args.config)
        try:
            cfg, sources = config.load_with_sources(os.environ, flags, path)
        except DashcarError as exc:
            raise CliError(str(exc)) from exc
        rows = config.describe(cfg, sources)
        title = "settings `dashcar agent` would run with here" + (f" (file {path})" if path else "")
    if args.json:
        print(json.dumps(rows, indent=2))
        return OK
    title += "; each is also DASHCAR_<SETTING> and --<setting>"
    table = Table(title=title, title_justify="left", show_edge=False, padding=(0, 1))
    table.add_column("setting", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("from", no_wrap=True)
    table.add_column("what it does", style="dim", ratio=1)
    styles = {"default": "dim", "file": "cyan", "env": "yellow", "flag": "magenta"}
    from rich.text import Text

    for r in rows:
        table.add_row(r["name"], repr(r["value"]) if isinstance(r["value"], str) else str(r["value"]),
                      Text(r["source"], style=styles.get(r["source"], "")), r["help"])
    out().print(table)
    return OK


# ------------------------------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    """Log a simulated 6-DOF robot at 1 kHz, then report where it landed and what it cost."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from dashcar import Experiment

    options = {"dash_root": args.dash_root} if args.dash_root is not None else {}
    exp = Experiment(prefix=args.prefix, runtime_dir=agent_dir(args), **options)
    rate: float = args.rate
    period = 1.0 / rate
    n = int(args.seconds * rate)
    costs: list[float] = []
    console = err()
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} appends"),
                   TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal)
    with exp.run, bar:
        task = bar.add_task(f"logging a 6-DOF robot at {rate:.0f} Hz", total=n)
        exp.params.set(robot={"name": "sim6", "dof": 6}, control={"rate_hz": rate})
        exp.log("demo started", metadata={"seconds": args.seconds})
        track = exp.tracks("robot/state")
        tau = [0.1 * j for j in range(6)]
        t0 = time.perf_counter()
        for i in range(n):
            t = i * period
            q = [math.sin(t + j) for j in range(6)]
            qd = [math.cos(t + j) for j in range(6)]
            before = time.perf_counter_ns()
            track.append(q=q, qd=qd, tau=tau, gripper={"pos": 0.04, "force": 10.0}, _ts=round(t, 6))
            costs.append((time.perf_counter_ns() - before) / 1000)
            if i % 100 == 0:
                exp.metrics("train").log(step=i, loss=1.0 / (1 + i))
                bar.update(task, completed=i)
            wait = t0 + (i + 1) * period - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        exp.log("demo finished")
    costs.sort()
    try:
        with open(exp.run_dir / "tracks" / "robot_state" / "data.jsonl", "rb") as f:
            rows = sum(1 for _ in f)
    except FileNotFoundError:
        rows = 0
    print(f"data: {exp.run_dir}")
    p50 = costs[len(costs) // 2] if costs else 0.0
    p99 = costs[int(len(costs) * 0.99)] if costs else 0.0
    print(f"summary: {n} track appends at {rate:.0f} Hz, {rows} rows on disk, append p50 {p50:.1f} us p99 {p99:.1f} us")
    print(f"next: dashcar ls {exp.dash_root} · dashcar tail {exp.prefix} robot/state · "
          f"dashcar export {exp.prefix} --format mcap --out demo.mcap")
    if rows != n:
        raise CliError(f"{rows} of {n} rows reached the disk; `dashcar status` and `dashcar doctor` say why")
    return OK


# ----------------------------------------------------------------------------------------- parser
def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """The command ``name`` of ``dashcar.cli.<module>``, imported when it runs (``dashcar --help`` stays quick)."""

    def run(args: argparse.Namespace) -> int:
        fn: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(f"dashcar.cli.{module}"), name)
        return fn(args)

    return run


def _sub(sub: Any, key: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand (``key`` is its name, after its parent's for nested ones) with its example as epilog."""
    p: argparse.ArgumentParser = sub.add_parser(
        key.split()[-1], help=help, description=description or help, epilog="example:\n  " + EXAMPLES[key],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return p


def _runtime_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime-dir", default=argparse.SUPPRESS,
                   help="the agent's runtime dir (default: $DASHCAR_RUNTIME_DIR, $XDG_RUNTIME_DIR/dashcar, /tmp/dashcar-UID)")


def _root_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=argparse.SUPPRESS, help="data root RUN prefixes are under (default: .dash)")


def build_parser() -> argparse.ArgumentParser:
    """The global flags and one subparser per command; each but ``agent`` sets ``func`` to its function."""
    from dashcar.agent.config import TUNABLES

    p = argparse.ArgumentParser(
        prog="dashcar", description="dashcar: non-blocking experiment logging; the agent, its status, your runs.",
        epilog="RUN is a run directory or a run prefix under --root (.dash); it works without an agent.\n\n"
               "examples:\n  dashcar status\n  dashcar ls\n  dashcar export alice/robotics/run1 --format mcap --out run1.mcap\n"
               "  dashcar COMMAND --help\n\n" + EXIT_TEXT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runtime-dir",
                   help="the agent's runtime dir (default: $DASHCAR_RUNTIME_DIR, $XDG_RUNTIME_DIR/dashcar, /tmp/dashcar-UID)")
    p.add_argument("--root", default=".dash", help="data root RUN prefixes are under (default: .dash)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    # main() hands everything after "agent" to the agent's own parser, --help included.
    sub.add_parser("agent", add_help=False, help="run the agent in the foreground (dashcar agent --help)")

    s = _sub(sub, "status", "the agent at a glance: rates, backlog, drops, sinks, open runs",
             "The agent at a glance: frames/s in and out, WAL backlog and disk, drops by reason, per-sink lag and "
             "errors, open runs with their producers. Exit 0 healthy, 3 no agent, 4 losing data or failing.")
    _runtime_opt(s)
    s.add_argument("--json", action="store_true", help="the whole status document (the agent's counter table) as JSON")
    s.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    s.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    s.add_argument("--count", type=int, default=0, help="with --watch: stop after this many refreshes")
    s.set_defaults(func=_lazy("_status", "run"))

    f = _sub(sub, "flush", "write every open row now (--remote: wait for every sink)",
             "Settle every open row and wait until the local files have everything the agent received; with --remote, "
             "until every sink (remote ones too) has it. Exit 5 on timeout.")
    _runtime_opt(f)
    f.add_argument("--remote", action="store_true", help="wait for remote sinks too")
    f.add_argument("--timeout", type=float, default=FLUSH_TIMEOUT_S, help=f"seconds (default {FLUSH_TIMEOUT_S:g})")
    f.set_defaults(func=_flush)

    st = _sub(sub, "stop", "drain, write, commit and stop the agent")
    _runtime_opt(st)
    st.add_argument("--timeout", type=float, default=STOP_WAIT_S, help=f"seconds to wait for it (default {STOP_WAIT_S:g})")
    st.set_defaults(func=_stop)

    ls = _sub(sub, "ls", "runs under a data root: status, start, duration, counts, frames lost")
    ls.add_argument("dir", nargs="?", metavar="ROOT", help="data root (default: --root, .dash)")
    _root_opt(ls)
    ls.add_argument("--json", action="store_true", help="as JSON")
    ls.set_defaults(func=_ls)

    t = _sub(sub, "tail", "print a topic's rows as they are written, until Ctrl-C",
             "Print a track's, metric's or the logs' rows as JSON lines as they are written, until Ctrl-C "
             "(a row rewritten by a late entry is printed again).")
    t.add_argument("run", metavar="RUN")
    t.add_argument("topic", metavar="TOPIC", help="a track topic, a metric name, or logs")
    t.add_argument("-n", "--lines", type=int, default=10, help="rows already written to show first (default 10)")
    _root_opt(t)
    t.set_defaults(func=_tail)

    e = _sub(sub, "export", "a topic as parquet/csv/jsonl, or a whole run as MCAP (Foxglove)",
             "Export one topic's rows (what read() returns) as Parquet, CSV or JSON lines, or a whole run as MCAP: every "
             "track, metric and the logs as JSON channels with a JSON schema each, log time from _ts.")
    e.add_argument("run", metavar="RUN")
    e.add_argument("--topic", help="track topic, metric name or logs (not for mcap)")
    e.add_argument("--format", required=True, choices=("parquet", "csv", "jsonl", "mcap"))
    e.add_argument("--out", required=True, help="file to write (- for stdout, csv and jsonl only)")
    _root_opt(e)
    e.set_defaults(func=_lazy("_export", "run"))

    pl = _sub(sub, "plot", "fields of a track or metric over time as a PNG (matplotlib)",
              "Plot fields of a track (over its timestamp) or a metric (over its index, or --x FIELD) to a PNG. "
              "A list field gives one line per element; q[2] picks one. Needs matplotlib: pip install 'dashcar[plot]'.")
    pl.add_argument("run", metavar="RUN")
    pl.add_argument("topic", metavar="TOPIC")
    pl.add_argument("fields", metavar="FIELD", nargs="+")
    pl.add_argument("--out", required=True, help="PNG file to write")
    pl.add_argument("--x", help="field on the x axis (default: timestamp for tracks, index for metrics)")
    pl.add_argument("--width", type=float, default=10.0, help="inches (default 10)")
    pl.add_argument("--height", type=float, default=4.0, help="inches (default 4)")
    _root_opt(pl)
    pl.set_defaults(func=_lazy("_plot", "run"))

    d = _sub(sub, "doctor", "check the installation and the agent; says what to fix",
             "Check the runtime dir (owner, mode), the agent (alive, version, protocol), the WAL and the state disk, "
             "the sinks, the systemd unit and the optional packages. Exit 4 when something is broken.")
    _runtime_opt(d)
    d.add_argument("--json", action="store_true", help="the checks as JSON")
    d.set_defaults(func=_lazy("_doctor", "run"))

    c = _sub(sub, "config", "the agent's settings and where each value came from")
    csub = c.add_subparsers(dest="config_cmd", required=True, metavar="ACTION")
    cs = _sub(csub, "config show", "every setting, its value and its source: default, file, env or flag")
    _runtime_opt(cs)
    cs.add_argument("--config", help="TOML file (default: $DASHCAR_CONFIG)")
    cs.add_argument("--state-dir", default=None, help="as dashcar agent --state-dir")
    cs.add_argument("--running", action="store_true", help="the running agent's settings instead (asks it)")
    cs.add_argument("--json", action="store_true", help="as JSON")
    for fld in TUNABLES:
        cs.add_argument("--" + fld.name.replace("_", "-"), dest=fld.name, default=None, metavar="V", help=argparse.SUPPRESS)
    cs.set_defaults(func=_config_show)

    sv = _sub(sub, "service", "install or remove the agent as a systemd unit")
    ssub = sv.add_subparsers(dest="service_cmd", required=True, metavar="ACTION")
    si = _sub(ssub, "service install", "write, enable and start the systemd unit (--dry-run prints it)",
              "Write the agent's systemd unit (a user unit with --user; else a system unit shared by a group), reload "
              "systemd, enable and start it. --dry-run prints the unit and the commands instead.")
    si.add_argument("--user", action="store_true", help="a user unit (systemctl --user), no root needed")
    si.add_argument("--dry-run", action="store_true", help="print the unit and what would run; change nothing")
    si.add_argument("--no-start", action="store_true", help="write the unit only")
    si.add_argument("--data-root", action="append", metavar="DIR",
                    help="a data root runs may be written under (repeat; the only writable paths, and the allow-list)")
    si.add_argument("--run-as", default="dashcar", help="system unit: the agent's user (default dashcar)")
    si.add_argument("--group", default="dashcar", help="system unit: the group whose members may log (default dashcar)")
    si.set_defaults(func=_lazy("_service", "install"))
    su = _sub(ssub, "service uninstall", "stop, disable and remove the systemd unit (the state dir is kept)")
    su.add_argument("--user", action="store_true", help="the user unit")
    su.add_argument("--dry-run", action="store_true", help="print what would be done")
    su.set_defaults(func=_lazy("_service", "uninstall"))

    dm = _sub(sub, "demo", "log a simulated 1 kHz robot for a few seconds into ./.dash")
    _runtime_opt(dm)
    dm.add_argument("--seconds", type=float, default=3.0, help="how long (default 3)")
    dm.add_argument("--rate", type=float, default=1000.0, help="appends per second (default 1000)")
    dm.add_argument("--dash-root", help="data root (default: the SDK's, ./.dash)")
    user = os.environ.get("USER") or "demo"
    dm.add_argument("--prefix", default=f"{user}/dashcar-demo/run-{time.strftime('%Y%m%d-%H%M%S')}", help="the run's prefix")
    dm.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dashcar`` console script; returns the process exit code."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "agent":
        return _agent_cmd(args.runtime_dir, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as exc:
        err().print(f"dashcar: {exc}", markup=False, highlight=False, soft_wrap=True)
        return exc.code
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:
        # The reader went away (| head): nothing more to say, and Python must not complain at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return OK
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        err().print(f"dashcar: cannot use{where}: {exc.strerror or exc}; check the path and its permissions",
                    markup=False, soft_wrap=True)
        return FAILED

