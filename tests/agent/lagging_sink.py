"""A real sink class for tests: a remote that is down for good, so it never catches up."""

from __future__ import annotations

from typing import Any

from dashcar.agent.config import AgentConfig
from dashcar.agent.errors import SinkRetryable
from dashcar.agent.sinks import Rejected, WhenFull
from dashcar.agent.stream import Batch
from dashcar.agent.wal import SinkState


class NeverCatchesUp:
    """Refuses every batch as a retryable error, as a remote in an endless outage does."""

    name = "lagging"
    when_full: WhenFull = "skip"
    barrier = False

    def __init__(self, cfg: AgentConfig) -> None:
        self.attempts = 0

    def open(self, state: SinkState) -> None:
        """Nothing to load."""

    def send(self, batches: list[Batch], state: SinkState) -> list[Rejected]:
        """Never delivers."""
        self.attempts += 1
        raise SinkRetryable("the remote is down")

    def committed(self, batches: list[Batch]) -> None:
        """Never called: nothing is ever sent."""

    def close(self) -> None:
        """Nothing to release."""

    def status(self) -> dict[str, Any]:
        """How often it was tried."""
        return {"attempts": self.attempts}
