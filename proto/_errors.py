"""Every exception dashcar raises on purpose, in one tree.

::

    DashcarError
    ├── ProtocolError ── DecodeError, UnsupportedVersion, FrameTooLarge,
    │                    InvalidName (a ValueError too)                    (proto)
    ├── ConfigError                                                        (sdk, agent)
    ├── WALError ── WALFull, WALCorrupt                                    (agent)
    └── SinkError ── SinkRetryable, SinkRejected                           (agent)

Errors are grouped by what the caller does next: a ``ProtocolError`` means the frame is
dropped and counted, an ``InvalidName`` is a bug in the caller's names, a ``ConfigError``
means fix the settings and start again.
"""

from __future__ import annotations


class DashcarError(Exception):
    """Root of every error dashcar raises on purpose."""


class ProtocolError(DashcarError):
    """A frame could not be accepted; the agent drops it and counts the reason."""

    reason = "protocol"


class DecodeError(ProtocolError):
    """The bytes are not a well-formed frame of this protocol."""

    reason = "malformed"


class UnsupportedVersion(ProtocolError):
    """The frame was written by a protocol major version this side does not speak."""

    reason = "version"


class FrameTooLarge(ProtocolError):
    """The frame is larger than ``MAX_FRAME_BYTES``."""

    reason = "oversized"


class InvalidName(ProtocolError, ValueError):
    """A prefix, topic or metric name would leave the run directory or is unusable as a path."""

    reason = "name"


class ConfigError(DashcarError):
    """A setting is missing, malformed or unsafe (for example a runtime dir owned by someone else)."""
