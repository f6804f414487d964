"""The one place for every fact both sides of the wire must agree on."""

from __future__ import annotations

from typing import Final

PROTOCOL_VERSION: Final = 1
"""Major version of the frame format; a frame with another major is refused."""

PROTOCOL_MINOR: Final = 1
"""Minor version: additions both sides may ignore (1: the ``hello`` control request at run start).
Sides of one major and any minors work together."""

MAX_FRAME_BYTES: Final = 4 * 1024 * 1024
"""Largest frame the agent accepts and the SDK sends (a larger one is a caller error)."""

MAX_NAME_BYTES: Final = 255
"""Longest single path component a prefix, topic or metric name may produce."""

MAX_NAME_PARTS: Final = 32
"""Deepest nesting a prefix, topic or metric name may have."""

MAX_CONTAINER_LEN: Final = 1_000_000
"""Most elements one msgpack array or map in a frame may hold."""

INGEST_SOCKET: Final = "ingest.sock"
ACKS_SOCKET: Final = "acks.sock"
"""Where ingest publishes, per producer, what it has stored (topic: the producer id, 8 bytes)."""
HELLO_TOPIC: Final = b"hello"
"""Ingest's periodic announcement of its incarnation, so idle producers notice a restart."""
CONTROL_SOCKET: Final = "control.sock"
AGENT_LOCK: Final = "agent.lock"
SPAWN_LOCK: Final = "spawn.lock"

LOG_LEVELS: Final = ("debug", "info", "warn", "error", "fatal")
"""Log levels in ML-Dash order; ``warning`` and ``critical`` are accepted as aliases by the SDK."""

FILE_INLINE_MAX_BYTES: Final = 64 * 1024
"""Largest file content that travels inside its frame (read or serialised on the call); above it
the frame names a spool file or the caller's path and the agent copies the bytes. See
``docs/files.md`` for why 64 KiB, with the measurement."""
