"""The agent in-process: ``service.serve`` reports the running agent through ``task_status``."""

from __future__ import annotations

import functools
from pathlib import Path

import anyio
import pytest

import dashcar
from dashcar.agent import config, service
from dashcar.proto import ensure_private_dir
from tests.conftest import read_jsonl

pytestmark = pytest.mark.anyio


async def test_serve_hands_the_running_agent_to_its_starter_and_stops_on_request(
    dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DASHCAR_AUTOSPAWN", "0")
    cfg = config.load({}, {"runtime_dir": str(dirs / "rt"), "state_dir": str(dirs / "state"), "merge_window_s": 0.05})
    ensure_private_dir(cfg.runtime_dir)
    ensure_private_dir(cfg.state_dir)

    def produce() -> Path:
        exp = dashcar.Experiment(prefix="inproc/a/run", dash_root=dirs / "data", runtime_dir=cfg.runtime_dir, echo_logs=False)
        with exp.run:
            for i in range(100):
                exp.tracks("t").append(i=i, _ts=float(i))
            assert exp.flush()
        return exp.run_dir

    async with anyio.create_task_group() as tg:
        agent = await tg.start(functools.partial(service.serve, cfg, handle_signals=False))
        assert agent.status()["pid"] > 0 and agent.ingest.ready.is_set(), "ready means ingest is listening"
        run = await anyio.to_thread.run_sync(produce)
        assert [r["i"] for r in read_jsonl(run / "tracks" / "t" / "data.jsonl")] == list(range(100))
        assert agent.status()["frames"]["written"] == 101
        agent.request_stop()
    assert agent.ingest.pid is not None
