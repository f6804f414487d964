"""The handshake at run start: protocol versions, the data-root allow-list, and a shared agent.

A real agent and real producer processes. An SDK of another protocol major is emulated by a
producer that sets its protocol constants to 2 before it logs: its frames carry v=2 on the
wire and its hello says 2, exactly as an SDK of that major would.
"""

from __future__ import annotations

import grp
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from dashcar import _agent
from dashcar.proto import PROTOCOL_MINOR, PROTOCOL_VERSION
from tests.conftest import AgentHandle, read_jsonl, run_producer, wait_until

PRODUCER = """
import dashcar
from dashcar import _agent
from dashcar.proto import _frames
{patch}
exp = dashcar.Experiment(prefix="lab/handshake/run", dash_root={root!r}, echo_logs=False).start()
for i in range(10):
    exp.tracks("t").append(i=i, _ts=float(i))
reply = _agent.wait_hello(exp._runtime_dir, exp.dash_root)
print("hello:", reply)
{finish}
"""


def produce(agent: AgentHandle, root: Path, patch: str = "", finish: str = "exp.complete()") -> Any:
    code = PRODUCER.format(patch=patch, root=str(root), finish=finish)
    return run_producer(code, agent.env())


def test_an_sdk_of_another_major_is_told_in_its_log_and_counted(agent: AgentHandle) -> None:
    res = produce(agent, agent.data_dir, patch="_agent.PROTOCOL_VERSION = _frames.PROTOCOL_VERSION = 2", finish="")
    errors = [line for line in res.stderr.splitlines() if line.startswith("dashcar:")]
    assert errors == [
        f"dashcar: the agent at {agent.runtime_dir} speaks protocol {PROTOCOL_VERSION}.{PROTOCOL_MINOR} (dashcar 0.1.0), "
        f"this SDK speaks 2.{PROTOCOL_MINOR} (dashcar 0.1.0): its frames are refused; install one dashcar version for "
        "the SDK and the agent, then restart the agent (dashcar stop)"
    ]
    st = wait_until(lambda: (s := agent.status())["frames"]["rejected_by"].get("version", 0) >= 12 and s, 10, "refused")
    assert st["producers"]["refused_by"] == {"version": 1}
    assert st["frames"]["rejected_by"] == {"version": 12}, "the run open, ten track frames and the close at exit"
    assert st["frames"]["written"] == 0 and not (agent.data_dir / "lab").exists()
    assert "producer refused" in agent.log() and "reason=version sdk_protocol=2." in agent.log()


def test_a_minor_difference_works(agent: AgentHandle) -> None:
    res = produce(agent, agent.data_dir, patch=f"_agent.PROTOCOL_MINOR = {PROTOCOL_MINOR + 7}")
    assert f"hello: {{'ok': True, 'protocol': [{PROTOCOL_VERSION}, {PROTOCOL_MINOR}]" in res.stdout
    assert "dashcar:" not in res.stderr
    rows = read_jsonl(agent.data_dir / "lab" / "handshake" / "run" / "tracks" / "t" / "data.jsonl")
    assert [r["i"] for r in rows] == list(range(10))
    assert agent.status()["producers"]["refused_by"] == {}


def test_a_root_outside_the_allow_list_is_refused_with_a_clear_error(agent_factory: Any, dirs: Path) -> None:
    allowed = dirs / "allowed"
    agent: AgentHandle = agent_factory("--merge-window-s", "0.1", "--data-roots", f"{allowed},{dirs / 'also'}").start()
    other = dirs / "other"
    res = produce(agent, other, finish="")
    assert f"dashcar: the agent at {agent.runtime_dir} does not write under {other}: its data_roots are {allowed}, " \
           f"{dirs / 'also'}; pass dash_root= one of them (or a directory inside one)" in res.stderr
    st = wait_until(lambda: (s := agent.status())["frames"]["rejected_by"].get("root", 0) >= 12 and s, 10, "refused")
    assert st["producers"]["refused_by"] == {"root": 1} and st["frames"]["rejected_by"] == {"root": 12}
    assert st["data_roots"] == [str(allowed), str(dirs / "also")]
    assert not other.exists()
    res = produce(agent, allowed / "team")
    assert "'ok': True" in res.stdout and "dashcar:" not in res.stderr
    rows = read_jsonl(allowed / "team" / "lab" / "handshake" / "run" / "tracks" / "t" / "data.jsonl")
    assert [r["i"] for r in rows] == list(range(10))


def _mode(p: Path) -> tuple[int, int]:
    st = os.stat(p)
    return stat.S_IMODE(st.st_mode), st.st_gid


def _reachable_by_others(path: Path) -> bool:
    """True if every directory above ``path`` lets other users through (and so ``path`` may run)."""
    return all(os.stat(p).st_mode & 0o001 for p in path.parents) and bool(os.stat(path).st_mode & 0o001)


AS_ROOT = os.geteuid() == 0
GROUP = grp.getgrnam("nogroup").gr_gid if AS_ROOT else os.getgid()
NOBODY = 65534


def shared_agent(agent_factory: Any, dirs: Path) -> AgentHandle:
    """An agent whose sockets are for group ``GROUP`` and which writes only under ``dirs/shared``."""
    agent: AgentHandle = agent_factory("--merge-window-s", "0.1", "--socket-group", str(GROUP), "--data-roots",
                                       str(dirs / "shared")).start()
    wait_until(lambda: agent.status()["ingest_ready"], 20, "the ingest socket bound")
    return agent


def test_a_shared_agent_gives_its_sockets_lock_and_producer_dir_to_a_group(
    agent_factory: Any, producers: Any, dirs: Path
) -> None:
    agent = shared_agent(agent_factory, dirs)
    rt = agent.runtime_dir
    assert _mode(rt) == (0o750, GROUP)
    assert _mode(rt / "ingest.sock") == (0o660, GROUP) and _mode(rt / "control.sock") == (0o660, GROUP)
    assert _mode(rt / "agent.lock") == (0o640, GROUP) and _mode(rt / "producers") == (0o770, GROUP)
    assert agent.status()["socket_group"] == str(GROUP)
    proc = producers(
        f"""
        import sys, dashcar
        exp = dashcar.Experiment(prefix="me/shared/run", dash_root={str(dirs / "shared")!r}, echo_logs=False).start()
        exp.tracks("t").append(i=0, _ts=0.0)
        assert exp.flush()
        print("ready", flush=True)
        sys.stdin.readline()
        exp.complete()
        """,
        agent.env(),
    )
    assert proc.stdout.readline().strip() == "ready"
    (counter,) = (rt / "producers").iterdir()
    assert _mode(counter) == (0o640, GROUP), "the producer's counter file is readable by the shared agent's group"
    proc.stdin.write("done\n")
    proc.stdin.flush()
    assert proc.wait(30) == 0


@pytest.mark.skipif(not AS_ROOT or not _reachable_by_others(Path(sys.executable).resolve()),
                    reason="needs root, and an interpreter other users may run, to run a producer as another user")
def test_a_shared_agent_serves_a_producer_of_another_user(agent_factory: Any, dirs: Path) -> None:
    agent = shared_agent(agent_factory, dirs)
    shared = dirs / "shared"
    os.chmod(dirs, 0o711)
    code = textwrap.dedent(f"""
        import os, dashcar
        from dashcar import _agent
        assert os.getuid() == {NOBODY}
        exp = dashcar.Experiment(prefix="guest/shared/run", dash_root={str(shared)!r}, echo_logs=False)
        with exp.run:
            for i in range(20):
                exp.tracks("t").append(i=i, _ts=float(i))
            assert exp.flush(), "the shared agent acknowledges a barrier of another user"
        print("hello:", _agent.wait_hello(exp._runtime_dir, exp.dash_root))
    """)
    res = subprocess.run([sys.executable, "-c", code], env=dict(agent.env(), HOME="/nonexistent"), cwd="/",
                         user=NOBODY, group=GROUP, extra_groups=[GROUP], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "'ok': True" in res.stdout
    rows = read_jsonl(shared / "guest" / "shared" / "run" / "tracks" / "t" / "data.jsonl")
    assert [r["i"] for r in rows] == list(range(20))
    assert _agent.request(agent.runtime_dir, {"op": "ping"}, 2) is not None
