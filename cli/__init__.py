"""The ``dashcar`` command: ``agent``, ``status``, ``flush``, ``stop`` and ``demo``.

The command may import the SDK and the agent; the SDK imports neither the agent nor this
package. ``agent`` hands its arguments to ``dashcar.agent.main``, which owns the agent's flags
and their defaults (``dashcar.agent.config``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from dashcar import Experiment, _agent
from dashcar.proto import runtime_dir

OK: Final = 0
FAILED: Final = 1
NO_AGENT: Final = 2

REPLY_TIMEOUT_S: Final = 2.0
FLUSH_TIMEOUT_S: Final = 30.0
"""How long ``dashcar flush`` lets the agent write; the reply may take one second more."""


def _runtime_dir(args: argparse.Namespace) -> Path:
    """``--runtime-dir``, else the directory the SDK and the agent find by themselves."""
    return Path(args.runtime_dir) if args.runtime_dir else runtime_dir(os.environ)


def _ask(args: argparse.Namespace, msg: dict[str, object], timeout_s: float) -> dict[str, Any] | None:
    """Send one control request; say so on stderr when no agent answers."""
    where = _runtime_dir(args)
    reply = _agent.request(where, msg, timeout_s)
    if reply is None:
        print(f"dashcar: no agent answers at {where}", file=sys.stderr)
    return reply


def _agent_cmd(runtime_dir: str | None, agent_args: list[str]) -> int:
    """Run the agent in the foreground; ``--runtime-dir`` given after ``agent`` wins over the global one."""
    from dashcar.agent.main import main as agent_main

    given = ["--runtime-dir", runtime_dir] if runtime_dir else []
    return agent_main([*given, *agent_args])


def _status(args: argparse.Namespace) -> int:
    """Print the agent's counters, backlog and runs (or its whole status as JSON)."""
    st = _ask(args, {"op": "status"}, REPLY_TIMEOUT_S)
    if st is None:
        return NO_AGENT
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return OK
    fr = st["frames"]
    losses = ("dropped_by_producers", "missing", "rejected", "dropped_disk_full", "lost_in_producer_queue")
    lost = sum(fr[k] for k in losses)
    print(f"agent pid {st['pid']} up {st['uptime_s']:.0f}s  runtime {st['runtime_dir']}")
    print(
        f"frames: received {fr['received']}  stored {fr['stored']}  written {fr['written']}  "
        f"rejected {fr['rejected']}  dropped by producers {fr['dropped_by_producers']}  "
        f"missing {fr['missing']}  "
        f"lost in producer queues {fr['lost_in_producer_queue']}  "
        f"disk-full {fr['dropped_disk_full']}  clashes {fr['clashes']}"
    )
    print(f"wal backlog {st['wal']['backlog']}  open rows {st['sink']['open_rows']}  lost in total {lost}")
    for err in (st["wal"]["error"], st["sink"]["error"]):
        if err:
            print(f"ERROR: {err}")
    for path, run in sorted(st["runs"].items()):
        print(f"run {path}: {run['status']}  {run['counters']}")
    return OK


def _flush(args: argparse.Namespace) -> int:
    """Ask the agent to write every open row now."""
    reply = _ask(args, {"op": "flush", "timeout_s": FLUSH_TIMEOUT_S}, FLUSH_TIMEOUT_S + 1.0)
    return OK if reply and reply.get("ok") else NO_AGENT


def _stop(args: argparse.Namespace) -> int:
    """Ask the agent to drain, write, commit and exit."""
    reply = _ask(args, {"op": "stop"}, REPLY_TIMEOUT_S)
    return OK if reply and reply.get("ok") else NO_AGENT


def _demo(args: argparse.Namespace) -> int:
    """Log a simulated 6-DOF robot at 1 kHz, then report where it landed and what it cost."""
    exp = Experiment(prefix=args.prefix, dash_root=args.dash_root, runtime_dir=_runtime_dir(args))
    rate: float = args.rate
    period = 1.0 / rate
    n = int(args.seconds * rate)
    costs: list[float] = []
    with exp.run:
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
            wait = t0 + (i + 1) * period - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        exp.log("demo finished")
    costs.sort()
    with open(exp.run_dir / "tracks" / "robot_state" / "data.jsonl", "rb") as f:
        rows = sum(1 for _ in f)
    print(f"data: {exp.run_dir}")
    print(
        f"summary: {n} track appends at {rate:.0f} Hz, {rows} rows on disk, "
        f"append p50 {costs[len(costs) // 2]:.1f} us p99 {costs[int(len(costs) * 0.99)]:.1f} us"
    )
    return OK if rows == n else FAILED


def build_parser() -> argparse.ArgumentParser:
    """The global flags and one subparser per command; each but ``agent`` sets ``run`` to its function."""
    p = argparse.ArgumentParser(prog="dashcar", description="dashcar: non-blocking experiment logging")
    p.add_argument(
        "--runtime-dir",
        help="the agent's runtime dir (default: $DASHCAR_RUNTIME_DIR, $XDG_RUNTIME_DIR/dashcar, "
        "/tmp/dashcar-UID)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    # main() hands everything after "agent" to the agent's own parser, --help included.
    sub.add_parser("agent", add_help=False, help="run the agent in the foreground (see dashcar agent --help)")
    s = sub.add_parser("status", help="counters, backlog, drops and runs")
    s.add_argument("--json", action="store_true", help="the agent's whole status as JSON")
    s.set_defaults(run=_status)
    sub.add_parser("flush", help="write every open row now").set_defaults(run=_flush)
    sub.add_parser("stop", help="stop the agent gracefully").set_defaults(run=_stop)
    d = sub.add_parser("demo", help="log a simulated 1 kHz robot for a few seconds")
    d.set_defaults(run=_demo)
    d.add_argument("--seconds", type=float, default=3.0)
    d.add_argument("--rate", type=float, default=1000.0)
    d.add_argument("--dash-root", help="data root (default: the SDK's, ./.dash)")
    user = os.environ.get("USER") or "demo"
    d.add_argument("--prefix", default=f"{user}/dashcar-demo/run-{time.strftime('%Y%m%d-%H%M%S')}")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dashcar`` console script; returns the process exit code."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "agent":
        return _agent_cmd(args.runtime_dir, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)
