"""The ``dashcar`` command: ``agent``, ``status``, ``flush``, ``stop`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from dashcar.proto import runtime_dir

from . import _agent

NO_AGENT = 2


def _rd(args: argparse.Namespace) -> Path:
    return Path(args.runtime_dir) if args.runtime_dir else runtime_dir(os.environ)


def _ask(args: argparse.Namespace, msg: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
    reply = _agent.request(_rd(args), msg, timeout_s)
    if reply is None:
        print(f"dashcar: no agent answers at {_rd(args)}", file=sys.stderr)
    return reply


def _status(args: argparse.Namespace) -> int:
    st = _ask(args, {"op": "status"}, 2.0)
    if st is None:
        return NO_AGENT
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    fr = st["frames"]
    lost = fr["dropped_by_producers"] + fr["missing"] + fr["rejected"] + fr["dropped_disk_full"] + fr["lost_in_producer_queue"]
    print(f"agent pid {st['pid']} up {st['uptime_s']:.0f}s  runtime {st['runtime_dir']}")
    print(
        f"frames: received {fr['received']}  stored {fr['stored']}  written {fr['written']}  "
        f"rejected {fr['rejected']}  dropped by producers {fr['dropped_by_producers']}  missing {fr['missing']}  "
        f"lost in producer queues {fr['lost_in_producer_queue']}  "
        f"disk-full {fr['dropped_disk_full']}  clashes {fr['clashes']}"
    )
    print(f"wal backlog {st['wal']['backlog']}  open rows {st['sink']['open_rows']}  lost in total {lost}")
    for err in (st["wal"]["error"], st["sink"]["error"]):
        if err:
            print(f"ERROR: {err}")
    for path, run in sorted(st["runs"].items()):
        print(f"run {path}: {run['status']}  {run['counters']}")
    return 0


def _flush(args: argparse.Namespace) -> int:
    reply = _ask(args, {"op": "flush", "timeout_s": 30.0}, 31.0)
    return 0 if reply and reply.get("ok") else NO_AGENT


def _stop(args: argparse.Namespace) -> int:
    reply = _ask(args, {"op": "stop"}, 2.0)
    return 0 if reply and reply.get("ok") else NO_AGENT


def _demo(args: argparse.Namespace) -> int:
    """Log a simulated 6-DOF robot at 1 kHz, then report where it landed and what it cost."""
    from ._experiment import Experiment

    exp = Experiment(prefix=args.prefix, dash_root=args.dash_root)
    period = 1.0 / args.rate
    n = int(args.seconds * args.rate)
    costs: list[float] = []
    with exp.run:
        exp.params.set(robot={"name": "sim6", "dof": 6}, control={"rate_hz": args.rate})
        exp.log("demo started", metadata={"seconds": args.seconds})
        track = exp.tracks("robot/state")
        t0 = time.perf_counter()
        for i in range(n):
            t = i * period
            q = [math.sin(t + j) for j in range(6)]
            before = time.perf_counter_ns()
            track.append(q=q, qd=[math.cos(t + j) for j in range(6)], tau=[0.1 * j for j in range(6)],
                         gripper={"pos": 0.04, "force": 10.0}, _ts=round(t, 6))
            costs.append((time.perf_counter_ns() - before) / 1000)
            if i % 100 == 0:
                exp.metrics("train").log(step=i, loss=1.0 / (1 + i))
            wait = t0 + (i + 1) * period - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        exp.log("demo finished")
    costs.sort()
    rows = sum(1 for _ in open(exp.run_dir / "tracks" / "robot_state" / "data.jsonl"))
    print(f"data: {exp.run_dir}")
    print(
        f"summary: {n} track appends at {args.rate:.0f} Hz, {rows} rows on disk, "
        f"append p50 {costs[len(costs) // 2]:.1f} us p99 {costs[int(len(costs) * 0.99)]:.1f} us"
    )
    return 0 if rows == n else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dashcar`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["agent"]:
        from dashcar.agent.main import main as agent_main

        return agent_main(argv[1:])
    p = argparse.ArgumentParser(prog="dashcar", description="dashcar: non-blocking experiment logging")
    p.add_argument("--runtime-dir", help="the agent's runtime dir (default as the SDK finds it)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("agent", help="run the agent in the foreground (see dashcar agent --help)")
    s = sub.add_parser("status", help="counters, backlog, drops and runs")
    s.add_argument("--json", action="store_true")
    sub.add_parser("flush", help="write every open row now")
    sub.add_parser("stop", help="stop the agent gracefully")
    d = sub.add_parser("demo", help="log a simulated 1 kHz robot for a few seconds")
    d.add_argument("--seconds", type=float, default=3.0)
    d.add_argument("--rate", type=float, default=1000.0)
    d.add_argument("--dash-root", default=".dash")
    d.add_argument("--prefix", default=f"{os.environ.get('USER') or 'demo'}/dashcar-demo/run-{time.strftime('%Y%m%d-%H%M%S')}")
    args = p.parse_args(argv)
    if args.runtime_dir:
        os.environ["DASHCAR_RUNTIME_DIR"] = args.runtime_dir
    return {"status": _status, "flush": _flush, "stop": _stop, "demo": _demo}[args.cmd](args)
