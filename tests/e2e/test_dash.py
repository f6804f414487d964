"""Runs shipped to an ML-Dash server by the real agent: an outage, agent SIGKILLs, tokens, remote-only runs.

The server is the recording ML-Dash server of ``tests/fakes`` on 127.0.0.1 in the test
process; the agent and the training scripts are real processes. Assertions are on what the
server holds (every point once, in order per series), on the local files, and on the
training script's own output, which must stay clean whatever the network does.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AgentHandle, read_json, read_jsonl, run_producer, wait_until
from tests.e2e.dash_common import FAST, TOKEN, flush_remote, holding, server
from tests.fakes.mldash_server import FakeMlDash


def remote(agent: AgentHandle) -> dict[str, Any]:
    dash: dict[str, Any] = agent.status()["sinks"]["dash"]
    return dash


def test_a_30s_outage_mid_run_costs_local_files_nothing_and_the_restarted_server_gets_every_point_once(
    agent_factory: Any, producers: Any, fakes: list[FakeMlDash]
) -> None:
    """The server stops (every connection cut) for 30 s while the run logs, then starts again on the same port.

    The 30 s are the issue's: past ML-Dash 0.11's 30 s retry horizon. The server ignores
    ``Idempotency-Key``, so requests cut by the stop are read back before they are sent again."""
    fake = server(fakes, honour_idempotency=False)
    agent: AgentHandle = agent_factory(*FAST).start()
    env = {**agent.env(), "DASHCAR_DASH_TOKEN": TOKEN}
    prefix = "alice/outage/run"
    proc = producers(
        f"""
        import sys, time, dashcar
        exp = dashcar.Experiment(prefix={prefix!r}, dash_url={fake.url!r}, dash_root={str(agent.data_dir)!r}, echo_logs=False)
        exp.start()
        exp.params.set(lr=0.1, arch="mlp")
        t0 = time.time()
        i = 0
        while time.time() - t0 < 37:
            for _ in range(50):
                exp.tracks("arm/state").append(q=[i, i + 1], _ts=i * 0.001)
                exp.metrics("train").log(step=i, loss=1.0 / (i + 1))
                if i % 10 == 0:
                    exp.log(f"step {{i}}", metadata={{"i": i}})
                i += 1
            time.sleep(0.05)
            if i == 2000:
                print("running", flush=True)
        exp.complete()
        print("done", i, flush=True)
        """,
        env,
    )
    assert proc.stdout.readline() == "running\n"
    wait_until(lambda: (e := fake.store.by_prefix(prefix)) is not None and e.metrics.get("train"), 10, "shipping started")
    fake.stop()
    st0 = agent.status()
    time.sleep(15)
    mid = remote(agent)
    assert "unreachable" in (mid["error"] or "") and mid["retry"] is not None, "status says the server is down"
    assert mid["lag"]["frames"] > 0 and mid["remote"]["servers"][fake.url]["reachable"] is False
    time.sleep(15)
    st1 = agent.status()
    fake.start()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == "" and out.startswith("done "), (out, err)
    n = int(out.split()[1])

    stored = st1["frames"]["stored"] - st0["frames"]["stored"]
    written = st1["frames"]["written"] - st0["frames"]["written"]
    assert stored > 20_000 and written >= 0.95 * stored, "JSONL kept up with what came in while the server was down"
    assert st1["sinks"]["jsonl"]["lag"]["frames"] < 5_000, "and had nothing to catch up on"
    run = agent.data_dir / prefix
    wait_until(lambda: (read_json(run / "experiment.json") or {}).get("status") == "completed", 20, "run written")
    assert [r["q"][0] for r in read_jsonl(run / "tracks" / "arm_state" / "data.jsonl")] == list(range(n)), "JSONL complete"

    e = wait_until(lambda: holding(fake, prefix), 90, "the server got the run after the outage")
    assert [p["step"] for p in e.metrics["train"]] == list(range(n)), "every point once, in order"
    assert [r["q"][0] for r in e.tracks["arm/state"]] == list(range(n))
    assert [line["metadata"]["i"] for line in e.logs] == list(range(0, n, 10))
    assert e.params == {"lr": 0.1, "arch": "mlp"}
    assert flush_remote(agent, 10)
    assert remote(agent)["lag"]["frames"] == 0 and remote(agent)["error"] is None


@pytest.mark.parametrize("honour", [True, False], ids=["key-honoured", "key-ignored"])
def test_three_agent_sigkills_mid_upload_leave_every_point_once_on_the_server(
    agent_factory: Any, fakes: list[FakeMlDash], honour: bool
) -> None:
    """Every write stalls 0.4 s on the server and is stored after: each kill lands while uploads are in flight,
    and the server stores them after the agent died (acknowledged to nobody)."""
    fake = server(fakes, honour_idempotency=honour)
    stall = fake.fail(r"(append-batch|append_batch|/logs)$", "stall", method="POST", stall_s=0.4, times=-1)
    agent: AgentHandle = agent_factory(*FAST, "--dash-timeout-s", "1").start()
    env = {**agent.env(), "DASHCAR_DASH_TOKEN": TOKEN}
    prefix = "alice/kills/2026/run"
    run_producer(
        f"""
        import dashcar
        with dashcar.Experiment(prefix={prefix!r}, dash_url={fake.url!r}, dash_root={str(agent.data_dir)!r},
                                echo_logs=False).run as exp:
            for i in range(6000):
                exp.metrics("a").log(i=i)
                exp.metrics("b").log(i=i)
                exp.tracks("t").append(i=i, _ts=i * 0.01)
                if i % 4 == 0:
                    exp.log(f"line {{i}}")
        """,
        env,
    )
    for life in range(3):
        wanted = stall.hits + 3
        wait_until(lambda n=wanted: fake.stalled > 0 and stall.hits >= n, 20, f"uploads in flight (life {life})")
        agent.kill()
        agent.start()
    stall.times = 0
    e = wait_until(lambda: holding(fake, prefix), 60, "the run complete on the server")
    assert [p["i"] for p in e.metrics["a"]] == list(range(6000)), "every point once, in order"
    assert [p["i"] for p in e.metrics["b"]] == list(range(6000))
    assert [r["i"] for r in e.tracks["t"]] == list(range(6000))
    assert [line["message"] for line in e.logs] == [f"line {i}" for i in range(0, 6000, 4)]
    assert len(fake.calls("POST", "/nodes$")) >= 3 and len({r.body["name"] for r in fake.calls("POST", "/nodes$")}) == 3
    assert len(fake.store.experiments) == 1, "the run was created once"
    if not honour:
        assert fake.calls("GET"), "the restarted agent read back what the server held"
    run = agent.data_dir / prefix
    assert [r["i"] for r in read_jsonl(run / "tracks" / "t" / "data.jsonl")] == list(range(6000))


def test_a_wrong_agent_token_parks_the_sink_until_the_file_is_fixed_and_no_token_is_ever_shown(
    agent_factory: Any, fakes: list[FakeMlDash], dirs: Path
) -> None:
    fake = server(fakes)
    token_file = dirs / "dash-token"
    token_file.write_text("not-the-token\n")
    token_file.chmod(0o600)
    agent: AgentHandle = agent_factory(*FAST, "--dash-url", fake.url, "--dash-token-file", str(token_file)).start()
    prefix = "alice/agentwide/run"
    res = run_producer(
        f"""
        import dashcar
        with dashcar.Experiment(prefix={prefix!r}, dash_root={str(agent.data_dir)!r}, echo_logs=False).run as exp:
            for i in range(3000):
                exp.metrics("m").log(i=i)
            exp.log("done")
        """,
        agent.env(),
    )
    assert res.stdout == "" and res.stderr == ""
    st = wait_until(lambda: (s := remote(agent))["error"] and "parked" in s["error"] and s, 15, "parked")
    assert "HTTP 401" in st["error"] and st["lag"]["frames"] > 0
    assert not flush_remote(agent, 1.0), "flush --remote does not pretend"
    token_file.write_text(TOKEN + "\n")
    e = wait_until(lambda: holding(fake, prefix), 20, "shipped with the fixed token")
    assert [p["i"] for p in e.metrics["m"]] == list(range(3000))
    assert flush_remote(agent, 10)
    agent.stop()
    shown = agent.log() + json.dumps(st)
    for p in [*agent.data_dir.rglob("*"), *(agent.state_dir / "deadletter").rglob("*")]:
        if p.is_file():
            shown += p.read_text(errors="replace")
    assert "not-the-token" not in shown and TOKEN not in shown


def test_a_remote_only_run_keeps_no_files_ships_everything_and_keeps_its_token_in_0600_state(
    agent_factory: Any, fakes: list[FakeMlDash], dirs: Path
) -> None:
    fake = server(fakes)
    agent: AgentHandle = agent_factory(*FAST).start()
    cwd = dirs / "work"
    cwd.mkdir()
    prefix = "alice/remote-only/run"
    res = run_producer(
        f"""
        import dashcar
        exp = dashcar.Experiment(prefix={prefix!r}, dash_url=True, dash_root=None, echo_logs=False)
        assert exp.dash_root is None and exp.dash_url == {fake.url!r}
        with exp.run:
            exp.params.set(batch=32)
            for i in range(500):
                exp.metrics("loss").log(v=1.0 / (i + 1))
                exp.tracks("cam").append(frame=i, _ts=i / 30)
            try:
                exp.tracks("cam").read()
            except dashcar.ConfigError as e:
                print("read:", e)
        """,
        {**agent.env(), "ML_DASH_API_URL": fake.url, "DASHCAR_DASH_TOKEN": TOKEN},
        cwd=cwd,
    )
    assert res.stderr == "" and res.stdout.startswith("read: run 'alice/remote-only/run' keeps no local files"), res.stdout
    assert flush_remote(agent, 15), "flush --remote returns once the server holds the run"
    e = holding(fake, prefix)
    assert e is not None and len(e.metrics["loss"]) == 500 and [r["frame"] for r in e.tracks["cam"]] == list(range(500))
    assert e.params == {"batch": 32}
    assert list(cwd.iterdir()) == [] and not agent.data_dir.exists(), "no local files at all"
    agent.stop()
    holders = [p for p in agent.state_dir.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert holders and all(p.parent.name in ("wal", "wal-state") for p in holders), holders
    for p in agent.state_dir.rglob("*.mdb"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert TOKEN not in agent.log()


SCRIPT = """
import os, sys
if sys.argv[1] == "ml_dash":
    from ml_dash import Experiment
    kw = {}
else:
    from dashcar import Experiment
    kw = {"echo_logs": False}
with Experiment(prefix="alice/robotics/2026/sweep-a/run-001", dash_url=os.environ["URL"], dash_root=None,
                readme="compare", tags=["a"], **kw).run as exp:
    exp.params.set(lr=0.001, model={"arch": "cnn", "layers": {"hidden": 128}}, seeds=[1, 2])
    for i in range(25):
        exp.metrics("train").log(loss=1.0 / (i + 1), step=i)
        exp.metrics("eval").log(acc=i / 25, step=i)
    exp.metrics.log(epoch=1, train=dict(loss=0.04), eval=dict(acc=0.96))
    for t in range(50):
        exp.tracks("robot/state").append(q=[0.1, t], _ts=t * 0.01)
        exp.tracks("robot/state").append(dq=[1.0, -1.0], _ts=t * 0.01)
        exp.tracks("camera/rgb").append(frame=t, _ts=t * 0.01)
    for i in range(5):
        exp.log(f"batch {i}", level="debug", metadata={"i": i})
"""


def _normal(fake: FakeMlDash) -> list[tuple[str, str, Any]]:
    """The server's requests with ids, times and the unnamed metric's name taken out."""
    exp = next(iter(fake.store.experiments.values()))
    ids = {exp.id: "E", exp.node: "N", **{v: "F" for v in fake.store.folders.values()},
           **{v: "P" for v in fake.store.projects.values()}}
    out = []
    for r in fake.requests:
        segs = [ids.get(seg, seg) for seg in r.path.split("/")]
        path = "/".join("(unnamed)" if seg in ("None", "%28default%29") else seg for seg in segs)
        body = json.loads(json.dumps(r.body), object_hook=lambda d: {
            k: ids.get(v, v) if isinstance(v, str) else v for k, v in d.items() if k != "_ts"
        })
        if isinstance(body, dict) and "logs" in body:
            body["logs"] = [{k: v for k, v in line.items() if k != "timestamp"} for line in body["logs"]]
        if isinstance(body, dict) and "query" in body:
            body["query"] = " ".join(body["query"].split())
        out.append((r.method, path, body))
    return out


def _series(calls: list[tuple[str, str, Any]]) -> dict[str, Any]:
    """What each data call sent, per series and in order, batches joined (their boundaries may differ)."""
    out: dict[str, Any] = {}
    for method, path, body in calls:
        key = f"{method} {path}"
        if "data" in body:
            out.setdefault(key, {}).update(body["data"])
        else:
            field = next(k for k in ("dataPoints", "entries", "logs") if k in body)
            out.setdefault(key, []).extend(body[field])
    return out


def test_the_same_script_through_ml_dash_and_through_dashcar_gives_the_server_the_same_calls(
    agent_factory: Any, fakes: list[FakeMlDash], dirs: Path
) -> None:
    """Deliberate differences: the unnamed metric's name, Idempotency-Key headers, and independent series
    going concurrently, batched as the data comes (the data calls are compared per series, in order)."""
    theirs, ours = server(fakes), server(fakes)
    config = dirs / "mldash-config"
    config.mkdir()
    (config / "tokens.json").write_text(json.dumps({"ml-dash-token": TOKEN}))
    env = {**os.environ, "ML_DASH_NO_VERSION_CHECK": "1", "ML_DASH_CONFIG_DIR": str(config), "ML_DASH_FLUSH_INTERVAL": "60"}
    script = dirs / "script.py"
    script.write_text(SCRIPT)
    import subprocess
    import sys

    ref = subprocess.run([sys.executable, str(script), "ml_dash"], env={**env, "URL": theirs.url}, capture_output=True,
                         text=True, timeout=60, cwd=dirs)
    assert ref.returncode == 0, ref.stderr
    agent: AgentHandle = agent_factory(*FAST).start()
    res = subprocess.run([sys.executable, str(script), "dashcar"], env={**agent.env(), **env, "URL": ours.url},
                         capture_output=True, text=True, timeout=60, cwd=dirs)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res
    assert flush_remote(agent, 15)
    a, b = _normal(theirs), _normal(ours)
    setup = 5
    assert a[:setup] == b[:setup], "GetProject, PROJECT, FOLDER, FOLDER, EXPERIMENT: same calls, same bodies"
    assert a[-1] == b[-1] == ("PATCH", "/api/nodes/N", {"status": "COMPLETED"})

    assert _series(a[setup:-1]) == _series(b[setup:-1]), "per series: the same data, in the same order"
    assert all(r.headers.get("idempotency-key") for r in ours.requests[1:] if r.method != "GET")
    assert not any(r.headers.get("idempotency-key") for r in theirs.requests)
    assert theirs.calls("POST", "/metrics/None/append-batch$") and ours.calls("POST", "/metrics/%28default%29/append-batch$")
    assert not (dirs / ".dash").exists(), "remote only, both"
