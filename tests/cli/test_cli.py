"""The ``dashcar`` command: every subcommand sees the global flags, and its exit code says what happened."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from dashcar import _agent
from dashcar.cli import NO_AGENT, OK, main
from tests.conftest import AgentHandle, wait_until


def test_the_console_script_runs_the_cli() -> None:
    (script,) = entry_points(group="console_scripts", name="dashcar")
    assert script.value == "dashcar.cli:main"


def test_global_runtime_dir_reaches_the_agent_subcommand(dirs: Path) -> None:
    """Regression: ``dashcar --runtime-dir X agent`` failed with a KeyError instead of starting the agent."""
    rt, log = dirs / "rt", dirs / "agent.log"
    argv = ["--runtime-dir", str(rt), "agent", "--state-dir", str(dirs / "state")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dashcar.cli", *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        wait_until(lambda: proc.poll() is not None or _agent.request(rt, {"op": "ping"}, 0.2), 20, "agent up")
        assert proc.poll() is None, log.read_text()
        assert main(["--runtime-dir", str(rt), "stop"]) == OK
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_status_flush_and_demo_talk_to_the_agent_in_runtime_dir(
    agent: AgentHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    assert agent.proc is not None
    rt = str(agent.runtime_dir)
    assert main(["--runtime-dir", rt, "status"]) == OK
    assert capsys.readouterr().out.startswith(f"agent pid {agent.proc.pid} ")
    assert main(["--runtime-dir", rt, "status", "--json"]) == OK
    assert json.loads(capsys.readouterr().out)["pid"] == agent.proc.pid
    demo = ["demo", "--seconds", "0.2", "--dash-root", str(agent.data_dir), "--prefix", "a/cli/demo"]
    assert main(["--runtime-dir", rt, *demo]) == OK
    assert "200 track appends at 1000 Hz, 200 rows on disk" in capsys.readouterr().out
    assert (agent.data_dir / "a" / "cli" / "demo" / "tracks" / "robot_state" / "data.jsonl").exists()
    assert main(["--runtime-dir", rt, "flush"]) == OK


def test_no_agent_is_exit_code_2_with_a_message(dirs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--runtime-dir", str(dirs / "nobody"), "status"]) == NO_AGENT
    assert capsys.readouterr().err == f"dashcar: no agent answers at {dirs / 'nobody'}\n"


def test_unknown_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["status", "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
