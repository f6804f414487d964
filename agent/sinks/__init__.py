"""Sinks: where the settled stream goes. A sink is small; ``runner`` drives every one alike.

A sink gets whole stream batches (``dashcar.agent.stream``) in order, delivers them, and stages
whatever state it needs in its own namespace of the state environment; the runner commits
that state together with the sink's cursor, so a sink that writes idempotently (or truncates
what was not committed, as the JSONL sink does) delivers each item exactly once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, Protocol

from ..errors import SinkError

if TYPE_CHECKING:
    from ..config import AgentConfig
    from ..stream import Batch, Item
    from ..wal import SinkState

WhenFull = Literal["block", "skip"]
"""What a sink that lags behind does when the WAL nears its cap: hold the WAL (``block``;
ingest then drops and counts) or let its cursor jump ahead (``skip``; counted per run)."""

REGISTRY: Final = {
    "jsonl": "dashcar.agent.sinks.jsonl:JsonlSink",
    "dash": "dashcar.agent.sinks.dash:DashSink",
    "archive": "dashcar.agent.sinks.archive:ArchiveSink",
}
"""Sink names and where their class lives; a ``module:Class`` spec works for any other sink."""


class Rejected(NamedTuple):
    """Items a sink refused for good (a dead letter), with the reason."""

    reason: str
    items: list[Item]


class Sink(Protocol):
    """What the runner needs of a sink.

    Optional, read with ``getattr``: ``hold_frames``/``hold_s``, ``max_frames`` and ``pending()``
    (see ``runner``); and for a sink that keeps an outbox of its own past its cursor,
    ``delivered()`` (the last stream batch the other side holds all of: ``flush --remote`` waits
    for it) and ``backlog()`` (frames, bytes and the oldest time it holds, added to its lag).
    """

    name: str
    when_full: WhenFull
    barrier: bool
    """Producer flush barriers (and ``read()``) wait for this sink: local files only."""

    def open(self, state: SinkState) -> None:
        """(Re)load committed state and repair what a crash left; before the first batch and after a failure."""

    def send(self, batches: list[Batch], state: SinkState) -> list[Rejected]:
        """Deliver every item of ``batches`` (staging state in ``state``) and return what was refused.

        :raises SinkRetryable: nothing was delivered for sure; the runner backs off and sends again.
        :raises SinkRejected: the whole of ``batches`` can never be delivered; it is dead-lettered.
        """

    def committed(self, batches: list[Batch]) -> None:
        """The runner committed the state of ``batches``: finish what must follow the commit."""

    def close(self) -> None:
        """Release connections and files."""

    def status(self) -> dict[str, Any]:
        """The sink's own figures for ``dashcar status``."""


def load(spec: str, cfg: AgentConfig) -> Sink:
    """Build the sink named ``spec`` (a ``REGISTRY`` name or ``module:Class``) from the agent config."""
    target = REGISTRY.get(spec, spec)
    module, _, attr = target.partition(":")
    if not attr:
        raise SinkError(f"unknown sink {spec!r}: use one of {sorted(REGISTRY)} or module:Class")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise SinkError(f"cannot load sink {spec!r}: {exc}") from exc
    sink: Sink = cls(cfg)
    return sink
