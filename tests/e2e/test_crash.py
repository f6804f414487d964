"""Processes die for real (SIGKILL): the agent outlives producers, and survives its own death."""

from __future__ import annotations

import os
import signal
from typing import Any

from tests.conftest import AgentHandle, read_json, read_jsonl, wait_until


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False

FLOOD = """
    import sys, time, dashcar
    exp = dashcar.Experiment(prefix="lab/robot/{name}", dash_root={root!r}).start()
    t = exp.tracks("robot/state")
    m = exp.metrics("train")
    i = 0
    while {limit} < 0 or i < {limit}:
        t.append(q=[i, i + 1, i + 2], _ts=i * 0.001)
        if i % 10 == 0:
            m.log(step=i)
        if i == {flush_at}:
            assert exp.flush(), "barrier"
            print("flushed", flush=True)
        i += 1
        if {pace}:
            time.sleep({pace})
    print("sent", i, flush=True)
    exp.complete()
"""


def flood(producers: Any, agent: AgentHandle, name: str, *, limit: int = -1, flush_at: int = -1, pace: float = 0.0) -> Any:
    code = FLOOD.format(name=name, root=str(agent.data_dir), limit=limit, flush_at=flush_at, pace=pace)
    return producers(code, agent.env())


def test_producer_sigkill_closes_run_as_crashed_and_keeps_every_received_frame(agent: AgentHandle, producers: Any) -> None:
    proc = flood(producers, agent, "killed", flush_at=500, pace=0.0005)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "flushed"
    wait_until(lambda: agent.status()["frames"]["stored"] > 900, 20, "more frames after the barrier")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    run = agent.data_dir / "lab" / "robot" / "killed"
    wait_until(lambda: (read_json(run / "experiment.json") or {}).get("status") == "crashed", 20, "run closed as crashed")
    assert agent.proc is not None and agent.proc.poll() is None, "agent lives on"
    st = agent.status()
    rows = read_jsonl(run / "tracks" / "robot_state" / "data.jsonl")
    ts = [r["timestamp"] for r in rows]
    assert ts == [i * 0.001 for i in range(len(rows))], "sorted, contiguous, one line per timestamp"
    points = read_jsonl(run / "metrics" / "train" / "data.jsonl")
    assert [p["index"] for p in points] == list(range(len(points)))
    meta = read_json(run / "experiment.json")
    counters = meta["dashcar"]["counters"]
    assert counters["frames"] == 1 + len(rows) + len(points), "every frame the agent received is in the files"
    assert st["frames"]["stored"] == st["frames"]["received"] and counters.get("missing", 0) == 0
    assert "ended without closing" in meta["dashcar"]["reason"]
    assert counters["producers_died"] == 1


def test_agent_sigkill_and_restart_is_exactly_once(agent_factory: Any, producers: Any) -> None:
    """Agent killed mid-stream three times: no line twice, none torn, every gap counted."""
    agent = agent_factory("--merge-window-s", "0.05").start()
    n = 30_000
    proc = flood(producers, agent, "survivor", limit=n, pace=0.00002)
    for target in (3_000, 9_000, 16_000):
        wait_until(lambda target=target: agent.status()["frames"]["stored"] >= target, 60, f"{target} stored")
        agent.kill()
        agent.start()
    assert proc.wait(120) == 0
    assert proc.stdout is not None and proc.stdout.read().split() == ["sent", str(n)]
    run = agent.data_dir / "lab" / "robot" / "survivor"
    wait_until(lambda: (read_json(run / "experiment.json") or {}).get("status") == "completed", 30, "run completed")
    rows = read_jsonl(run / "tracks" / "robot_state" / "data.jsonl")
    ts = [r["timestamp"] for r in rows]
    assert ts == sorted(set(ts)), "sorted, no duplicate line"
    assert all(r["q"][0] == round(r["timestamp"] * 1000) for r in rows)
    points = read_jsonl(run / "metrics" / "train" / "data.jsonl")
    assert [p["index"] for p in points] == list(range(len(points)))
    steps = [p["data"]["step"] for p in points]
    assert len(steps) == len(set(steps)), "no metric point twice"
    counters = read_json(run / "experiment.json")["dashcar"]["counters"]
    sent = n + n // 10 + 2  # entries, points, open, close
    lost = counters.get("missing", 0) + counters.get("dropped_by_producer", 0)
    assert counters["frames"] == len(rows) + len(points) + 1
    assert len(rows) + len(points) + 2 + lost == sent, "every frame is on disk or counted as lost"


def test_agent_restart_recovers_open_rows(agent_factory: Any) -> None:
    agent = agent_factory("--merge-window-s", "3600").start()
    import dashcar

    exp = dashcar.Experiment(prefix="a/b/rows", dash_root=agent.data_dir).start()
    for i in range(200):
        exp.tracks("t").append(i=i, _ts=float(i))
    wait_until(lambda: agent.status()["sink"]["open_rows"] == 200, 10, "rows open in the agent")
    agent.kill()
    agent.start()
    exp.tracks("t").append(j=1, _ts=5.0)
    assert exp.flush(10)
    rows = read_jsonl(exp.run_dir / "tracks" / "t" / "data.jsonl")
    assert [r["i"] for r in rows] == list(range(200))
    assert rows[5] == {"timestamp": 5.0, "i": 5, "j": 1}
    exp.complete()


def test_forked_child_logs_under_its_own_identity_and_nothing_twice(agent: AgentHandle) -> None:
    import dashcar

    exp = dashcar.Experiment(prefix="a/b/fork", dash_root=agent.data_dir).start()
    exp.tracks("t").append(parent=1, _ts=0.0)
    pid = os.fork()
    if pid == 0:
        try:
            exp.tracks("t").append(child=1, _ts=1.0)
            ok = exp.flush(10)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    exp.tracks("t").append(parent=2, _ts=2.0)
    exp.complete()
    rows = read_jsonl(exp.run_dir / "tracks" / "t" / "data.jsonl")
    assert rows == [{"timestamp": 0.0, "parent": 1}, {"timestamp": 1.0, "child": 1}, {"timestamp": 2.0, "parent": 2}]
    wait_until(
        lambda: read_json(exp.run_dir / "experiment.json")["status"] == "completed", 10, "run closed once the child is gone"
    )


def test_frames_dying_in_a_killed_producers_queue_are_counted(agent: AgentHandle, producers: Any) -> None:
    """The agent is frozen (SIGSTOP) while a producer fills its queue and is SIGKILLed: whatever
    never reached the agent is reported from the producer's counter file, not lost silently."""
    proc = producers(
        f"""
        import sys, dashcar
        exp = dashcar.Experiment(prefix="lab/robot/tail", dash_root={str(agent.data_dir)!r}).start()
        assert exp.flush()
        print("open", flush=True)
        sys.stdin.readline()
        for i in range(20000):
            exp.tracks("t").append(i=i, _ts=float(i))
        print("sent", flush=True)
        sys.stdin.readline()
        """,
        agent.env(),
    )
    assert proc.stdout.readline().strip() == "open"
    pids = agent.pids()
    agent.signal_all(signal.SIGSTOP, pids)
    try:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "sent"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        agent.signal_all(signal.SIGCONT, pids)
    run = agent.data_dir / "lab" / "robot" / "tail"
    wait_until(lambda: (read_json(run / "experiment.json") or {}).get("status") == "crashed", 20, "run closed as crashed")
    counters = read_json(run / "experiment.json")["dashcar"]["counters"]
    path = run / "tracks" / "t" / "data.jsonl"
    rows = read_jsonl(path) if path.exists() else []
    lost = counters.get("lost_in_producer_queue", 0) + counters.get("dropped_by_producer", 0)
    assert lost > 0, "some frames were still in the producer's queue"
    assert len(rows) + lost == 20000, "every frame is on disk or counted"
    assert [r["i"] for r in rows] == list(range(len(rows)))
    assert agent.status()["frames"]["lost_in_producer_queue"] == counters.get("lost_in_producer_queue", 0)


def test_ingest_process_dies_with_the_agent(agent_factory: Any) -> None:
    """A SIGKILLed agent leaves no ingest process behind to hold the socket or write the WAL."""
    agent = agent_factory().start()
    ingest = agent.status()["ingest_pid"]
    assert ingest and pid_alive(ingest)
    agent.kill()
    wait_until(lambda: not pid_alive(ingest), 10, "ingest process gone with the agent")
    agent.start()
    assert agent.status()["ingest_pid"] != ingest


def test_ingest_process_killed_alone_is_replaced_and_losses_are_counted(agent: AgentHandle, producers: Any) -> None:
    proc = flood(producers, agent, "ingest-killed", limit=20_000, flush_at=2_000, pace=0.0001)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "flushed"
    first = agent.status()["ingest_pid"]
    os.kill(first, signal.SIGKILL)
    wait_until(
        lambda: agent.status()["ingest_restarts"] == 1 and agent.status()["ingest_pid"] != first, 20, "a new ingest process"
    )
    assert proc.wait(120) == 0
    run = agent.data_dir / "lab" / "robot" / "ingest-killed"
    wait_until(lambda: (read_json(run / "experiment.json") or {}).get("status") == "completed", 30, "run completed")
    rows = read_jsonl(run / "tracks" / "robot_state" / "data.jsonl")
    points = read_jsonl(run / "metrics" / "train" / "data.jsonl")
    assert len(rows) >= 2_001 and [r["timestamp"] for r in rows] == sorted({r["timestamp"] for r in rows})
    counters = read_json(run / "experiment.json")["dashcar"]["counters"]
    lost = counters.get("missing", 0) + counters.get("dropped_by_producer", 0)
    assert len(rows) + len(points) + 2 + lost == 20_000 + 2_000 + 2, "every frame is on disk or counted as lost"


def test_a_run_directory_removed_behind_the_agent_stalls_nothing(agent: AgentHandle) -> None:
    """Someone deletes a live run's directory: the agent writes that run's later rows into a new
    directory and every other run keeps landing (before, the sink retried the missing file forever)."""
    import shutil

    import dashcar

    gone = dashcar.Experiment(prefix="lab/rm/gone", dash_root=agent.data_dir).start()
    other = dashcar.Experiment(prefix="lab/rm/other", dash_root=agent.data_dir).start()
    for i in range(100):
        gone.tracks("t").append(i=i, _ts=float(i))
        gone.metrics("m").log(i=i)
    assert gone.flush()
    shutil.rmtree(gone.run_dir)
    for i in range(100, 150):
        gone.tracks("t").append(i=i, _ts=float(i))
    gone.tracks("t").append(late=1, _ts=10.0)
    gone.metrics("m").log(i=100)
    other.tracks("t").append(i=1, _ts=1.0)
    assert other.flush(20) and gone.flush(20)
    assert read_jsonl(other.run_dir / "tracks" / "t" / "data.jsonl") == [{"timestamp": 1.0, "i": 1}]
    rows = read_jsonl(gone.run_dir / "tracks" / "t" / "data.jsonl")
    assert [r["timestamp"] for r in rows] == [10.0, *[float(i) for i in range(100, 150)]]
    assert [p["data"]["i"] for p in read_jsonl(gone.run_dir / "metrics" / "m" / "data.jsonl")] == [100]
    gone.complete()
    other.complete()
    assert (read_json(gone.run_dir / "experiment.json") or {}).get("status") == "completed"
    wait_until(lambda: agent.status()["sink"]["error"] is None, 10, "sink healthy")
