"""Finding the agent: absent agents cost nothing and count drops; auto-spawn brings exactly one up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from dashcar import _agent
from tests.conftest import AgentHandle, read_json, read_jsonl, wait_until


def test_agent_absent_calls_return_and_count_drops_then_later_frames_arrive(agent_factory: Any, producers: Any) -> None:
    agent: AgentHandle = agent_factory("--merge-window-s", "0.1")
    env = {**agent.env(), "DASHCAR_SNDHWM": "1000"}
    proc = producers(
        f"""
        import sys, dashcar
        from dashcar import _transport
        exp = dashcar.Experiment(prefix="a/b/absent", dash_root={str(agent.data_dir)!r}).start()
        for i in range(20000):
            exp.tracks("t").append(i=i, _ts=float(i))
        t = _transport.get_transport(exp._runtime_dir)
        print("dropped", t.dropped(), flush=True)
        assert sys.stdin.readline().strip() == "go"
        for i in range(20000, 20010):
            exp.tracks("t").append(i=i, _ts=float(i))
        exp.complete()
        print("done", flush=True)
        """,
        env,
    )
    line = proc.stdout.readline().split()
    assert line[0] == "dropped"
    dropped = int(line[1])
    assert 20000 - 2000 <= dropped < 20000, "the send queue holds about SNDHWM frames, the rest are dropped"
    agent.start()
    wait_until(lambda: agent.status()["frames"]["stored"] == 20001 - dropped, 20, "queued frames delivered")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "done"
    run = agent.data_dir / "a" / "b" / "absent"
    rows = read_jsonl(run / "tracks" / "t" / "data.jsonl")
    assert len(rows) == 20010 - dropped
    assert [r["i"] for r in rows[-10:]] == list(range(20000, 20010))
    counters = read_json(run / "experiment.json")["dashcar"]["counters"]
    assert counters["dropped_by_producer"] == dropped, "the agent knows what the producer could not send"
    assert agent.status()["frames"]["dropped_by_producers"] == dropped


@pytest.fixture
def spawn_env(dirs: Path) -> Any:
    """Environment for auto-spawn tests; stops whatever agent they spawned."""
    env = dict(os.environ)
    env.update(DASHCAR_RUNTIME_DIR=str(dirs / "rt"), DASHCAR_STATE_DIR=str(dirs / "state"), DASHCAR_AUTOSPAWN="1")
    yield env
    rd = dirs / "rt"
    if _agent.agent_running(rd):
        _agent.request(rd, {"op": "stop"}, 5.0)
        wait_until(lambda: not _agent.agent_running(rd), 20, "spawned agent stopped")


SPAWNER = """
    import sys, dashcar
    from dashcar import _agent
    exp = dashcar.Experiment(prefix="a/b/spawn" + sys.argv[1], dash_root=sys.argv[2])
    with exp.run:
        exp.tracks("t").append(x=int(sys.argv[1]), _ts=1.0)
    print(_agent.request(exp._runtime_dir, {"op": "ping"}, 5.0)["pid"])
"""


def test_autospawn_starts_one_detached_agent_for_ten_processes(spawn_env: dict[str, str], dirs: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(SPAWNER), str(i), str(dirs / "data")], env=spawn_env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(10)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 10, outs
    pids = {out.strip() for out, _ in outs}
    assert len(pids) == 1, "every process found the same agent"
    agents = [p for p in os.listdir("/proc") if p.isdigit() and _is_agent_for(p, dirs / "rt")]
    assert agents == [pids.pop()], "exactly one agent runs for the runtime dir"
    for i in range(10):
        assert read_jsonl(dirs / "data" / "a" / "b" / f"spawn{i}" / "tracks" / "t" / "data.jsonl") == [{"timestamp": 1.0, "x": i}]
    assert (dirs / "rt").stat().st_mode & 0o777 == 0o700


def _is_agent_for(pid: str, rd: Path) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"dashcar.agent" in cmd and str(rd).encode() in cmd


def test_autospawn_off_never_starts_an_agent(spawn_env: dict[str, str], dirs: Path) -> None:
    env = {**spawn_env, "DASHCAR_AUTOSPAWN": "0", "DASHCAR_LINGER_MS": "0"}
    code = (
        "import sys, dashcar\nexp = dashcar.Experiment(prefix='a/b/c', dash_root=sys.argv[1]).start()\n"
        "exp.tracks('t').append(x=1, _ts=1.0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(dirs / "data")], env=env, capture_output=True, timeout=60)
    assert res.returncode == 0
    assert not _agent.agent_running(dirs / "rt")


def test_runtime_dir_owned_by_someone_else_is_refused(dirs: Path) -> None:
    from dashcar import ConfigError
    from dashcar.proto import ensure_private_dir

    if os.getuid() != 0:
        pytest.skip("needs root to create a directory owned by another user")
    other = dirs / "other"
    other.mkdir()
    os.chown(other, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        ensure_private_dir(other)
