"""The agent's branches of dashcar's error tree (see ``dashcar.proto`` for the root)."""

from __future__ import annotations

from dashcar.proto import DashcarError


class WALError(DashcarError):
    """The write-ahead buffer cannot take or give records."""


class WALFull(WALError):
    """The WAL reached its configured size cap; new frames are dropped and counted until space returns."""


class WALCorrupt(WALError):
    """The WAL or its sink state is unreadable; the agent refuses to start rather than guess."""


class SinkError(DashcarError):
    """A sink could not take a batch."""


class SinkRetryable(SinkError):
    """The batch may succeed later (disk full, network down); the runner backs off and retries.

    ``retry_after_s`` is the least wait the other side asked for (HTTP ``Retry-After``).
    """

    def __init__(self, message: str, *, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SinkRejected(SinkError):
    """The batch can never succeed; it is dead-lettered and the runner moves on."""
