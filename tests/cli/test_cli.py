"""The ``dashcar`` command through its installed entry point, against a real agent and a real run.

Every command runs as a subprocess of the console script pip installed (``<venv>/bin/dashcar``),
with the agent's private runtime and state dirs in its environment; the runs are written by
the SDK through that agent. Commands that only read files run on a copy of the run taken to
another directory with no agent running.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import msgpack
import pyarrow.parquet as pq
import pytest
import zmq

import dashcar
from dashcar import _read
from dashcar.agent.signals import TABLE
from dashcar.cli import FAILED, NO_AGENT, OK, TIMEOUT, UNHEALTHY, USAGE
from dashcar.cli._export import cell, tabular
from dashcar.cli._runs import Topic
from dashcar.proto import INGEST_SOCKET, PROTOCOL_VERSION, Kind
from tests.conftest import AgentHandle, wait_until

DASHCAR = str(Path(sys.executable).with_name("dashcar"))
REPO = Path(__file__).resolve().parents[2]
PREFIX = "alice/robotics/run1"
N = 50


def dc(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout_s: float = 60.0,
       ) -> subprocess.CompletedProcess[str]:
    """Run the installed ``dashcar`` with ``args``; its output and exit code."""
    return subprocess.run([DASHCAR, *args], env=env if env is not None else dict(os.environ), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


def make_run(agent: AgentHandle, prefix: str = PREFIX) -> Path:
    """A real run written by the SDK through ``agent``: a track, a metric, parameters and logs."""
    exp = dashcar.Experiment(prefix=prefix, dash_root=agent.data_dir, runtime_dir=agent.runtime_dir, echo_logs=False)
    with exp.run:
        exp.params.set(lr=0.1, robot={"name": "sim"})
        for i in range(N):
            exp.tracks("robot/state").append(q=[i, i + 1.5], gripper={"pos": i / 10}, tag=f"s{i}", _ts=i * 0.01)
            if i % 10 == 0:
                exp.metrics("train").log(step=i, loss=1 / (i + 1))
        exp.log("hello", metadata={"k": 1})
        exp.log("careful", level="warn")
    return exp.run_dir


def test_the_console_script_is_the_cli() -> None:
    (script,) = entry_points(group="console_scripts", name="dashcar")
    assert script.value == "dashcar.cli:main"
    assert Path(DASHCAR).exists(), "pip install -e . puts the dashcar script beside the interpreter"


COMMANDS = [
    [], ["agent"], ["status"], ["flush"], ["stop"], ["ls"], ["tail"], ["export"], ["plot"], ["doctor"], ["config"],
    ["config", "show"], ["service"], ["service", "install"], ["service", "uninstall"], ["demo"],
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "dashcar")
def test_every_command_has_help_with_an_example(cmd: list[str]) -> None:
    res = dc(*cmd, "--help")
    assert res.returncode == OK, res.stderr
    assert "example" in res.stdout and "dashcar" in res.stdout.split("example", 1)[1], res.stdout
    if not cmd:
        assert "exit codes" in res.stdout and "NO_AGENT" in res.stdout


def test_bad_arguments_are_usage_errors_in_one_line() -> None:
    res = dc("status", "--bogus")
    assert res.returncode == USAGE and "unrecognized arguments: --bogus" in res.stderr
    res = dc("export", "x", "--format", "xml", "--out", "f")
    assert res.returncode == USAGE and "invalid choice" in res.stderr


def test_agent_command_takes_the_global_runtime_dir(dirs: Path) -> None:
    """Regression: ``dashcar --runtime-dir X agent`` failed with a KeyError instead of starting the agent."""
    rt, log = dirs / "rt", dirs / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([DASHCAR, "--runtime-dir", str(rt), "agent", "--state-dir", str(dirs / "state")],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        from dashcar import _agent

        wait_until(lambda: proc.poll() is not None or _agent.request(rt, {"op": "ping"}, 0.2), 20, "agent up")
        assert proc.poll() is None, log.read_text()
        res = dc("--runtime-dir", str(rt), "stop")
        assert res.returncode == OK, res.stderr
        assert f"agent pid {proc.pid} stopped" in res.stderr
        assert proc.wait(20) == 0
        again = dc("stop", "--runtime-dir", str(rt))
        assert again.returncode == NO_AGENT and again.stderr.count("\n") == 1 and "no agent answers" in again.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _send_bad_frames(agent: AgentHandle, n: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(f"ipc://{agent.runtime_dir / INGEST_SOCKET}")
    for i in range(n):
        sock.send(msgpack.packb([PROTOCOL_VERSION + 1, Kind.FLUSH, 1, 2, str(agent.data_dir), "a/b", i + 1, [0]]))
    sock.close()
    ctx.term()


def test_status_shows_the_agent_and_its_exit_code_says_when_it_loses_data(agent: AgentHandle, dirs: Path) -> None:
    assert agent.proc is not None
    make_run(agent)
    env = agent.env()
    res = dc("status", env=env)
    assert res.returncode == OK, res.stdout + res.stderr
    assert f"pid {agent.proc.pid}" in res.stdout and "healthy" in res.stdout and "jsonl" in res.stdout
    doc = json.loads(dc("status", "--json", env=env).stdout)
    assert doc["pid"] == agent.proc.pid and doc["health"] == {"ok": True, "losing_data": False, "problems": []}
    assert doc["frames"]["written"] == agent.status()["frames"]["written"] > N
    _send_bad_frames(agent, 3)
    wait_until(lambda: agent.status()["frames"]["rejected"] == 3, 10, "bad frames counted")
    res = dc("status", env=env)
    assert res.returncode == UNHEALTHY, res.stdout
    assert "LOSING DATA: lost 3 frames in the last 60 s (rejected 3)" in res.stdout
    assert "rejected: version" in res.stdout
    doc = json.loads(dc("status", "--json", env=env).stdout)
    assert doc["health"]["losing_data"] and doc["frames"]["rejected_by"] == {"version": 3}
    gone = dc("status", "--runtime-dir", str(dirs / "nobody"), env=env)
    assert gone.returncode == NO_AGENT and gone.stderr == (
        f"dashcar: no agent answers at {dirs / 'nobody'}; start one (dashcar agent, or systemctl --user start "
        "dashcar-agent) or pass --runtime-dir\n")


def test_status_watch_refreshes(agent: AgentHandle) -> None:
    res = dc("status", "--watch", "--interval", "0.1", "--count", "3", env=agent.env())
    assert res.returncode == OK, res.stderr
    assert res.stdout.count("dashcar agent pid") == 3


def test_status_json_is_the_counter_table(agent: AgentHandle) -> None:
    """Every signal of the table has its place in ``status --json`` (per sink for sink signals)."""
    make_run(agent)
    doc = json.loads(dc("status", "--json", env=agent.env()).stdout)
    for sig in TABLE:
        if sig.labels and sig.labels != ("sink",):
            continue  # labelled by reason: present once something was rejected or refused
        node: Any = doc
        for part in sig.path.format(sink="jsonl").split("."):
            assert part in node, f"{sig.name}: {sig.path} missing from status --json"
            node = node[part]
        assert isinstance(node, (int, float)), sig.name


def test_flush_waits_for_local_files_and_flush_remote_times_out_on_a_lagging_sink(
    agent_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    agent: AgentHandle = agent_factory("--merge-window-s", "5", "--sinks",
                                       "jsonl,tests.agent.lagging_sink:NeverCatchesUp").start()
    exp = dashcar.Experiment(prefix=PREFIX, dash_root=agent.data_dir, echo_logs=False).start()
    for i in range(20):
        exp.tracks("t").append(i=i, _ts=float(i))
    wait_until(lambda: agent.status()["frames"]["stored"] >= 21, 10, "frames stored")
    track = exp.run_dir / "tracks" / "t" / "data.jsonl"
    assert not track.exists(), "rows wait in the 5 s merge window"
    res = dc("flush", env=agent.env())
    assert res.returncode == OK, res.stderr
    assert len(track.read_text().splitlines()) == 20, "flush wrote every open row"
    res = dc("flush", "--remote", "--timeout", "1", env=agent.env())
    assert res.returncode == TIMEOUT, res.stderr
    assert res.stderr.startswith("dashcar: flush did not finish within 1 s: still waiting for lagging (")
    assert "frames behind, failing: send: the remote is down)" in res.stderr and res.stderr.count("\n") == 1
    exp.complete()


def test_ls_lists_runs_and_works_on_a_copied_root_without_an_agent(agent: AgentHandle, dirs: Path) -> None:
    make_run(agent)
    make_run(agent, "alice/robotics/run2")
    res = dc("ls", str(agent.data_dir), env=agent.env())
    assert res.returncode == OK, res.stderr
    assert PREFIX in res.stdout and "alice/robotics/run2" in res.stdout and "completed" in res.stdout
    assert agent.stop() == 0
    copy = dirs / "elsewhere"
    shutil.copytree(agent.data_dir, copy)
    runs = json.loads(dc("ls", str(copy), "--json", env=agent.env()).stdout)
    assert [r["prefix"] for r in runs] == [PREFIX, "alice/robotics/run2"]
    one = runs[0]
    assert (one["status"], one["rows"], one["points"], one["logs"], one["lost"], one["tracks"], one["metrics"]) == (
        "completed", N, N // 10, 2, 0, 1, 1)
    assert one["duration_s"] is not None and one["duration_s"] >= 0
    res = dc("ls", str(dirs / "missing"), env=agent.env())
    assert res.returncode == FAILED and "no data root" in res.stderr


def test_tail_prints_rows_as_they_are_written_and_rewritten_until_ctrl_c(agent: AgentHandle, producers: Any) -> None:
    proc = producers(
        f"""
        import sys, dashcar
        exp = dashcar.Experiment(prefix={PREFIX!r}, dash_root={str(agent.data_dir)!r}, echo_logs=False).start()
        for i in range(3):
            exp.tracks("robot/state").append(i=i, _ts=float(i))
        exp.flush()
        print("ready", flush=True)
        sys.stdin.readline()
        exp.tracks("robot/state").append(late="yes", _ts=1.0)   # merges into a written row: the file's tail is rewritten
        exp.tracks("robot/state").append(i=3, _ts=3.0)
        exp.flush()
        print("more", flush=True)
        sys.stdin.readline()
        exp.complete()
        """,
        agent.env(),
    )
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.poll() is not None else ""
    tail = subprocess.Popen([DASHCAR, "--root", str(agent.data_dir), "tail", PREFIX, "robot/state", "-n", "2"],
                            env=agent.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert tail.stdout is not None
        first = [json.loads(tail.stdout.readline()) for _ in range(2)]
        assert first == [{"timestamp": 1.0, "i": 1}, {"timestamp": 2.0, "i": 2}], "the last two rows first"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "more"
        again = [json.loads(tail.stdout.readline()) for _ in range(3)]
        assert again == [{"timestamp": 1.0, "i": 1, "late": "yes"}, {"timestamp": 2.0, "i": 2}, {"timestamp": 3.0, "i": 3}]
        tail.send_signal(signal.SIGINT)
        _, errors = tail.communicate(timeout=20)
        assert tail.returncode == OK, errors
    finally:
        if tail.poll() is None:
            tail.kill()
        tail.communicate(timeout=10)
        proc.stdin.write("done\n")
        proc.stdin.flush()
        proc.wait(30)
    res = dc("--root", str(agent.data_dir), "tail", PREFIX, "nope", env=agent.env())
    assert res.returncode == FAILED and "has no track, metric or logs named 'nope'; it has: robot/state" in res.stderr


def _json(doc: dict[str, Any] | bytes) -> dict[str, Any]:
    assert isinstance(doc, dict)
    return doc


@pytest.fixture
def copied_run(agent: AgentHandle, dirs: Path) -> Path:
    """A run written through a real agent, then copied elsewhere with the agent stopped."""
    run = make_run(agent)
    assert agent.stop() == 0
    copy = dirs / "copied" / "run1"
    shutil.copytree(run, copy)
    return copy


def test_export_rows_equal_what_read_returns(copied_run: Path, dirs: Path) -> None:
    run = copied_run
    track_rows = _json(_read.read_track(run, "robot/state"))["entries"]
    metric_rows = _read.read_series(run, "metrics", "train", 0, 10**6)["data"]
    logs = [json.loads(line) for line in (run / "logs" / "logs.jsonl").read_text().splitlines()]
    assert len(track_rows) == N and len(metric_rows) == N // 10 and len(logs) == 2
    for topic, rows in (("robot/state", track_rows), ("train", metric_rows), ("logs", logs)):
        kind = "track" if topic == "robot/state" else ("metric" if topic == "train" else "logs")
        flat = [tabular(Topic(kind, topic, Path()), r) for r in rows]  # type: ignore[arg-type]
        out = {fmt: dirs / f"{topic.replace('/', '_')}.{fmt}" for fmt in ("jsonl", "csv", "parquet")}
        for fmt, path in out.items():
            res = dc("export", str(run), "--topic", topic, "--format", fmt, "--out", str(path))
            assert res.returncode == OK, res.stderr
            assert f"exported {len(rows)} rows" in res.stderr
        assert [json.loads(line) for line in out["jsonl"].read_text().splitlines()] == rows
        table = list(csv.reader(io.StringIO(out["csv"].read_text())))
        header, body = table[0], table[1:]
        assert body == [[cell(r.get(c)) for c in header] for r in flat]
        back = pq.read_table(out["parquet"]).to_pylist()
        assert [{k: v for k, v in r.items() if v is not None} for r in back] == [
            {k: v for k, v in r.items() if v is not None} for r in flat]
    assert track_rows[3] == {"timestamp": 0.03, "q": [3, 4.5], "gripper.pos": 0.3, "tag": "s3"}
    assert pq.read_table(dirs / "robot_state.parquet").equals(pq.read_table(io.BytesIO(
        _read.read_track(run, "robot/state", format="parquet"))))  # type: ignore[arg-type]
    res = dc("export", str(run), "--topic", "train", "--format", "jsonl", "--out", "-")
    assert [json.loads(line) for line in res.stdout.splitlines()] == metric_rows
    res = dc("export", str(run), "--format", "csv", "--out", str(dirs / "x.csv"))
    assert res.returncode == FAILED and "--topic" in res.stderr
    with open(run / "metrics" / "train" / "data.jsonl", "ab") as f:
        f.write(b'{"index": 5, "data": {"loss"\n')
    res = dc("export", str(run), "--topic", "train", "--format", "jsonl", "--out", str(dirs / "x.jsonl"))
    assert res.returncode == FAILED and res.stderr.count("\n") == 1
    assert f"{run / 'metrics' / 'train' / 'data.jsonl'}:6 is not a JSON line" in res.stderr
    assert not (dirs / "x.jsonl").exists() and not (dirs / ".x.jsonl.part").exists(), "no half-written export is left"


def test_export_mcap_holds_every_track_metric_and_the_logs(copied_run: Path, dirs: Path) -> None:
    from mcap.reader import make_reader

    out = dirs / "run1.mcap"
    res = dc("export", str(copied_run), "--format", "mcap", "--out", str(out))
    assert res.returncode == OK, res.stderr
    with open(out, "rb") as f:
        reader = make_reader(f)
        summary = reader.get_summary()
        assert summary is not None
        channels = {c.topic: c for c in summary.channels.values()}
        assert set(channels) == {"/tracks/robot/state", "/metrics/train", "/logs"}
        for c in channels.values():
            schema = summary.schemas[c.schema_id]
            assert c.message_encoding == "json" and schema.encoding == "jsonschema"
            assert json.loads(schema.data)["type"] == "object"
        assert summary.schemas[channels["/logs"].schema_id].name == "foxglove.Log"
        got: dict[str, list[tuple[int, Any]]] = {}
        for _, channel, message in reader.iter_messages():
            got.setdefault(channel.topic, []).append((message.log_time, json.loads(message.data)))
        meta = {m.name: m.metadata for m in reader.iter_metadata()}
    rows = _json(_read.read_track(copied_run, "robot/state"))["entries"]
    assert got["/tracks/robot/state"] == [(round(r["timestamp"] * 1e9), _read.unflatten(r)) for r in rows]
    assert got["/tracks/robot/state"][3][1]["gripper"] == {"pos": 0.3}
    points = _read.read_series(copied_run, "metrics", "train", 0, 1000)["data"]
    assert [m for _, m in got["/metrics/train"]] == [
        {"index": p["index"], **p["data"], "createdAt": p["createdAt"]} for p in points]
    assert [t for t, _ in got["/metrics/train"]] == [round(p["data"]["_ts"] * 1e9) for p in points]
    assert [(m["message"], m["level"], m["name"]) for _, m in got["/logs"]] == [("hello", 2, PREFIX), ("careful", 3, PREFIX)]
    assert json.loads(meta["dashcar.run"]["dashcar"])["status"] == "completed" and meta["dashcar.parameters"]["lr"] == "0.1"


def test_plot_draws_a_png_and_says_what_is_missing(copied_run: Path, dirs: Path) -> None:
    out = dirs / "q.png"
    res = dc("plot", str(copied_run), "robot/state", "q", "gripper.pos", "--out", str(out))
    assert res.returncode == OK, res.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "plotted 3 series over 50 timestamp values" in res.stderr
    res = dc("plot", str(copied_run), "train", "loss", "--x", "step", "--out", str(dirs / "loss.png"))
    assert res.returncode == OK and (dirs / "loss.png").stat().st_size > 1000
    res = dc("plot", str(copied_run), "train", "nope", "--out", str(out))
    assert res.returncode == FAILED and "has no field 'nope'; its fields are _ts, createdAt, index, loss, step" in res.stderr
    fake = dirs / "no_matplotlib" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = dict(os.environ, PYTHONPATH=str(fake.parent))
    res = dc("plot", str(copied_run), "robot/state", "q", "--out", str(out), env=env)
    assert res.returncode == FAILED
    assert res.stderr == "dashcar: plot needs matplotlib, an optional extra: pip install 'dashcar[plot]'\n"


def test_doctor_checks_and_says_what_to_fix(agent: AgentHandle, dirs: Path) -> None:
    make_run(agent)
    env = agent.env()
    res = dc("doctor", env=env)
    assert res.returncode == OK, res.stdout
    checks = {c["check"]: c for c in json.loads(dc("doctor", "--json", env=env).stdout)}
    assert checks["agent"]["level"] == "ok" and checks["protocol"]["detail"].startswith("SDK 1.")
    assert checks["runtime dir"]["level"] == "ok" and checks["WAL"]["level"] == "ok"
    os.chmod(agent.runtime_dir, 0o777)
    try:
        res = dc("doctor", env=env)
        assert res.returncode == UNHEALTHY and f"chmod 700 {agent.runtime_dir}" in res.stdout
    finally:
        os.chmod(agent.runtime_dir, 0o700)
    assert agent.stop() == 0
    checks = {c["check"]: c for c in json.loads(dc("doctor", "--json", env=env).stdout)}
    assert checks["agent"]["level"] == "warn" and "no agent runs" in checks["agent"]["detail"]


def test_config_show_says_where_each_value_came_from(agent: AgentHandle, dirs: Path) -> None:
    toml = dirs / "agent.toml"
    toml.write_text("merge_window_s = 0.7\ndata_roots = ['/srv/a', '/srv/b']\n")
    env = dict(agent.env(), DASHCAR_NICE="2")
    rows = {r["name"]: r for r in json.loads(dc("config", "show", "--config", str(toml), "--sink-nice", "5", "--json",
                                                env=env).stdout)}
    assert (rows["merge_window_s"]["value"], rows["merge_window_s"]["source"]) == (0.7, "file")
    assert (rows["data_roots"]["value"], rows["data_roots"]["source"]) == ("/srv/a,/srv/b", "file")
    assert (rows["nice"]["value"], rows["nice"]["source"]) == (2, "env")
    assert (rows["sink_nice"]["value"], rows["sink_nice"]["source"]) == (5, "flag")
    assert (rows["wal_max_bytes"]["source"], rows["runtime_dir"]["source"]) == ("default", "env")
    assert rows["metrics_address"]["help"].startswith("Prometheus endpoint")
    res = dc("config", "show", env=env)
    assert res.returncode == OK and "merge_window_s" in res.stdout and "DASHCAR_<SETTING>" in res.stdout
    running = {r["name"]: r for r in json.loads(dc("config", "show", "--running", "--json", env=env).stdout)}
    assert (running["merge_window_s"]["value"], running["merge_window_s"]["source"]) == (0.2, "flag")
    bad = dc("config", "show", "--merge-window-s", "soon", env=env)
    assert bad.returncode == FAILED and "merge_window_s='soon' is not a valid float" in bad.stderr


def test_demo_writes_real_data_under_dot_dash(agent: AgentHandle, dirs: Path) -> None:
    work = dirs / "work"
    work.mkdir()
    res = dc("demo", "--seconds", "0.2", "--prefix", "me/dashcar-demo/run", env=agent.env(), cwd=work)
    assert res.returncode == OK, res.stdout + res.stderr
    assert "200 track appends at 1000 Hz, 200 rows on disk" in res.stdout
    assert len((work / ".dash" / "me" / "dashcar-demo" / "run" / "tracks" / "robot_state" / "data.jsonl")
               .read_text().splitlines()) == 200
