"""Coalescing producers (``coalesce_ms``): frames travel in groups, land once and in order, and
a producer killed with frames still grouped has them counted, not lost silently."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from tests.conftest import AgentHandle, read_json, read_jsonl, wait_until


def test_coalesced_frames_land_once_in_order_in_fewer_messages(agent: AgentHandle) -> None:
    import dashcar

    before = agent.status()["frames"]
    exp = dashcar.Experiment(prefix="lab/co/order", dash_root=agent.data_dir, coalesce_ms=5, echo_logs=False).start()
    n = 3000
    for i in range(n):
        exp.tracks("robot/state").append(q=[i, i + 1], _ts=i * 0.001)
        if i % 100 == 0:
            exp.metrics("train").log(step=i)
    exp.log("done")
    exp.complete()
    rows = read_jsonl(exp.run_dir / "tracks" / "robot_state" / "data.jsonl")
    assert [r["q"][0] for r in rows] == list(range(n))
    points = read_jsonl(exp.run_dir / "metrics" / "train" / "data.jsonl")
    assert [p["data"]["step"] for p in points] == list(range(0, n, 100))
    assert len(read_jsonl(exp.run_dir / "logs" / "logs.jsonl")) == 1
    after = agent.status()["frames"]
    received = after["received"] - before["received"]
    messages = after["messages"] - before["messages"]
    assert received == n + len(points) + 1 + 3, "entries, points, log, open, close and barrier"
    assert messages < received / 4, f"{received} frames came in only {messages} messages"
    counters = read_json(exp.run_dir / "experiment.json")["dashcar"]["counters"]
    assert counters.get("missing", 0) == 0 and counters.get("lost_in_producer_queue", 0) == 0


def test_a_group_leaves_on_the_first_call_after_its_window(agent: AgentHandle) -> None:
    import dashcar

    exp = dashcar.Experiment(prefix="lab/co/window", dash_root=agent.data_dir, coalesce_ms=30, echo_logs=False).start()
    assert exp.flush()
    stored = agent.status()["frames"]["stored"]
    exp.tracks("t").append(a=1, _ts=0.0)
    time.sleep(0.3)
    assert agent.status()["frames"]["stored"] == stored, "a lone frame waits for the next call"
    exp.tracks("t").append(a=2, _ts=1.0)
    wait_until(lambda: agent.status()["frames"]["stored"] == stored + 2, 10, "both frames, without a flush")
    exp.complete()


def test_frames_grouped_in_a_killed_producer_are_counted(agent: AgentHandle, producers: Any) -> None:
    from dashcar import _transport

    grouped = _transport.COALESCE_MAX_FRAMES - 1
    proc = producers(
        f"""
        import sys, dashcar
        exp = dashcar.Experiment(
            prefix="lab/co/killed", dash_root={str(agent.data_dir)!r}, coalesce_ms=100, echo_logs=False
        ).start()
        exp.tracks("t").append(i=-1, _ts=-2.0)
        assert exp.flush()
        for i in range({grouped}):
            exp.tracks("t").append(i=i, _ts=float(i))
        print("grouped", flush=True)
        sys.stdin.readline()
        """,
        agent.env(),
    )
    assert proc.stdout.readline().strip() == "grouped"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    run = agent.data_dir / "lab" / "co" / "killed"
    wait_until(lambda: (read_json(run / "experiment.json") or {}).get("status") == "crashed", 20, "run closed as crashed")
    counters = read_json(run / "experiment.json")["dashcar"]["counters"]
    rows = read_jsonl(run / "tracks" / "t" / "data.jsonl")
    assert rows == [{"timestamp": -2.0, "i": -1}]
    assert counters["lost_in_producer_queue"] == grouped


@pytest.mark.parametrize("bad", [-1, 101, float("nan"), "5", True])
def test_an_invalid_window_is_a_clear_error(bad: object) -> None:
    import dashcar

    with pytest.raises(ValueError, match="coalesce_ms"):
        dashcar.Experiment(prefix="a/b/c", coalesce_ms=bad)  # type: ignore[arg-type]
