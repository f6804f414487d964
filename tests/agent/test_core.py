"""The core's handling of a run's remote settings, on a real WAL with the real JSONL sink."""

from __future__ import annotations

import os
from pathlib import Path

from dashcar.agent.core import Core
from dashcar.agent.sinks.jsonl import JsonlSink
from dashcar.agent.sinks.runner import Runner
from dashcar.agent.stream import RunItem
from dashcar.agent.wal import Wal
from dashcar.proto import Frame, Kind, RunClose, RunOpen, Track, encode


def test_a_token_never_reaches_the_run_info_and_a_remote_only_run_keeps_no_files(tmp_path: Path) -> None:
    wal = Wal(tmp_path / "wal", 1 << 30)
    root = str(tmp_path / "data")
    info = {"name": "r", "dash_url": "https://dash.example/", "dash_token": "s3cr3t", "local": False}
    frames = [
        Frame(Kind.RUN_OPEN, 5, os.getpid(), root, "a/b/r", 1, RunOpen(info)),
        Frame(Kind.TRACK, 5, os.getpid(), root, "a/b/r", 2, Track("t", 1.0, {"x": 1})),
        Frame(Kind.RUN_CLOSE, 5, os.getpid(), root, "a/b/r", 3, RunClose("completed", None, 0)),
    ]
    wal.append([encode(f) for f in frames], {})
    runner: Runner | None = None
    core = Core(wal, sinks_passed=lambda: runner.durable if runner else 0)
    core.recover()
    runner = Runner(JsonlSink(), core, wal, tmp_path)
    batch = core.step(settle_all=True)
    assert batch is not None
    run = next(i for i in batch.items if isinstance(i, RunItem))
    assert (run.local, run.dash_url, run.token) == (False, "https://dash.example", "s3cr3t")
    assert "dash_token" not in run.info and "dash_url" not in run.info and run.info["name"] == "r"
    while runner.step():
        pass
    assert runner.cursor == batch.seq and not (tmp_path / "data").exists(), "no local file for a remote-only run"
    assert b"s3cr3t" not in b"".join(p.read_bytes() for p in tmp_path.rglob("*.jsonl")), "no token in any JSON line"
    wal.close()


def test_an_idle_core_frees_what_the_sinks_passed_so_a_wal_near_its_cap_takes_appends_again(tmp_path: Path) -> None:
    """Ingest refuses appends past ``APPEND_SHARE`` of the cap; with nothing arriving, only the core's
    idle step can delete the records and stream batches a sink passed after the core's last step."""
    wal = Wal(tmp_path / "wal", 4 << 20)
    root = str(tmp_path / "data")
    pad = "x" * 300
    frames = [Frame(Kind.RUN_OPEN, 7, os.getpid(), root, "a/b/r", 1, RunOpen({"name": "r"}))]
    frames += [Frame(Kind.TRACK, 7, os.getpid(), root, "a/b/r", 2 + i, Track("t", float(i), {"pad": pad}))
               for i in range(4000)]
    wal.append([encode(f) for f in frames], {})
    runner: Runner | None = None
    core = Core(wal, sinks_passed=lambda: runner.durable if runner else 0)
    core.recover()
    runner = Runner(JsonlSink(), core, wal, tmp_path)
    while core.step(settle_all=True) is not None:
        pass
    full = wal.used_bytes()
    while runner.step():
        pass
    assert runner.durable == core.out_seq and wal.used_bytes() == full, "the sink passed everything after the last step"
    assert core.step() is None, "nothing to process"
    assert wal.used_bytes() < full // 4, "the idle step dropped the records and batches the sink passed"
    wal.close()
