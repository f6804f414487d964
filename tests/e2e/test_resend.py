"""Nothing is lost when the agent dies: producers hold what the agent has not acknowledged as
stored and send it again to the restarted agent, which keeps each frame once.

The only frames still lost are those of a producer killed together with the agent; they are
counted from the producer's counter file."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path
from typing import Any

from tests.conftest import AgentHandle, read_json, read_jsonl, wait_until

PRODUCER = """
import json, sys, time, dashcar
from dashcar import _transport
idx, mode, n, root = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
exp = dashcar.Experiment(prefix=f"resend/{mode}/p{idx}", dash_root=root, echo_logs=False,
                         coalesce_ms=2 if mode.endswith("-grouped") else 0).start()
track, metric = exp.tracks("robot/state"), exp.metrics("loss")
t0 = time.perf_counter()
for i in range(n):
    track.append(q=[i, -i], _ts=i * 0.001)
    if i % 100 == 99:
        metric.log(step=i)
    if mode.startswith("paced"):
        wait = t0 + (i + 1) * 0.001 - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
    elif i % 2000 == 1999:
        time.sleep(0.3)
assert exp.flush(30), "the barrier was confirmed"
p = _transport.get_transport(exp._runtime_dir).producer()
exp.complete()
print(json.dumps({"resent": p.resent, "released": p.released, "dropped": p.dropped}), flush=True)
"""


MODES = ["paced", "paced-grouped", "burst", "burst-grouped"]
"""``-grouped``: coalescing on, so held messages carry several frames each."""


def test_agent_kills_under_paced_and_bursting_producers_lose_nothing(agent_factory: Any, producers: Any) -> None:
    rng = random.Random(5)
    agent: AgentHandle = agent_factory("--merge-window-s", "0.05").start()
    n = 4000
    procs = [
        producers(f"import sys; sys.argv = ['p', '{i}', '{mode}', '{n}', {str(agent.data_dir)!r}]\n" + PRODUCER, agent.env())
        for i, mode in enumerate(MODES)
    ]
    kills = 0
    while kills < 3 and any(p.poll() is None for p in procs):
        time.sleep(rng.uniform(0.4, 0.9))
        agent.kill()
        kills += 1
        agent.start()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "Traceback" not in err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert kills == 3
    for i, mode in enumerate(MODES):
        run = agent.data_dir / "resend" / mode / f"p{i}"
        wait_until(lambda run=run: (read_json(run / "experiment.json") or {}).get("status") == "completed", 60, f"{run} closed")
        rows = read_jsonl(run / "tracks" / "robot_state" / "data.jsonl")
        assert [(r["timestamp"], r["q"]) for r in rows] == [(j * 0.001, [j, -j]) for j in range(n)], "every entry, once"
        steps = sorted(p["data"]["step"] for p in read_jsonl(run / "metrics" / "loss" / "data.jsonl"))
        assert steps == list(range(99, n, 100)), "every metric point, once"
        counters = read_json(run / "experiment.json")["dashcar"]["counters"]
        assert counters.get("missing", 0) == 0 and counters.get("lost_in_producer_queue", 0) == 0
    assert sum(r["resent"] for r in results) > 0, "the restarted agents were sent what their predecessors lost"
    assert all(r["released"] == 0 and r["dropped"] == 0 for r in results)
    fr = agent.status()["frames"]
    assert fr["missing"] == 0 and fr["lost_in_producer_queue"] == 0


def test_a_producer_killed_together_with_the_agent_has_its_losses_counted(agent_factory: Any, producers: Any) -> None:
    agent: AgentHandle = agent_factory("--merge-window-s", "0.05").start()
    proc = producers(
        f"""
        import sys, dashcar
        exp = dashcar.Experiment(prefix="resend/killed/together", dash_root={str(agent.data_dir)!r}, echo_logs=False).start()
        assert exp.flush()
        print("open", flush=True)
        sys.stdin.readline()
        for i in range(5000):
            exp.tracks("t").append(i=i, _ts=float(i))
        print("sent", flush=True)
        sys.stdin.readline()
        """,
        agent.env(),
    )
    assert proc.stdout.readline().strip() == "open"
    pids = agent.pids()
    agent.signal_all(signal.SIGSTOP, pids)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "sent"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    agent.signal_all(signal.SIGKILL, pids)
    assert agent.proc is not None
    agent.proc.wait(10)
    agent.start()
    run = agent.data_dir / "resend" / "killed" / "together"
    wait_until(lambda: (read_json(run / "experiment.json") or {}).get("status") == "crashed", 30, "run closed as crashed")
    counters = read_json(run / "experiment.json")["dashcar"]["counters"]
    path = Path(run / "tracks" / "t" / "data.jsonl")
    rows = read_jsonl(path) if path.exists() else []
    lost = counters.get("lost_in_producer_queue", 0) + counters.get("missing", 0)
    assert lost > 0, "frames the frozen agent never stored died with the producer"
    assert len(rows) + lost == 5000, "every frame is on disk or counted"
    assert [r["i"] for r in rows] == list(range(len(rows)))
