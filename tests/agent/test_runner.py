"""The runner drives any sink alike: holding batches for a sink that rolls, retries, dead letters."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dashcar.agent.core import Core
from dashcar.agent.errors import SinkRejected, SinkRetryable
from dashcar.agent.sinks import Rejected, WhenFull
from dashcar.agent.sinks.runner import Runner, backoff
from dashcar.agent.stream import Batch, ItemKind
from dashcar.agent.wal import SinkState, Wal
from dashcar.proto import Frame, Kind, RunClose, Track, encode


class Recorder:
    """A sink that records what it gets; it can hold batches, fail, or refuse."""

    name = "recorder"
    when_full: WhenFull = "skip"
    barrier = False

    def __init__(self, hold_frames: int = 0, hold_s: float = 0.0) -> None:
        self.hold_frames, self.hold_s = hold_frames, hold_s
        self.sends: list[list[int]] = []
        self.fail: Exception | None = None

    def open(self, state: SinkState) -> None:
        """Nothing to load."""

    def send(self, batches: list[Batch], state: SinkState) -> list[Rejected]:
        if self.fail is not None:
            raise self.fail
        self.sends.append([b.seq for b in batches])
        return []

    def committed(self, batches: list[Batch]) -> None:
        """Nothing to finish."""

    def close(self) -> None:
        """Nothing held."""

    def status(self) -> dict[str, Any]:
        return {}


class Setup:
    def __init__(self, tmp: Path, sink: Recorder) -> None:
        self.wal = Wal(tmp / "wal", 1 << 30)
        self.root = str(tmp / "data")
        self.seq = 0
        self.core = Core(self.wal, merge_window_s=0.0, sinks_passed=lambda: self.runner.durable)
        self.core.recover()
        self.runner = Runner(sink, self.core, self.wal, tmp)

    def frames(self, n: int, close: bool = False) -> None:
        out = []
        for _ in range(n):
            self.seq += 1
            track = Track("t", float(self.seq), {"i": 1})
            out.append(encode(Frame(Kind.TRACK, 9, os.getpid(), self.root, "a/b/c", self.seq, track)))
        if close:
            self.seq += 1
            end = RunClose("completed", None, 0)
            out.append(encode(Frame(Kind.RUN_CLOSE, 9, os.getpid(), self.root, "a/b/c", self.seq, end)))
        self.wal.append(out, {})
        while self.core.step(settle_all=True) is not None:
            pass


def test_a_sink_that_holds_gets_batches_together_once_enough_frames_wait(tmp_path: Path) -> None:
    sink = Recorder(hold_frames=10, hold_s=3600)
    s = Setup(tmp_path, sink)
    s.frames(4)
    s.frames(4)
    assert not s.runner.step() and sink.sends == [], "8 frames wait: held"
    s.frames(4)
    assert s.runner.step() and sink.sends == [[1, 2, 3]], "12 frames: one send of all three batches"


def test_a_sink_that_holds_gets_a_run_s_end_at_once(tmp_path: Path) -> None:
    sink = Recorder(hold_frames=1000, hold_s=3600)
    s = Setup(tmp_path, sink)
    s.frames(2)
    assert not s.runner.step()
    s.frames(1, close=True)
    assert s.runner.step() and sink.sends == [[1, 2]], "the batch that ends the run is sent with what waited"


def test_a_failing_sink_is_retried_after_a_growing_backoff_and_a_refused_batch_is_dead_lettered(tmp_path: Path) -> None:
    sink = Recorder()
    s = Setup(tmp_path, sink)
    s.frames(3)
    sink.fail = SinkRetryable("down", retry_after_s=120)
    assert not s.runner.step() and s.runner.error == "send: down" and s.runner.retry_at is not None
    assert s.runner.status()["retry"]["next_in_s"] > 100, "Retry-After wins over a shorter backoff"
    sink.fail = SinkRejected("400 bad request")
    assert s.runner.step() and s.runner.cursor == 1 and s.runner.error is None
    lines = [json.loads(x) for x in (tmp_path / "deadletter" / "recorder.jsonl").read_text().splitlines()]
    assert {x["reason"] for x in lines} == {"400 bad request"} and any(x["item"]["kind"] == ItemKind.ROWS for x in lines)
    assert s.runner.status()["dead_letters_by_run"] == {str(tmp_path / "data" / "a" / "b" / "c"): len(lines)}
    assert [backoff(a, rand=1.0) for a in range(4)] == [0.05, 0.1, 0.2, 0.4] and backoff(40, rand=0.0) == 15.0
