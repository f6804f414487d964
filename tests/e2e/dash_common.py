"""Helpers of the tests that ship runs to a recording ML-Dash server."""

from __future__ import annotations

from typing import Any

from tests.conftest import AgentHandle
from tests.fakes.mldash_server import Experiment, FakeMlDash

TOKEN = "tok-e2e-" + "k" * 20
FAST = ("--merge-window-s", "0.2", "--dash-timeout-s", "2", "--dash-retry-max-s", "1")


def server(fakes: list[FakeMlDash], **kw: Any) -> FakeMlDash:
    """A recording server that takes ``TOKEN``, listening; stopped with the ``fakes`` fixture."""
    fake = FakeMlDash(tokens={TOKEN}, **kw).start()
    fakes.append(fake)
    return fake


def holding(fake: FakeMlDash, prefix: str, status: str = "COMPLETED") -> Experiment | None:
    """The server's experiment of ``prefix`` once it has that status."""
    e = fake.store.by_prefix(prefix)
    return e if e is not None and e.status == status else None


def flush_remote(agent: AgentHandle, timeout_s: float) -> bool:
    """``dashcar flush --remote``: True once every remote sink holds everything so far."""
    reply = agent.request({"op": "flush", "remote": True, "timeout_s": timeout_s}, timeout_s + 2)
    return bool(reply and reply["ok"])
