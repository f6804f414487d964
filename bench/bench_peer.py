"""Against the peer: the same 6-DOF workload through the reference ``ml-dash`` client (local mode),
its call cost next to dashcar's (default, and with 2 ms coalescing) in the same run, and what
each has on disk when the producer is SIGKILLed 1 s into a 1 kHz run (for dashcar, once the
agent has closed the run as crashed: nothing more can arrive after that)."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._util import Agent, emit, percentiles

WORKLOAD = """
import sys, time
root, which, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if which == "ml_dash":
    from ml_dash import Experiment
    exp = Experiment(prefix="peer/bench/run", dash_root=root)
else:
    from dashcar import Experiment
    coalesce_ms = 2 if which == "dashcar_coalesced" else 0
    exp = Experiment(prefix="peer/bench/run", dash_root=root, echo_logs=False, coalesce_ms=coalesce_ms)
exp.run.start()
track = exp.tracks("robot/state")
q = [0.1] * 6
costs = []
t0 = time.perf_counter()
for i in range(n):
    a = time.perf_counter_ns()
    track.append(q=q, qd=q, tau=q, gripper_pos=0.04, gripper_force=10.0, _ts=i * 0.001)
    costs.append(time.perf_counter_ns() - a)
    if i == 999:
        print("1s", flush=True)
    wait = t0 + (i + 1) * 0.001 - time.perf_counter()
    if wait > 0:
        time.sleep(wait)
print(" ".join(map(str, costs)), flush=True)
sys.stdin.readline()
"""


def rows(root: Path) -> int:
    f = root / "peer" / "bench" / "run" / "tracks" / "robot_state" / "data.jsonl"
    return sum(1 for _ in open(f)) if f.exists() else 0


def closed(root: Path, timeout_s: float) -> None:
    """Wait until the agent has closed the killed run (it writes every row it received first)."""
    path = root / "peer" / "bench" / "run" / "experiment.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if json.loads(path.read_text()).get("status") == "crashed":
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)


def run(which: str, env: dict[str, str], n: int, kill_after_1s: bool) -> tuple[list[int], int]:
    root = Path(tempfile.mkdtemp(prefix="dcp-", dir="/tmp"))
    p = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(root), which, str(n)], env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert p.stdout is not None and p.stdin is not None
    assert p.stdout.readline().strip() == "1s"
    try:
        if kill_after_1s:
            time.sleep(0.05)
            p.send_signal(signal.SIGKILL)
            p.wait()
            if which != "ml_dash":
                closed(root, 10.0)
            return [], rows(root)
        costs = [int(x) for x in p.stdout.readline().split()]
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(60)
        return costs, rows(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.calls = 2000
    result: dict[str, object] = {}
    with Agent() as agent:
        env = dict(agent.env)
        for which in ("ml_dash", "dashcar", "dashcar_coalesced"):
            costs, _ = run(which, env, args.calls, kill_after_1s=False)
            _, on_disk = run(which, env, args.calls, kill_after_1s=True)
            result[which] = {"paced": percentiles(costs), "rows_on_disk_after_sigkill_at_1s": on_disk}
            if which != "ml_dash" and on_disk == 0:
                st = agent.status()
                result[which]["agent_when_nothing_landed"] = {  # type: ignore[index]
                    "frames": st["frames"], "sink": st["sink"], "ingest_restarts": st["ingest_restarts"],
                    "log_tail": (agent.base / "agent.log").read_text(errors="replace")[-3000:],
                }
    emit("peer", {**result, "calls": args.calls})


if __name__ == "__main__":
    main()
