"""The agent's own signals: one table of counters and gauges that every view reads.

Each ``Signal`` has a name, a kind, a help line, its labels and where its value sits in the
status document (``path``, with ``{label}`` placeholders). ``Agent.measure`` produces one
``Sample`` per signal and label set; ``place`` builds the numeric part of ``dashcar status
--json`` from the samples; the Prometheus endpoint (``serve_metrics``) exposes the same
samples as ``dashcar_<name>`` (counters end in ``_total``); ``dashcar status`` renders the
same document with the table's help lines. A figure added here shows up everywhere at once.

Counters count since the WAL was created (they are committed with it) unless their help says
otherwise; gauges are current values.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

from .config import parse_address

log = logging.getLogger(__name__)

PREFIX: Final = "dashcar_"


@dataclass(frozen=True, slots=True)
class Signal:
    """One figure of the agent: its name, kind, help line, labels and place in ``status``."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    path: str
    labels: tuple[str, ...] = ()

    @property
    def exposed_name(self) -> str:
        """The Prometheus name: ``dashcar_<name>``, and ``_total`` after a counter's."""
        return PREFIX + self.name + ("_total" if self.kind == "counter" else "")


Sample = tuple[str, dict[str, str], float]
"""``(signal name, labels, value)``."""

LOSSES: Final = ("rejected", "dropped_disk_full", "dropped_by_producers", "missing", "lost_in_producer_queue")
"""The ``frames`` counters that are data lost (each counted, never silent)."""

TABLE: Final[tuple[Signal, ...]] = (
    Signal("uptime_seconds", "gauge", "Seconds since the agent started.", "uptime_s"),
    Signal("ingest_restarts", "counter", "Times the ingest process died alone and was replaced (since start).",
           "ingest_restarts"),
    Signal("frames_received", "counter", "Frames that reached ingest, stored or refused.", "frames.received"),
    Signal("messages_received", "counter", "Wire messages received (a coalesced message holds several frames).",
           "frames.messages"),
    Signal("frames_stored", "counter", "Frames committed to the WAL (durable from here on).", "frames.stored"),
    Signal("frames_written", "counter", "Data frames the core settled into the stream the sinks write.", "frames.written"),
    Signal("frames_control", "counter", "Flush barriers and run closes applied.", "frames.control"),
    Signal("frames_rejected", "counter", "Frames refused as invalid, by reason (malformed, version, oversized, name, root).",
           "frames.rejected_by.{reason}", ("reason",)),
    Signal("frames_dropped_disk_full", "counter", "Frames dropped because the WAL was full or failing.",
           "frames.dropped_disk_full"),
    Signal("frames_dropped_by_producers", "counter", "Frames producers could not send (their queue was full), as they reported.",
           "frames.dropped_by_producers"),
    Signal("frames_missing", "counter", "Sequence gaps: frames lost between a producer and the WAL.", "frames.missing"),
    Signal("frames_lost_in_producer_queue", "counter", "Frames that died in the queue of a producer that was killed.",
           "frames.lost_in_producer_queue"),
    Signal("frames_duplicate", "counter", "Frames received twice (re-sent after an agent restart) and dropped.",
           "frames.duplicates"),
    Signal("track_clashes", "counter", "Track fields given twice for one timestamp (the later value won).", "frames.clashes"),
    Signal("frames_in_per_second", "gauge", "Frames received per second, over the last few seconds.", "rates.in_fps"),
    Signal("frames_out_per_second", "gauge", "Frames the local sinks passed per second, over the last few seconds.",
           "rates.out_fps"),
    Signal("wal_backlog_records", "gauge", "WAL records stored but not yet read by the core.", "wal.backlog"),
    Signal("wal_bytes", "gauge", "Bytes the WAL takes on disk.", "wal.bytes"),
    Signal("wal_cap_bytes", "gauge", "The WAL's cap (wal_max_bytes).", "wal.cap_bytes"),
    Signal("wal_full", "gauge", "1 while the WAL is too full for the core to make stream batches.", "wal.full"),
    Signal("state_free_bytes", "gauge", "Free bytes on the state directory's file system.", "wal.free_bytes"),
    Signal("open_rows", "gauge", "Track rows still open in the merge window.", "sink.open_rows"),
    Signal("runs_open", "gauge", "Runs with a live producer or open rows.", "runs_open"),
    Signal("producers_live", "gauge", "Producers (process threads) the agent watches.", "producers.live"),
    Signal("producers_refused", "counter", "Producers refused at run start, by reason (version, root; since start).",
           "producers.refused_by.{reason}", ("reason",)),
    Signal("sink_lag_frames", "gauge", "Frames settled but not yet passed by the sink.", "sinks.{sink}.lag.frames", ("sink",)),
    Signal("sink_lag_bytes", "gauge", "Stream bytes settled but not yet passed by the sink.", "sinks.{sink}.lag.bytes",
           ("sink",)),
    Signal("sink_lag_seconds", "gauge", "Age of the oldest batch the sink has not passed (0 when none).",
           "sinks.{sink}.lag.seconds", ("sink",)),
    Signal("sink_out_per_second", "gauge", "Frames the sink passed per second, over the last few seconds.",
           "sinks.{sink}.rate_fps", ("sink",)),
    Signal("sink_up", "gauge", "1 when the sink's last attempt succeeded, 0 while it fails or backs off.",
           "sinks.{sink}.up", ("sink",)),
    Signal("sink_retry_attempt", "gauge", "Failed attempts in a row (0 when the sink is healthy).",
           "sinks.{sink}.attempt", ("sink",)),
    Signal("sink_dead_letters", "counter", "Items the sink refused for good (written to its dead-letter file).",
           "sinks.{sink}.counters.dead_letters", ("sink",)),
    Signal("sink_skipped_frames", "counter", "Frames the sink skipped near the WAL's cap (a remote that fell behind).",
           "sinks.{sink}.counters.skipped_frames", ("sink",)),
)

BY_NAME: Final = {s.name: s for s in TABLE}


def place(samples: Iterable[Sample]) -> dict[str, Any]:
    """The nested status document of ``samples``: each value at its signal's ``path``."""
    doc: dict[str, Any] = {}
    for name, labels, value in samples:
        sig = BY_NAME[name]
        node = doc
        *parents, leaf = (part.format(**labels) for part in sig.path.split("."))
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = int(value) if sig.kind == "counter" or float(value).is_integer() else value
    return doc


def losses(frames: dict[str, Any]) -> int:
    """Frames lost in total, from the ``frames`` part of a status document."""
    return sum(int(frames.get(k, 0)) for k in LOSSES)


# ------------------------------------------------------------------------------------------ Prometheus
def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Collector:
    """A prometheus_client collector over ``measure`` and the table."""

    def __init__(self, measure: Callable[[], list[Sample]]) -> None:
        self.measure = measure

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
        for name, labels, value in self.measure():
            by_name.setdefault(name, []).append((labels, value))
        for sig in TABLE:
            family: CounterMetricFamily | GaugeMetricFamily
            if sig.kind == "counter":
                family = CounterMetricFamily(PREFIX + sig.name, sig.help, labels=list(sig.labels))
            else:
                family = GaugeMetricFamily(PREFIX + sig.name, sig.help, labels=list(sig.labels))
            for labels, value in by_name.get(sig.name, []):
                family.add_metric([labels[k] for k in sig.labels], value)
            yield family


class MetricsServer:
    """The Prometheus endpoint: an HTTP server thread serving ``/metrics`` from the table."""

    def __init__(self, address: str, measure: Callable[[], list[Sample]]) -> None:
        from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

        host, port = parse_address(address)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(measure))
        ProcessCollector(namespace="dashcar", registry=registry)
        try:
            self.server, self.thread = start_http_server(port, host, registry=registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {address!r}: {exc.strerror or exc}; pick a free port "
                          "(metrics_address) or leave it empty") from exc
        bound_port = self.server.server_port
        self.address = f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"
        if not is_loopback(host):
            log.warning("metrics endpoint listens beyond loopback address=%s; anyone who reaches it reads the counters",
                        self.address)

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
