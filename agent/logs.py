"""Logging for both agent processes: stderr, one line per event, journald-friendly."""

from __future__ import annotations

import logging
import os
import sys


def setup(level: str) -> None:
    """Log to stderr; without timestamps under systemd, whose journal adds its own."""
    fmt = (
        "%(levelname)s %(name)s %(message)s"
        if os.environ.get("JOURNAL_STREAM")
        else "%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format=fmt)
