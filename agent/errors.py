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
    """The batch may succeed later (disk full, network down); the shipper backs off and retries."""


class SinkRejected(SinkError):
    """The batch can never succeed; it is dead-lettered and the shipper moves on."""
