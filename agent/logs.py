"""Logging for both agent processes: stderr, one line per event, journald-friendly.

When stderr is the journal's stream (``$JOURNAL_STREAM`` names stderr's device and inode, as
systemd sets it for a service), lines carry no timestamp (the journal adds its own) and start
with a ``<N>`` syslog priority, which journald turns into the entry's PRIORITY (so
``journalctl -p warning`` works). An auto-started agent that inherited ``$JOURNAL_STREAM``
from its producer but logs to ``agent.log`` keeps its timestamps. A traceback stays on the
event's line (newlines escaped), so one event is always one line.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Final, TextIO

PRIORITY: Final = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def to_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True if ``stream`` is the journal stream ``$JOURNAL_STREAM`` names (``device:inode``)."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return bool(value) and st.st_dev == int(dev) and st.st_ino == int(ino)
    except (OSError, ValueError, AttributeError):
        return False


class OneLine(logging.Formatter):
    """A formatter that keeps each event on one line; for the journal, with a ``<N>`` priority prefix."""

    def __init__(self, journal: bool) -> None:
        fmt = "%(levelname)s %(name)s %(message)s" if journal else "%(asctime)s %(levelname)s %(name)s %(message)s"
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line (newlines of the message and traceback escaped)."""
        text = super().format(record).replace("\r", "\\r").replace("\n", "\\n")
        if self.journal:
            return f"<{PRIORITY.get(record.levelno, 6)}>{text}"
        return text


def setup(level: str, stream: TextIO | None = None) -> None:
    """Log to stderr, one line per event; without timestamps when stderr is the journal."""
    out = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(out)
    handler.setFormatter(OneLine(to_journal(out, os.environ)))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
