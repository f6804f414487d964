"""Model-based test of WAL + JSONL sink + recovery: random appends, steps, crashes and restarts
against a plain in-memory model. Whatever happens, the files end up equal to the model: every
stored frame exactly once, track files sorted with one row per timestamp.

The sink's clock only moves when a rule says so, so track rows stay open across steps,
commits, garbage collection, crashes and restarts, and are rebuilt from the WAL."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dashcar.agent.sinks import jsonl
from dashcar.agent.wal import Wal
from dashcar.proto import Flush, Frame, Kind, Metric, Track, encode

PREFIX = "model/run/one"
SID = 77


class Crash(Exception):
    """Stands in for the process dying at this exact point."""


class WalSinkMachine(RuleBasedStateMachine):
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
        self.sink = jsonl.JsonlSink(self.wal, merge_window_s=1.0, max_open_rows=5, batch_records=7, clock=lambda: self.now)

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
    def step(self) -> None:
        self.sink.step()

    @rule()
    def settle_all(self) -> None:
        while self.sink.step():
            pass
        self.sink.step(settle_all=True)

    @rule()
    def clean_restart(self) -> None:
        self.restart()

    @rule()
    def crash_before_commit(self) -> None:
        real = self.wal.commit

        def boom(*args: Any, **kw: Any) -> None:
            raise Crash

        self.wal.commit = boom  # type: ignore[method-assign]
        try:
            self.sink.step(settle_all=True)
        except Crash:
            pass
        self.wal.commit = real  # type: ignore[method-assign]
        self.restart()

    @rule()
    def crash_after_commit_before_rewrite(self) -> None:
        real = jsonl.JsonlSink._apply_redo
        calls = {"n": 0}

        def boom(sink: jsonl.JsonlSink, path: str, pos: int, data: bytes) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise Crash
            real(sink, path, pos, data)

        jsonl.JsonlSink._apply_redo = boom  # type: ignore[method-assign]
        try:
            self.sink.step(settle_all=True)
        except Crash:
            pass
        finally:
            jsonl.JsonlSink._apply_redo = real  # type: ignore[method-assign]
        self.restart()

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


WalSinkMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_wal_sink_recovery_matches_the_model = WalSinkMachine.TestCase


def test_an_open_row_merged_from_two_entries_survives_a_restart() -> None:
    """Both entries of a still-open row are re-read from the WAL after a restart, not just the first."""
    m = WalSinkMachine()
    m.setup()
    m.track(ts=0.0, key="a", value=0)
    m.track(ts=0.0, key="b", value=1)
    m.track(ts=0.0, key="a", value=2)
    m.step()
    m.clean_restart()
    m.teardown()
