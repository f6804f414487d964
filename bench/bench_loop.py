"""What a 1 kHz control loop feels: period error with and without logging, and freshness
(time from ``append`` to the row being readable after ``flush()``)."""

from __future__ import annotations

import argparse
import os
import time

import dashcar
from bench._util import Agent, emit, percentiles


def control_loop(seconds: float, step: object | None) -> list[int]:
    """Run a 1 kHz loop (sleep to the next deadline); return |period - 1 ms| in ns per cycle."""
    period_ns = 1_000_000
    n = int(seconds * 1000)
    errors = []
    start = time.perf_counter_ns()
    last = start
    q = [0.0] * 6
    for i in range(n):
        if step is not None:
            step(i, q)  # type: ignore[operator]
        target = start + (i + 1) * period_ns
        wait = target - time.perf_counter_ns()
        if wait > 0:
            time.sleep(wait / 1e9)
        now = time.perf_counter_ns()
        errors.append(abs((now - last) - period_ns))
        last = now
    return errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--samples", type=int, default=200, help="freshness samples")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.samples = 1.0, 30
    bare = control_loop(args.seconds, None)
    with Agent() as agent:
        os.environ.update(agent.env)
        exp = dashcar.Experiment(prefix="bench/loop/run", dash_root=agent.data_dir, echo_logs=False).start()
        track = exp.tracks("robot/state")

        def step(i: int, q: list[float]) -> None:
            track.append(q=q, qd=q, tau=q, gripper_pos=0.04, gripper_force=10.0, _ts=i * 0.001)

        logged = control_loop(args.seconds, step)
        fresh = []
        for i in range(args.samples):
            t0 = time.perf_counter_ns()
            exp.tracks("fresh").append(i=i, _ts=float(i))
            assert exp.flush()
            fresh.append(time.perf_counter_ns() - t0)
            time.sleep(0.01)
        exp.complete()
    emit("loop", {"jitter_bare": percentiles(bare), "jitter_logging": percentiles(logged), "freshness": percentiles(fresh),
                  "seconds": args.seconds})


if __name__ == "__main__":
    main()
