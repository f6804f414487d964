"""Retention: a sink that never catches up costs the local files nothing, and the WAL stays under its cap.

The lagging sink is a real sink class loaded by the agent from the tests (``--sinks``), not a
mock of the core: an endless outage. Near the cap its cursor jumps ahead; what it skipped is
counted for it and per run, while every frame still lands in JSONL exactly once. The producer
logs at a rate the core keeps up with even on a busy machine (about 10 000 frames/s): what
fills the WAL here is the lagging sink's backlog, not frames waiting for the core."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AgentHandle, read_json, read_jsonl, wait_until

REPO = Path(__file__).resolve().parents[2]
CAP = 8 * 1024 * 1024
N = 40_000
PAD = "x" * 800


def test_a_sink_that_never_catches_up_costs_local_files_nothing(
    agent_factory: Any, producers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    agent: AgentHandle = agent_factory(
        "--merge-window-s", "0.05", "--wal-max-bytes", str(CAP), "--sinks", "jsonl,tests.agent.lagging_sink:NeverCatchesUp"
    ).start()
    proc = producers(
        f"""
        import sys, time, dashcar
        exp = dashcar.Experiment(prefix="lab/retention/run", dash_root={str(agent.data_dir)!r}, echo_logs=False).start()
        for i in range({N}):
            exp.tracks("arm").append(i=i, pad={PAD!r}, _ts=i * 0.001)
            if i % 100 == 99:
                time.sleep(0.01)
        exp.complete()
        print("done", flush=True)
        """,
        agent.env(),
    )
    peak = 0
    while proc.poll() is None:
        st = agent.status()
        peak = max(peak, st["wal"]["bytes"])
        time.sleep(0.02)
    assert proc.returncode == 0, proc.stderr.read()
    run = agent.data_dir / "lab" / "retention" / "run"
    wait_until(lambda: (read_json(run / "experiment.json") or {}).get("status") == "completed", 60, "run completed")
    rows = read_jsonl(run / "tracks" / "arm" / "data.jsonl")
    assert [r["i"] for r in rows] == list(range(N)), "every row once, in order"
    st = agent.status()
    lagging = st["sinks"]["lagging"]
    assert st["frames"]["dropped_disk_full"] == 0 and st["frames"]["missing"] == 0, "ingest never refused a frame"
    assert peak <= CAP and st["wal"]["bytes"] <= CAP
    assert N * len(PAD) > 3 * CAP, "the run is several times the WAL's cap"
    skipped = lagging["counters"]["skipped_frames"]
    assert skipped > 0 and lagging["skipped_by_run"][str(run)] > 0
    assert skipped + lagging["lag"]["frames"] == st["core"]["stream_frames"] >= st["frames"]["received"], (
        "every frame skipped or still waiting for the lagging sink"
    )
    assert lagging["error"] and "down" in lagging["error"] and lagging["retry"]["attempt"] >= 1
    assert st["sinks"]["jsonl"]["lag"]["frames"] == 0 and st["sinks"]["jsonl"]["error"] is None
