"""Disk full: the agent keeps running, says so, drops and counts instead of corrupting, and resumes
by itself when space returns. Uses a real tmpfs for the data root and a small WAL cap."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AgentHandle, read_json, read_jsonl, wait_until

N = 30_000


@pytest.fixture
def small_disk(dirs: Path) -> Iterator[Path]:
    mnt = dirs / "data"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_data_disk_and_full_wal_drop_count_and_recover(small_disk: Path, agent_factory: Any, producers: Any) -> None:
    agent: AgentHandle = agent_factory("--merge-window-s", "0.05", "--wal-max-bytes", str(4 * 1024 * 1024)).start()
    assert agent.data_dir == small_disk
    proc = producers(
        f"""
        import sys, time, dashcar
        exp = dashcar.Experiment(prefix="lab/disk/full", dash_root={str(agent.data_dir)!r}, echo_logs=False).start()
        for i in range({N}):
            exp.tracks("t").append(i=i, pad="x" * 200, _ts=float(i))
            if i % 1000 == 999:
                time.sleep(0.02)
        print("sent", flush=True)
        sys.stdin.readline()
        exp.complete()
        from dashcar import _transport
        t = _transport.get_transport(exp._runtime_dir)
        print("closed", sum(p.seq for p in t._producers) + t.dropped(), flush=True)
        """,
        agent.env(),
    )
    assert proc.stdout.readline().strip() == "sent"
    st = wait_until(lambda: (s := agent.status())["sink"]["error"] and s["frames"]["dropped_disk_full"] and s, 60,
                    "the sink to hit the full disk and the WAL to reach its cap")
    assert "No space left" in st["sink"]["error"]
    assert "WAL append failed" in agent.log() and "cap" in agent.log(), "the log says the WAL is full"
    assert agent.proc is not None and agent.proc.poll() is None, "the agent keeps running"
    assert "WARNING" in agent.log()
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    word, sent = proc.stdout.readline().split()
    assert word == "closed"
    run = small_disk / "lab" / "disk" / "full"
    try:
        wait_until(lambda: (read_json(run / "experiment.json") or {}).get("status") == "completed", 60, "run completed")
    except AssertionError:
        print(agent.status(), agent.log()[-3000:])  # noqa: T201 - pytest shows it with the failure
        raise
    st = wait_until(lambda: (s := agent.status())["wal"]["backlog"] == 0 and s["sinks"]["jsonl"]["lag"]["frames"] == 0
                    and s["sink"]["error"] is None and s, 30, "the backlog written, the sink's error gone")
    rows = read_jsonl(run / "tracks" / "t" / "data.jsonl")
    stamps = [r["timestamp"] for r in rows]
    assert stamps == sorted(set(stamps)), "no torn, duplicated or unsorted line"
    counters = read_json(run / "experiment.json")["dashcar"]["counters"]
    lost = counters.get("missing", 0) + counters.get("dropped_by_producer", 0)
    assert counters.get("missing", 0) > 0
    assert len(rows) + 1 + counters.get("control_frames", 0) + lost == int(sent), "every frame is on disk or counted"
    assert st["frames"]["dropped_disk_full"] <= counters["missing"]


def rss_anon_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon")


def test_a_growing_backlog_keeps_agent_memory_flat(small_disk: Path, agent_factory: Any, producers: Any) -> None:
    """The sink cannot write (full disk) while 300 000 frames pile up: they wait in the WAL on
    disk, and the agent's private memory (both its processes) stays flat."""
    agent: AgentHandle = agent_factory("--merge-window-s", "0.05").start()
    assert agent.proc is not None
    n = 300_000
    producers(
        f"""
        import dashcar
        exp = dashcar.Experiment(prefix="lab/backlog/run", dash_root={str(agent.data_dir)!r}, echo_logs=False).start()
        q = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
        for i in range({n}):
            exp.tracks("robot/state").append(q=q, qd=q, tau=q, i=i, _ts=i * 0.001)
        print("sent", flush=True)
        input()
        """,
        {**agent.env(), "DASHCAR_SNDHWM": str(n)},
    )
    samples = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        samples.append(sum(rss_anon_mb(pid) for pid in agent.pids()))
        if agent.status()["frames"]["stored"] >= n:
            break
        time.sleep(0.05)
    st = agent.status()
    waiting = st["wal"]["backlog"] + st["sinks"]["jsonl"]["lag"]["frames"]
    assert waiting >= 0.9 * n and st["sink"]["error"], "the backlog is on disk, the sink blocked"
    assert max(samples) < 150, f"agent RssAnon peaked at {max(samples):.0f} MB"
