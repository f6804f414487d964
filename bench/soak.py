"""Soak: rounds of producers flooding an agent while agents and producers are SIGKILLed at random,
and (as root) the data disk fills and frees again. Producers send again what a killed agent never
acknowledged; the agent drops what it already had (``duplicates``), so a frame stored is one
written, once. Every round is checked; the tally is printed
as JSON and written to ``docs/reliability.md``.

    python -m bench.soak --minutes 10 [--seed 1] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._util import Agent, emit, git_commit

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"

PRODUCER = """
import json, sys, time, dashcar
from dashcar import _transport
idx, n, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
exp = dashcar.Experiment(prefix=f"soak/run/p{idx}", dash_root=root, echo_logs=False).start()
shared = dashcar.Experiment(prefix="soak/shared/run", dash_root=root, echo_logs=False).start()
for i in range(n):
    exp.tracks("robot/state").append(q=[i, i, i], _ts=i * 0.001)
    shared.tracks("fused").append(**{f"p{idx}": i}, _ts=i * 0.001)
    if i % 100 == 99:
        exp.tracks("robot/state").append(late=i, _ts=(i - 90) * 0.001)
        exp.metrics("loss").log(step=i)
        time.sleep(0.002)
t = _transport.get_transport(exp._runtime_dir)
exp.complete()
shared.complete()
print(json.dumps({"sent": sum(p.seq for p in t._producers) + t.dropped()}), flush=True)
"""


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        raise AssertionError(f"torn line in {path}")
    return [json.loads(x) for x in text.splitlines()]


def _mount(path: Path, size: str) -> bool:
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def one_round(rng: random.Random, tally: dict[str, int]) -> None:
    agent = Agent("--merge-window-s", str(rng.choice([0.02, 0.2, 1.0])))
    data = agent.data_dir
    data.mkdir(parents=True, exist_ok=True)
    disk = rng.random() < 0.3 and _mount(data, "512k")
    procs = []
    n_producers = rng.randint(1, 4)
    for idx in range(n_producers):
        code = f"import sys; sys.argv = ['p', '{idx}', '{rng.randint(2000, 8000)}', {str(data)!r}]\n" + PRODUCER
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=agent.env, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True))
    killed_producers: set[int] = set()
    deadline = time.monotonic() + 40
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.05, 0.5))
        event = rng.random()
        if event < 0.35:
            agent.proc.kill()
            agent.proc.wait()
            agent.restart()
            tally["agent_kills"] += 1
        elif event < 0.45:
            alive = [i for i, p in enumerate(procs) if p.poll() is None]
            if alive:
                victim = rng.choice(alive)
                procs[victim].send_signal(signal.SIGKILL)
                killed_producers.add(victim)
                tally["producer_kills"] += 1
        elif disk and event < 0.55:
            subprocess.run(["mount", "-o", "remount,size=256m", str(data)], check=False)
            tally["disk_full_recoveries"] += 1
    if disk:
        subprocess.run(["mount", "-o", "remount,size=256m", str(data)], check=False)
    sent = 0
    for i, p in enumerate(procs):
        out, _ = p.communicate(timeout=120)
        if i not in killed_producers and p.returncode == 0:
            sent += json.loads(out.strip().splitlines()[-1])["sent"]
    end = time.monotonic() + 60
    while True:
        st = agent.status()
        lag = sum(sink["lag"]["frames"] for sink in st["sinks"].values())
        if (st["wal"]["backlog"] == 0 and not st["runs"] and lag == 0) or time.monotonic() > end:
            break
        time.sleep(0.1)
    fr = st["frames"]
    tally["rounds"] += 1
    tally["frames_stored"] += fr["stored"]
    tally["frames_written"] += fr["written"] + fr["control"]
    tally["lost_after_stored"] += fr["stored"] - fr["written"] - fr["control"] - fr["duplicates"]
    tally["resent_duplicates_dropped"] += fr["duplicates"]
    tally["counted_missing_before_store"] += fr["missing"]
    tally["counted_dropped_by_producers"] += fr["dropped_by_producers"]
    tally["counted_lost_in_producer_queues"] += fr["lost_in_producer_queue"]
    tally["counted_dropped_disk_full"] += fr["dropped_disk_full"]
    for track in data.rglob("tracks/*/data.jsonl"):
        rows = _lines(track)
        stamps = [r["timestamp"] for r in rows]
        tally["rows_checked"] += len(rows)
        tally["duplicate_rows"] += len(stamps) - len(set(stamps))
        tally["unsorted_files"] += stamps != sorted(stamps)
        for r in rows:
            i = round(r.pop("timestamp") * 1000)
            late = r.pop("late", None)
            whole = r in ({}, {"q": [i, i, i]}) if track.parent.name == "robot_state" else all(v == i for v in r.values())
            tally["wrong_rows"] += not whole or (late is not None and late != i + 90)
    for metric in data.rglob("metrics/*/data.jsonl"):
        indexes = [p["index"] for p in _lines(metric)]
        tally["duplicate_points"] += len(indexes) - len(set(indexes))
        exp = json.loads((metric.parents[2] / "experiment.json").read_text())
        tally["points_not_written"] += exp["dashcar"]["counters"].get("points", 0) - len(indexes)
    agent.close()
    if disk:
        subprocess.run(["umount", "-l", str(data)], check=False)
    shutil.rmtree(agent.base, ignore_errors=True)


def write_doc(tally: dict[str, int], minutes: float, seed: int) -> None:
    table = "\n".join(f"| {k.replace('_', ' ')} | {v} |" for k, v in tally.items())
    block = (
        f"<!-- soak -->\nLast soak: commit `{git_commit()}`, {time.strftime('%Y-%m-%d')}, {minutes:g} min, seed {seed} "
        f"(`python -m bench.soak --minutes {minutes:g} --seed {seed}`).\n\n| tally | count |\n| --- | --- |\n"
        f"{table}\n<!-- /soak -->"
    )
    text = DOC.read_text() if DOC.exists() else "<!-- soak --><!-- /soak -->"
    DOC.write_text(re.sub(r"<!-- soak -->.*<!-- /soak -->", block, text, flags=re.S))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    keys = ["rounds", "agent_kills", "producer_kills", "disk_full_recoveries", "frames_stored", "frames_written",
            "lost_after_stored", "resent_duplicates_dropped", "points_not_written", "duplicate_rows", "duplicate_points",
            "unsorted_files", "wrong_rows", "rows_checked",
            "counted_missing_before_store", "counted_dropped_by_producers", "counted_lost_in_producer_queues",
            "counted_dropped_disk_full"]
    tally = dict.fromkeys(keys, 0)
    end = time.monotonic() + args.minutes * 60
    while time.monotonic() < end:
        one_round(rng, tally)
        print(json.dumps(tally), file=sys.stderr, flush=True)
    emit("soak", tally)
    if not args.no_write:
        write_doc(tally, args.minutes, args.seed)


if __name__ == "__main__":
    main()
