"""Sinks: where stored frames go. Each sink keeps its own durable cursor in the WAL environment."""

from __future__ import annotations

from typing import Final

REGISTRY: Final = {"jsonl": "dashcar.agent.sinks.jsonl:JsonlSink"}
