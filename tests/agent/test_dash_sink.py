"""The ML-Dash sink against a real HTTP server on 127.0.0.1: call order, batching, faults, parking, dead letters.

The sink runs behind the real runner on its own thread, over a real WAL and core; frames go
into the WAL as ingest would store them. The server is the recording ML-Dash server of
``tests/fakes``; every scenario runs against a server that honours ``Idempotency-Key`` and
one that ignores it, and asserts on what the server holds: every point once, in order.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dashcar.agent.config import AgentConfig
from dashcar.agent.core import Core
from dashcar.agent.sinks.dash import UNNAMED_METRIC, DashSink, encode, split_prefix
from dashcar.agent.sinks.http import retry_after_s
from dashcar.agent.sinks.runner import Runner
from dashcar.agent.wal import Wal
from dashcar.proto import Frame, Kind, Log, Meta, Metric, Params, RunClose, RunOpen, Track
from dashcar.proto import encode as encode_frame
from tests.conftest import wait_until
from tests.fakes.mldash_server import Experiment, FakeMlDash

TOKEN = "tok-" + "x" * 24


class Rig:
    """WAL, core and the dash sink's runner thread in ``tmp``; ``restart()`` is a clean agent restart."""

    def __init__(self, tmp: Path, **cfg: Any) -> None:
        self.tmp = tmp
        self.cfg = AgentConfig(runtime_dir=tmp, state_dir=tmp, dash_timeout_s=cfg.pop("dash_timeout_s", 1.0),
                               dash_retry_max_s=cfg.pop("dash_retry_max_s", 0.3), **cfg)
        self.root = str(tmp / "data")
        self.seq: dict[int, int] = {}
        self._start()

    def _start(self) -> None:
        self.wal = Wal(self.tmp / "wal", self.cfg.wal_max_bytes)
        self.core = Core(self.wal, merge_window_s=0.0, sinks_passed=lambda: self.runner.durable)
        self.core.recover()
        self.sink = DashSink(self.cfg)
        self.runner = Runner(self.sink, self.core, self.wal, self.tmp)
        self.thread = threading.Thread(target=self.runner.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.runner.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "runner did not stop"
        self.sink.close()
        self.wal.close()

    def restart(self) -> None:
        self.stop()
        self._start()

    def send(self, sid: int, prefix: str, frames: list[tuple[Kind, Any]]) -> None:
        """Store frames of producer ``sid`` for ``prefix`` in the WAL and let the core settle them."""
        out = []
        for kind, payload in frames:
            self.seq[sid] = self.seq.get(sid, 0) + 1
            out.append(encode_frame(Frame(kind, sid, os.getpid(), self.root, prefix, self.seq[sid], payload)))
        for i in range(0, len(out), 4096):
            self.wal.append(out[i:i + 4096], {})
        while self.core.step(settle_all=True) is not None:
            pass

    def status(self) -> dict[str, Any]:
        return self.runner.status()

    def dead_letters(self) -> list[dict[str, Any]]:
        path = self.tmp / "deadletter" / "dash.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(params=[True, False], ids=["key-honoured", "key-ignored"])
def server(request: pytest.FixtureRequest) -> Iterator[FakeMlDash]:
    fake = FakeMlDash(honour_idempotency=request.param, tokens={TOKEN}).start()
    yield fake
    fake.stop()


@pytest.fixture
def rigs(tmp_path: Path) -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for r in made:
        if r.thread.is_alive():
            r.stop()


def open_frames(url: str, token: str | None = TOKEN, **info: Any) -> list[tuple[Kind, Any]]:
    base = {"name": "x", "description": "a run", "tags": ["t1"], "dash_url": url, **info}
    if token is not None:
        base["dash_token"] = token
    return [(Kind.RUN_OPEN, RunOpen(base))]


def exp_of(server: FakeMlDash, prefix: str) -> Experiment:
    e = server.store.by_prefix(prefix)
    assert e is not None, f"no experiment {prefix} on the server"
    return e


def points(server: FakeMlDash, prefix: str, name: str) -> int:
    e = server.store.by_prefix(prefix)
    return 0 if e is None else len(e.metrics.get(name, []))


def finished(server: FakeMlDash, prefix: str) -> bool:
    e = server.store.by_prefix(prefix)
    return e is not None and e.status != "RUNNING"


def test_calls_follow_the_reference_client_and_every_point_lands_once(rigs: list[Rig], tmp_path: Path,
                                                                      server: FakeMlDash) -> None:
    rig = Rig(tmp_path)
    rigs.append(rig)
    prefix = "alice/robotics/2026/sweep-a/run-001"
    frames = open_frames(server.url)
    frames.append((Kind.PARAMS, Params({"lr": 0.001, "model": {"arch": "cnn", "layers": {"hidden": 128}}, "seeds": [1, 2]})))
    frames.append((Kind.META, Meta("metric", "train", {"description": "training loss"})))
    for i in range(2500):
        frames.append((Kind.METRIC, Metric("train", [{"loss": 1.0 / (i + 1), "step": i, "_ts": 1000.0 + i}])))
    for i in range(30):
        frames.append((Kind.METRIC, Metric("train/loss", [{"v": i, "_ts": 2000.0 + i}])))
    frames.append((Kind.METRIC, Metric(None, [{"epoch": 1, "_ts": 3000.0}])))
    frames.append((Kind.METRIC, Metric("nan", [{"v": float("nan"), "w": float("inf"), "_ts": 3001.0}])))
    frames.append((Kind.METRIC, Metric("session/loss", [{"v": 0.5, "_ts": 3002.0}], "tracks")))
    for i in range(250):
        frames.append((Kind.LOG, Log(f"line {i}", "info", 1_700_000_000.0 + i, {"i": i} if i % 2 else None)))
    rig.send(7, prefix, frames)
    for start in range(0, 2500, 500):
        rig.send(7, prefix, [f for i in range(start, start + 500) for f in (
            (Kind.TRACK, Track("robot/state", i * 0.01, {"q": [0.1, 0.2], "pose": {"x": i}})),
            (Kind.TRACK, Track("robot/state", i * 0.01, {"dq": [1.0, -1.0]})))])
    rig.send(7, prefix, [(Kind.RUN_CLOSE, RunClose("completed", None, 0))])
    wait_until(lambda: finished(server, prefix), 30, "run marked on the server")
    e = exp_of(server, prefix)

    calls = [(r.method, r.path, r.body) for r in server.requests]
    assert [c[:2] for c in calls[:5]] == [("POST", "/graphql")] + [("POST", "/api/namespaces/alice/nodes")] * 4
    assert [c[2]["type"] for c in calls[1:5]] == ["PROJECT", "FOLDER", "FOLDER", "EXPERIMENT"]
    assert calls[4][2]["description"] == "a run" and calls[4][2]["tags"] == ["t1"] and "dash_token" not in calls[4][2]
    assert calls[-1][:2] == ("PATCH", f"/api/nodes/{e.node}") and calls[-1][2] == {"status": "COMPLETED"}
    assert e.status == "COMPLETED"
    writes = [r for r in server.requests if r.method in ("POST", "PATCH") and r.path != "/graphql"]
    assert all(r.headers.get("idempotency-key", "").startswith("dashcar-") for r in writes)
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in server.requests)

    assert e.params == {"lr": 0.001, "model.arch": "cnn", "model.layers.hidden": 128, "seeds": [1, 2]}
    assert [p["step"] for p in e.metrics["train"]] == list(range(2500)), "every point once, in order"
    assert e.metric_meta["train"] == {"description": "training loss"}
    assert [p["v"] for p in e.metrics["train/loss"]] == list(range(30)), "a name with / arrives encoded"
    assert e.metrics[UNNAMED_METRIC] == [{"epoch": 1, "_ts": 3000.0}] and "None" not in e.metrics
    assert e.metrics["nan"] == [{"v": None, "w": None, "_ts": 3001.0}], "NaN and Inf are sent as null"
    assert e.metrics["session/loss"] == [{"v": 0.5, "_ts": 3002.0}], "a DreamLake index-based track goes as a metric"
    rows = e.tracks["robot/state"]
    assert [r["timestamp"] for r in rows] == [i * 0.01 for i in range(2500)], "one merged row per timestamp, in order"
    assert rows[3] == {"timestamp": 0.03, "q": [0.1, 0.2], "pose.x": 3, "dq": [1.0, -1.0]}
    assert [line["message"] for line in e.logs] == [f"line {i}" for i in range(250)]
    assert e.logs[1] == {"timestamp": "2023-11-14T22:13:21Z", "level": "info", "message": "line 1", "metadata": {"i": 1}}
    assert "metadata" not in e.logs[0]

    sizes = {"logs": [len(r.body["logs"]) for r in server.calls("POST", "/logs$")],
             "metric": [len(r.body["dataPoints"]) for r in server.calls("POST", "/metrics/train/append-batch$")],
             "track": [len(r.body["entries"]) for r in server.calls("POST", "/append_batch$")]}
    assert max(sizes["logs"]) <= 100 and max(sizes["metric"]) <= 1000 and max(sizes["track"]) <= 1000, sizes
    assert sum(sizes["logs"]) == 250 and sum(sizes["metric"]) == 2500 and sum(sizes["track"]) == 2500
    assert server.calls("POST", "/metrics/train%2Floss/append-batch$"), "the name is one encoded path segment"
    assert server.calls("POST", "/metrics/%28default%29/append-batch$") and server.calls("GET") == [], "no read-back needed"
    st = wait_until(lambda: (st := rig.status())["lag"]["frames"] == 0 and st, 10, "no lag left")
    assert st["remote"]["nonfinite_by_run"] == {rig.root + "/" + prefix: 2} and st["error"] is None
    assert TOKEN not in json.dumps(st)


FAULTS: list[tuple[str, str, dict[str, Any]]] = [
    ("/metrics/a/append-batch$", "store_then_fail", {}),
    ("/metrics/b/append-batch$", "empty", {}),
    ("/metrics/c/append-batch$", "store_then_reset", {}),
    ("/metrics/d/append-batch$", "stall", {"stall_s": 1.5}),
    ("/metrics/e/append-batch$", "status", {"status": 500}),
    ("/metrics/f/append-batch$", "reset", {}),
    ("/tracks/t1/append_batch$", "store_then_drop", {}),
    ("/tracks/t2/append_batch$", "store_then_fail", {"times": 2}),
    ("/tracks/t3/append_batch$", "stall", {"stall_s": 1.5}),
    ("/tracks/t4/append_batch$", "drop", {}),
    ("/logs$", "store_then_fail", {"method": "POST"}),
]


def test_every_kind_of_fault_ends_with_each_point_once(rigs: list[Rig], tmp_path: Path, server: FakeMlDash) -> None:
    """Each series gets its own fault, at once; ambiguous ones are read back before sending again."""
    rig = Rig(tmp_path)
    rigs.append(rig)
    faults = [server.fail(path, action, **kw) for path, action, kw in FAULTS]
    prefix = "alice/faults/run"
    frames = open_frames(server.url)
    for i in range(300):
        for m in "abcdefg":
            frames.append((Kind.METRIC, Metric(m, [{"i": i, "_ts": float(i)}])))
        for t in ("t1", "t2", "t3", "t4", "t5"):
            frames.append((Kind.TRACK, Track(t, float(i), {"i": i})))
        frames.append((Kind.LOG, Log(f"m{i}", "info", 1e9 + i, None)))
    rig.send(3, prefix, frames)
    rig.send(3, prefix, [(Kind.RUN_CLOSE, RunClose("completed", None, 0))])
    wait_until(lambda: finished(server, prefix), 45, "run marked on the server")
    e = exp_of(server, prefix)
    for m in "abcdefg":
        assert [p["i"] for p in e.metrics[m]] == list(range(300)), f"metric {m}: once, in order"
    for t in ("t1", "t2", "t3", "t4", "t5"):
        assert [r["i"] for r in e.tracks[t]] == list(range(300)), f"topic {t}: once, in order"
    assert [line["message"] for line in e.logs] == [f"m{i}" for i in range(300)]
    assert e.status == "COMPLETED"
    assert all(f.hits for f in faults), "every fault struck"
    assert server.requests[-1].method == "PATCH", "the status goes last"
    if not server.honour_idempotency:
        assert server.calls("GET", "/metrics/a/stats$") and server.calls("GET", "/tracks/t1/data$"), "read back first"
        assert rig.status()["remote"]["counters"]["not_resent"] > 0
    assert rig.dead_letters() == []


def test_retry_after_is_honoured_whatever_its_size_and_holds_back_only_its_series(rigs: list[Rig], tmp_path: Path,
                                                                                   server: FakeMlDash) -> None:
    rig = Rig(tmp_path)
    rigs.append(rig)
    server.fail("/metrics/slow/append-batch$", "status", status=429, retry_after="2")
    server.fail("/metrics/later/append-batch$", "status", status=503, retry_after="3600")
    prefix = "alice/ra/run"
    frames = open_frames(server.url)
    for i in range(50):
        frames += [(Kind.METRIC, Metric(m, [{"i": i, "_ts": float(i)}])) for m in ("slow", "later", "fast")]
    rig.send(1, prefix, frames)
    wait_until(lambda: points(server, prefix, "slow") == 50, 20, "the 429 series after its wait")
    slow = server.calls("POST", "/metrics/slow/append-batch$")
    assert slow[1].t - slow[0].t >= 1.9, "Retry-After 2 s is longer than dash_retry_max_s, and honoured"
    e = exp_of(server, prefix)
    assert [p["i"] for p in e.metrics["fast"]] == list(range(50)), "other series never waited"
    assert len(server.calls("POST", "/metrics/later/append-batch$")) == 1, "an hour's Retry-After is not cut short"
    st = rig.status()
    assert st["retry"] is not None and 3500 < st["retry"]["next_in_s"] <= 3600
    assert "later" in st["error"] and "503" in st["error"]
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 - 60) == pytest.approx(60)
    assert retry_after_s("soon") == 0.0


def test_a_refused_series_is_dead_lettered_while_the_others_go_on(rigs: list[Rig], tmp_path: Path,
                                                                   server: FakeMlDash) -> None:
    rig = Rig(tmp_path)
    rigs.append(rig)
    server.fail("/metrics/bad/append-batch$", "status", status=400, times=-1)
    prefix = "alice/refused/run"
    frames = open_frames(server.url)
    for i in range(1500):
        frames += [(Kind.METRIC, Metric(m, [{"i": i, "_ts": float(i)}])) for m in ("bad", "good")]
        frames.append((Kind.TRACK, Track("arm", float(i), {"i": i})))
    frames.append((Kind.RUN_CLOSE, RunClose("completed", None, 0)))
    rig.send(2, prefix, frames)
    wait_until(lambda: finished(server, prefix), 30, "run marked on the server")
    e = exp_of(server, prefix)
    assert [p["i"] for p in e.metrics["good"]] == list(range(1500)) and len(e.tracks["arm"]) == 1500
    assert "bad" not in e.metrics
    dead = rig.dead_letters()
    assert sum(len(d["item"]["points"]) for d in dead) == 1500, "every refused point is in a dead letter"
    assert [p["i"] for d in dead for p in d["item"]["points"]] == list(range(1500))
    assert all("HTTP 400" in d["reason"] and "/metrics/bad/append-batch" in d["reason"] for d in dead)
    st = rig.status()
    assert st["dead_letters_by_run"] == {rig.root + "/" + prefix: len(dead)}
    assert st["remote"]["counters"]["refused"] == 1500
    assert len(server.calls("POST", "/metrics/bad/append-batch$")) == 2, "each refused request is sent once"


def test_a_refused_token_parks_until_the_token_file_changes(rigs: list[Rig], tmp_path: Path, server: FakeMlDash,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("wrong-token\n")
    token_file.chmod(0o600)
    caplog.set_level(logging.DEBUG, logger="dashcar")
    rig = Rig(tmp_path, dash_url=server.url, dash_token_file=str(token_file))
    rigs.append(rig)
    prefix = "alice/parked/run"
    frames: list[tuple[Kind, Any]] = [(Kind.RUN_OPEN, RunOpen({"name": "run"}))]
    frames += [(Kind.METRIC, Metric("m", [{"i": i, "_ts": float(i)}])) for i in range(500)]
    rig.send(4, prefix, frames)
    wait_until(lambda: (rig.status()["error"] or "").startswith("parked"), 10, "the sink parked")
    time.sleep(1.5)
    assert len(server.requests) == 1 and server.requests[0].status == 401, "nothing more is tried with the same token"
    st = rig.status()
    assert "refused the token" in st["error"] and "HTTP 401" in st["error"] and st["lag"]["frames"] == 500
    token_file.write_text(TOKEN + "\n")
    rig.send(4, prefix, [(Kind.RUN_CLOSE, RunClose("completed", None, 0))])
    wait_until(lambda: finished(server, prefix), 15, "the run shipped once the token was fixed")
    assert [p["i"] for p in exp_of(server, prefix).metrics["m"]] == list(range(500))
    text = caplog.text + json.dumps(rig.status()) + "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.jsonl"))
    assert "wrong-token" not in text and TOKEN not in text, "a token is never logged or shown"


def test_a_runs_newer_token_unparks_it(rigs: list[Rig], tmp_path: Path, server: FakeMlDash) -> None:
    rig = Rig(tmp_path)
    rigs.append(rig)
    prefix = "alice/newtoken/run"
    rig.send(5, prefix, [*open_frames(server.url, token="stale"), (Kind.METRIC, Metric("m", [{"i": 0, "_ts": 0.0}]))])
    wait_until(lambda: (rig.status()["error"] or "").startswith("parked"), 10, "the sink parked")
    rig.send(6, prefix, [*open_frames(server.url), (Kind.RUN_CLOSE, RunClose("completed", None, 0))])
    rig.send(5, prefix, [(Kind.RUN_CLOSE, RunClose("completed", None, 0))])
    wait_until(lambda: finished(server, prefix), 15, "the run shipped with the newer token")
    assert exp_of(server, prefix).metrics["m"] == [{"i": 0, "_ts": 0.0}]


def test_a_restarted_sink_resumes_without_creating_the_run_again(rigs: list[Rig], tmp_path: Path,
                                                                 server: FakeMlDash) -> None:
    rig = Rig(tmp_path)
    rigs.append(rig)
    prefix = "alice/resume/2026/run"
    rig.send(1, prefix, open_frames(server.url) + [(Kind.METRIC, Metric("m", [{"i": i, "_ts": 0.0}])) for i in range(10)])
    wait_until(lambda: points(server, prefix, "m") == 10, 10, "first part")
    rig.restart()
    rig.send(1, prefix, [(Kind.METRIC, Metric("m", [{"i": i, "_ts": 0.0}])) for i in range(10, 20)]
             + [(Kind.RUN_CLOSE, RunClose("completed", None, 0))])
    wait_until(lambda: finished(server, prefix), 15, "run marked")
    assert [p["i"] for p in exp_of(server, prefix).metrics["m"]] == list(range(20))
    assert len(server.calls("POST", "/nodes$")) == 3 and len(server.calls("POST", "/graphql")) == 1, "no second setup"


def test_a_run_reopened_after_it_ended_continues_on_the_same_experiment(rigs: list[Rig], tmp_path: Path,
                                                                        server: FakeMlDash) -> None:
    rig = Rig(tmp_path)
    rigs.append(rig)
    prefix = "alice/reopen/run"
    first = [(Kind.METRIC, Metric("m", [{"i": i, "_ts": 0.0}])) for i in range(10)]
    rig.send(1, prefix, [*open_frames(server.url), *first, (Kind.RUN_CLOSE, RunClose("completed", None, 0))])
    wait_until(lambda: finished(server, prefix) and not rig.sink.active, 10, "first part marked")
    second = [(Kind.METRIC, Metric("m", [{"i": i, "_ts": 0.0}])) for i in range(10, 20)]
    rig.send(2, prefix, [*open_frames(server.url), *second, (Kind.RUN_CLOSE, RunClose("failed", "boom", 0))])
    wait_until(lambda: (e := server.store.by_prefix(prefix)) is not None and e.status == "FAILED", 10, "second part marked")
    assert [p["i"] for p in exp_of(server, prefix).metrics["m"]] == list(range(20))
    assert len(server.store.experiments) == 1 and len(server.calls("PATCH")) == 2
    assert len(server.calls("POST", "/nodes$")) == 1, "the experiment's ids were kept"


def test_a_missing_namespace_dead_letters_the_run(rigs: list[Rig], tmp_path: Path, server: FakeMlDash) -> None:
    server.store.missing_namespaces.add("nobody")
    rig = Rig(tmp_path)
    rigs.append(rig)
    prefix = "nobody/proj/run"
    rig.send(1, prefix, open_frames(server.url) + [(Kind.METRIC, Metric("m", [{"i": i, "_ts": 0.0}])) for i in range(5)])
    wait_until(lambda: len(rig.dead_letters()) > 0, 10, "dead letters")
    assert "namespace 'nobody' not found" in rig.dead_letters()[0]["reason"]
    rig.send(1, prefix, [(Kind.METRIC, Metric("m", [{"i": 5, "_ts": 0.0}]))])
    wait_until(lambda: sum(len(d["item"]["points"]) for d in rig.dead_letters()) == 6, 10, "later points too")
    assert rig.status()["remote"]["refused_runs"] == {rig.root + "/" + prefix: "namespace 'nobody' not found on the server"}


def test_a_full_outbox_pushes_back_until_the_server_takes_it(rigs: list[Rig], tmp_path: Path, server: FakeMlDash) -> None:
    """A quarter of the WAL cap (here 1 MiB) is all the backlog the sink keeps; past it the runner backs off."""
    server.stop()
    rig = Rig(tmp_path, wal_max_bytes=4 << 20)
    rigs.append(rig)
    prefix = "alice/full/run"
    pad = "x" * 400
    rig.send(1, prefix, open_frames(server.url) + [(Kind.TRACK, Track("t", float(i), {"p": pad})) for i in range(3000)])
    wait_until(lambda: rig.sink.size >= rig.sink.max_bytes, 20, "the outbox filled")
    rig.send(1, prefix, [(Kind.TRACK, Track("t", 3000.0 + i, {"p": pad})) for i in range(300)])
    wait_until(lambda: "outbox full" in (rig.runner.error or ""), 20, "back-pressure")
    assert rig.runner.cursor < rig.core.out_seq, "the runner holds its cursor (the WAL's skip rule may take over)"
    server.start()
    rig.send(1, prefix, [(Kind.RUN_CLOSE, RunClose("completed", None, 0))])
    wait_until(lambda: finished(server, prefix), 60, "everything shipped once the server came back")
    assert [r["timestamp"] for r in exp_of(server, prefix).tracks["t"]] == [float(i) for i in range(3300)]


def test_encoding_and_prefixes() -> None:
    assert encode({"a": float("nan"), "b": [1.0, float("-inf")], "c": None}) == (b'{"a":null,"b":[1.0,null],"c":null}', 2)
    assert encode({"big": 2**70}) == (b'{"big": 1180591620717411303424}', 0)
    assert split_prefix("alice/robotics/2026/sweep-a/run-001") == ("alice", "robotics", ["2026", "sweep-a"], "run-001")
    assert split_prefix("alice/robotics/run") == ("alice", "robotics", [], "run")
    assert split_prefix("ws/name") == ("ws", "name", [], "name")
