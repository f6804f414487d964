"""Footprint: ``import dashcar`` time, agent private memory (RssAnon) idle, under load and with a
large backlog held back by a full data disk (needs root for the tmpfs; skipped otherwise)."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

from bench._util import Agent, emit

IMPORT = "import time; t = time.perf_counter(); import dashcar; print(time.perf_counter() - t)"


def import_ms(runs: int) -> float:
    cmd = [sys.executable, "-c", IMPORT]
    times = [float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout) for _ in range(runs)]
    return round(statistics.median(times) * 1000, 1)


def _flood(env: dict[str, str], root: str, n: int) -> None:
    os.environ.update(env)
    import dashcar

    exp = dashcar.Experiment(prefix="bench/footprint/run", dash_root=root, echo_logs=False).start()
    q = [0.1] * 6
    for i in range(n):
        exp.tracks("robot/state").append(q=q, qd=q, tau=q, _ts=i * 0.001)
    exp.flush(5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backlog", type=int, default=10_000_000)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.backlog = 50_000
    result: dict[str, object] = {"import_ms": import_ms(3 if args.quick else 10)}
    with Agent() as agent:
        time.sleep(1)
        result["rss_idle_mb"] = round(agent.rss_anon_kb() / 1024, 1)
        env = {**agent.env, "DASHCAR_SNDHWM": "1000000"}
        agent.data_dir.mkdir(parents=True, exist_ok=True)
        mounted = os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(agent.data_dir)], capture_output=True
        ).returncode == 0
        proc = mp.get_context("spawn").Process(target=_flood, args=(env, str(agent.data_dir), args.backlog))
        proc.start()
        peak = 0
        while proc.is_alive():
            peak = max(peak, agent.rss_anon_kb())
            st = agent.status()
            if mounted and st["frames"]["stored"] >= args.backlog:
                break
            time.sleep(0.2)
        result["rss_peak_mb"] = round(peak / 1024, 1)
        if mounted:
            result["backlog_frames"] = agent.status()["wal"]["backlog"]
            result["rss_with_backlog_mb"] = round(agent.rss_anon_kb() / 1024, 1)
        proc.join(60)
        if proc.is_alive():
            proc.kill()
        if mounted:
            subprocess.run(["umount", "-l", str(agent.data_dir)], check=False)
    emit("footprint", result)


if __name__ == "__main__":
    main()
