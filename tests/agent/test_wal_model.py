"""Model-based test of WAL + core + JSONL sink + recovery: random appends, core steps, sink
steps, crashes at every commit point and restarts, against a plain in-memory model. Whatever
happens, the files end up equal to the model: every stored frame exactly once, track files
sorted with one row per timestamp, metric indexes contiguous.

The core's clock only moves when a rule says so, so track rows stay open across steps,
commits, garbage collection, crashes and restarts, and are rebuilt from the WAL."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dashcar.agent import layout
from dashcar.agent.core import Core
from dashcar.agent.sinks import jsonl
from dashcar.agent.sinks.runner import Runner
from dashcar.agent.wal import SinkState, Wal
from dashcar.proto import Flush, Frame, Kind, Metric, RunClose, Track, encode

PREFIX = "model/run/one"
SID = 77


class Crash(BaseException):
    """Stands in for the process dying at this exact point (no handler of the agent catches it)."""


class WalCoreSinkMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dcm-"))
        self.root = str(self.dir / "data")
        self.seq = 0
        self.now = 0.0
        self.tracks: dict[float, dict[str, Any]] = {}
        self.points: list[int] = []
        self.open()

    def open(self) -> None:
        self.wal = Wal(self.dir / "wal", 1 << 30)
        self.core = Core(self.wal, merge_window_s=1.0, max_open_rows=5, batch_records=7, clock=lambda: self.now,
                         sinks_passed=lambda: self.runner.durable)
        self.core.recover()
        self.sink = jsonl.JsonlSink()
        self.runner = Runner(self.sink, self.core, self.wal, self.dir)

    def restart(self) -> None:
        self.wal.close()
        self.open()

    def append(self, kind: Kind, payload: object) -> None:
        self.seq += 1
        self.wal.append([encode(Frame(kind, SID, os.getpid(), self.root, PREFIX, self.seq, payload))], {})  # type: ignore[arg-type]

    @rule(ts=st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, -1.0]), key=st.sampled_from(["a", "b", "c"]), value=st.integers(0, 5))
    def track(self, ts: float, key: str, value: int) -> None:
        self.append(Kind.TRACK, Track("arm/state", ts, {key: value}))
        self.tracks.setdefault(ts, {})[key] = value

    @rule(value=st.integers(0, 1000))
    def metric(self, value: int) -> None:
        self.append(Kind.METRIC, Metric("loss", [{"v": value}]))
        self.points.append(value)

    @rule()
    def flush(self) -> None:
        self.append(Kind.FLUSH, Flush(0))

    @rule()
    def time_passes(self) -> None:
        self.now += 0.7

    @rule()
    def core_step(self) -> None:
        self.core.step()

    @rule()
    def sink_step(self) -> None:
        self.runner.step()

    @rule()
    def settle_all(self) -> None:
        while self.core.step() is not None:
            pass
        self.core.step(settle_all=True)
        while self.runner.step():
            pass

    @rule()
    def clean_restart(self) -> None:
        self.restart()

    def crash_in(self, obj: Any, name: str, call: int = 1) -> None:
        """Make the ``call``-th call of ``obj.name`` die, run everything, restart."""
        real = getattr(obj, name)
        calls = {"n": 0}

        def boom(*args: Any, **kw: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == call:
                raise Crash
            return real(*args, **kw)

        setattr(obj, name, boom)
        try:
            self.settle_all()
        except Crash:
            pass
        finally:
            setattr(obj, name, real)
        self.restart()

    @rule()
    def crash_before_core_commit(self) -> None:
        self.crash_in(self.wal, "commit_core")

    @rule(call=st.integers(1, 3))
    def crash_before_sink_commit(self, call: int) -> None:
        self.crash_in(SinkState, "commit", call)

    @rule()
    def crash_before_runner_commit(self) -> None:
        self.crash_in(Runner, "_commit")

    @rule()
    def crash_after_sink_commit_before_rewrite(self) -> None:
        self.crash_in(jsonl.JsonlSink, "_apply_redo")

    def files(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        run = Path(self.root, *PREFIX.split("/"))

        def lines(p: Path) -> list[dict[str, Any]]:
            if not p.exists():
                return []
            text = p.read_text()
            assert text == "" or text.endswith("\n"), "no torn line"
            return [json.loads(x) for x in text.splitlines()]

        return lines(run / "tracks" / "arm_state" / "data.jsonl"), lines(run / "metrics" / "loss" / "data.jsonl")

    @invariant()
    def files_are_well_formed(self) -> None:
        if not hasattr(self, "sink"):
            return
        rows, points = self.files()
        stamps = [r["timestamp"] for r in rows]
        assert stamps == sorted(set(stamps)), "sorted, one row per timestamp"
        assert [p["index"] for p in points] == list(range(len(points))), "indexes contiguous, none twice"
        assert [p["data"]["v"] for p in points] == self.points[: len(points)], "points in order, a prefix of what was stored"

    @precondition(lambda self: hasattr(self, "sink"))
    @rule()
    def everything_lands_exactly_once(self) -> None:
        self.settle_all()
        rows, points = self.files()
        assert {r.pop("timestamp"): r for r in rows} == self.tracks
        assert [p["data"]["v"] for p in points] == self.points

    def teardown(self) -> None:
        if hasattr(self, "wal"):
            try:
                self.everything_lands_exactly_once()
            finally:
                self.wal.close()
                shutil.rmtree(self.dir, ignore_errors=True)


WalCoreSinkMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=30, deadline=None)
test_wal_core_sink_recovery_matches_the_model = WalCoreSinkMachine.TestCase


def test_an_open_row_merged_from_two_entries_survives_a_restart() -> None:
    """Both entries of a still-open row are re-read from the WAL after a restart, not just the first."""
    m = WalCoreSinkMachine()
    m.setup()
    m.track(ts=0.0, key="a", value=0)
    m.track(ts=0.0, key="b", value=1)
    m.track(ts=0.0, key="a", value=2)
    m.core_step()
    m.clean_restart()
    m.teardown()


def test_a_late_row_after_an_append_in_one_send_lands_in_its_place() -> None:
    """One send holding an append and then a late row for the same file rewrites the tail it will
    have, not the one on disk; a crash before the rewrite is applied loses nothing."""
    m = WalCoreSinkMachine()
    m.setup()
    m.track(ts=1.0, key="a", value=1)
    m.flush()
    m.core_step()
    m.track(ts=2.0, key="a", value=2)
    m.flush()
    m.core_step()
    m.track(ts=1.0, key="b", value=3)
    m.flush()
    m.core_step()
    m.crash_after_sink_commit_before_rewrite()
    m.teardown()


def test_a_file_first_met_and_killed_before_the_commit_is_not_written_twice() -> None:
    """A send that creates a file and dies before the runner's commit leaves bytes that the next
    start truncates (the file was registered at its old size first), so nothing lands twice."""
    m = WalCoreSinkMachine()
    m.setup()
    m.metric(value=1)
    m.track(ts=1.0, key="a", value=1)
    m.flush()
    m.crash_in(Runner, "_commit")
    m.files_are_well_formed()
    m.teardown()


def test_a_tail_rewrite_is_never_applied_again_over_later_appends() -> None:
    """A redo record is deleted by the commit after it, so a restart after more rows were appended
    to the same file does not cut them off by rewriting an old tail."""
    m = WalCoreSinkMachine()
    m.setup()
    for ts, value in ((1.0, 1), (2.0, 2)):
        m.track(ts=ts, key="a", value=value)
        m.flush()
        m.settle_all()
    m.track(ts=1.0, key="b", value=3)
    m.flush()
    m.settle_all()
    m.track(ts=3.0, key="a", value=4)
    m.flush()
    m.settle_all()
    m.clean_restart()
    m.files_are_well_formed()
    m.teardown()


def test_a_run_closed_while_its_files_cannot_be_written_gets_its_final_files_once_they_can(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (soak, full data disk): a final ``experiment.json`` that failed to be written is
    written by the sink's recovery, before the run's state is dropped, not left stale."""
    m = WalCoreSinkMachine()
    m.setup()
    m.metric(value=1)
    m.metric(value=2)
    m.append(Kind.RUN_CLOSE, RunClose("completed", None, 0))
    real = layout.write_atomic
    full = {"on": True}

    def write_atomic(path: str, text: str, *, durable: bool = False) -> None:
        if full["on"] and path.endswith("experiment.json"):
            raise OSError(28, "No space left on device")
        real(path, text, durable=durable)

    monkeypatch.setattr(layout, "write_atomic", write_atomic)
    m.settle_all()
    exp = Path(m.root, *PREFIX.split("/"), "experiment.json")
    assert m.runner.error and "No space left" in m.runner.error and not exp.exists()
    full["on"] = False
    m.settle_all()
    meta = json.loads(exp.read_text())
    assert meta["status"] == "completed" and meta["dashcar"]["counters"]["points"] == 2
    m.metric(value=3)
    m.settle_all()
    m.teardown()
