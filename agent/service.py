"""The agent's lifecycle: open the WAL and sink (recovery), serve, drain on a signal.

Order of startup (teardown is the reverse):
1. the WAL and the sink open; the sink recovers (redo records re-applied, uncommitted
   bytes truncated, derived files rewritten) before any frame is accepted;
2. the ingest process (see ``ingest``) binds the PULL socket and starts storing frames;
3. the sink thread follows the WAL; the watcher looks after producer pids;
4. the control socket answers; systemd hears ``READY=1``.

On SIGTERM or SIGINT (or a ``stop`` request) the agent has the ingest process store what
was already queued and exit, lets the sink write and settle everything, commits, and exits,
all within ``shutdown_timeout_s``; a second signal exits at once. Whatever is cut short by
the deadline or by ``kill -9`` is in the WAL and is recovered on the next start.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import anyio
import lmdb

from dashcar.proto import COUNTER, COUNTERS_DIR, DashcarError, Frame, Kind, ProducerGone, counter_path, encode, parse_counter_name

from . import control, systemd
from .config import AgentConfig
from .ingest import IngestProcess, tune_gc
from .sinks.jsonl import JsonlSink
from .wal import Wal

log = logging.getLogger(__name__)

AGENT_ROOT = "/"
AGENT_PREFIX = "dashcar-agent"
INGEST_START_TIMEOUT_S = 30.0


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a running (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _lower_thread_priority(by: int) -> None:
    """Make the calling thread ``by`` nice levels kinder (Linux schedules threads one by one).

    The sink formats JSON; under a burst it should yield the CPU to producers and to ingest,
    which keep frames from being dropped, and catch up from the WAL afterwards.
    """
    if by <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError as exc:
        log.warning("cannot lower the sink's priority: %s", exc)


class Agent:
    """The running service: threads, counters and the stop request."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.started = time.time()
        self.wal = Wal(cfg.state_dir / "wal", cfg.wal_max_bytes, cfg.wal_sync)
        self.sink = JsonlSink(
            self.wal, merge_window_s=cfg.merge_window_s, max_open_rows=cfg.max_open_rows, batch_records=cfg.sink_batch
        )
        self.wakeup = threading.Event()
        self.ingest = IngestProcess(cfg, self.wal, on_stored=self.wakeup.set)
        self.stop_sink = threading.Event()
        self.stop_requested = anyio.Event()
        self.sink_error: str | None = None
        self._flush_lock = threading.Lock()
        self._flush_requested = 0
        self._flush_done = 0

    def status(self) -> dict[str, Any]:
        """Everything ``dashcar status`` shows: counters, backlog, runs, health."""
        sink = self.sink.status()
        ingest = dict(self.ingest.counters)
        sc = sink["counters"]
        return {
            "pid": os.getpid(),
            "ingest_pid": self.ingest.pid,
            "ingest_restarts": self.ingest.restarts,
            "uptime_s": round(time.time() - self.started, 3),
            "runtime_dir": str(self.cfg.runtime_dir),
            "state_dir": str(self.cfg.state_dir),
            "frames": {
                "received": ingest["received"],
                "messages": ingest.get("messages", 0),
                "stored": ingest["stored"],
                "rejected": ingest["rejected"],
                "rejected_by": dict(self.ingest.rejected_by),
                "dropped_disk_full": ingest["dropped_wal"],
                "dropped_by_producers": sc.get("dropped_by_producer", 0),
                "missing": sc.get("missing", 0),
                "lost_in_producer_queue": sc.get("lost_in_producer_queue", 0),
                "written": sc.get("frames", 0),
                "control": sc.get("control_frames", 0),
                "clashes": sc.get("clashes", 0),
            },
            "wal": {"backlog": max(0, self.ingest.last_seq - self.sink.cursor), "bytes": self.wal.used_bytes(), "error": self.ingest.wal_error},
            "sink": {"open_rows": sink["open_rows"], "error": self.sink_error},
            "runs": sink["runs"],
        }

    def request_flush(self, timeout_s: float) -> bool:
        """Settle and write every open row now (``dashcar flush``); True once committed."""
        with self._flush_lock:
            self._flush_requested += 1
            mine = self._flush_requested
        self.wakeup.set()
        with self.sink.cond:
            return self.sink.cond.wait_for(lambda: self._flush_done >= mine, timeout_s)

    def sink_loop(self) -> None:
        """Follow the WAL until stopped and drained; retry with backoff on disk trouble."""
        _lower_thread_priority(self.cfg.sink_nice)
        backoff = 0.05
        while True:
            flush_target = self._flush_requested
            try:
                progressed = self.sink.step()
                if not progressed and flush_target > self._flush_done:
                    self.sink.step(settle_all=True)
                    with self.sink.cond:
                        self._flush_done = flush_target
                        self.sink.cond.notify_all()
                    continue
                self.sink_error = None
                backoff = 0.05
            except Exception as exc:
                self.sink_error = str(exc)
                if isinstance(exc, (DashcarError, OSError, lmdb.Error)):
                    log.warning("sink=jsonl write failed, retrying in %.2fs: %s", backoff, exc)
                else:
                    log.exception("sink=jsonl failed unexpectedly, recovering in %.2fs", backoff)
                if self.stop_sink.is_set():
                    log.warning("sink=jsonl stopping with its backlog in the WAL for the next start")
                    return
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                try:
                    self.sink.recover()
                except Exception as exc2:
                    log.warning("sink=jsonl recovery failed: %s", exc2)
                continue
            if progressed:
                continue
            if self.stop_sink.is_set():
                self.sink.step(settle_all=True)
                return
            self.wakeup.wait(min(0.05, self.cfg.merge_window_s / 4))
            self.wakeup.clear()

    def _read_counter(self, pid: int, sid: int) -> tuple[int, int, int]:
        """The dead producer's own (last sent seq, dropped, still buffered) counters; the file is removed."""
        path = counter_path(self.cfg.runtime_dir, pid, sid)
        try:
            data = path.read_bytes()
            path.unlink()
        except OSError:
            return 0, 0, 0
        data = data[: COUNTER.size].ljust(COUNTER.size, b"\0")
        return COUNTER.unpack(data)  # type: ignore[return-value]

    def sweep_counters(self) -> None:
        """Report producers that died while no agent ran: their queued frames were all lost."""
        known = set(self.sink.pids)
        try:
            names = os.listdir(self.cfg.runtime_dir / COUNTERS_DIR)
        except OSError:
            return
        for name in names:
            ids = parse_counter_name(name)
            if ids is None or ids[1] in known or pid_alive(ids[0]):
                continue
            counters = self._read_counter(*ids)
            if any(counters):
                self._report_gone(ids[1], ids[0], *counters)

    def _report_gone(self, sid: int, pid: int, last_sent: int, dropped: int, pending: int) -> None:
        gone = ProducerGone(last_sent, dropped, pending)
        self.ingest.send_internal(encode(Frame(Kind.PRODUCER_GONE, sid, pid, AGENT_ROOT, AGENT_PREFIX, 1, gone)))
        log.info("producer sid=%x pid=%d ended last_sent=%d dropped=%d pending=%d", sid, pid, last_sent, dropped, pending)

    async def watch(self) -> None:
        """Report producers whose process ended, through the WAL so it is ordered and durable."""
        reported: set[int] = set()
        interval = self.cfg.watch_interval_s
        wd = systemd.watchdog_interval_s()
        last_wd = 0.0
        self.sweep_counters()
        while True:
            pids = self.sink.pids
            for sid, pid in pids.items():
                if sid not in reported and not pid_alive(pid):
                    reported.add(sid)
                    self._report_gone(sid, pid, *self._read_counter(pid, sid))
            reported &= set(pids)
            if wd is not None and time.monotonic() - last_wd >= wd:
                systemd.notify("WATCHDOG=1")
                last_wd = time.monotonic()
            await anyio.sleep(interval)

    async def run_thread(self, done: anyio.Event, fn: Any, *args: Any) -> None:
        try:
            await anyio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
        finally:
            done.set()


async def serve(cfg: AgentConfig) -> None:
    """Run the agent until a stop signal or request; see the module docstring."""
    agent = Agent(cfg)
    tune_gc()
    ingest_done, sink_done = anyio.Event(), anyio.Event()
    try:
        await _serve(agent, ingest_done, sink_done)
    except Exception:
        # Worker threads may still be inside LMDB; closing it under them would be worse than
        # exiting: everything stored is in the WAL, and the next start recovers it.
        log.critical("agent failed; exiting without cleanup", exc_info=True)
        os._exit(1)
    agent.wal.close()
    log.info("agent stopped")


async def _serve(agent: Agent, ingest_done: anyio.Event, sink_done: anyio.Event) -> None:
    """Start the threads, the ingest process and the tasks; serve until a stop, then drain in order."""
    cfg = agent.cfg
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.run_thread, ingest_done, agent.ingest.run)
        tg.start_soon(agent.run_thread, sink_done, agent.sink_loop)
        tg.start_soon(agent.watch)
        await tg.start(
            control.serve, cfg.runtime_dir, agent.sink, agent.status, agent.stop_requested.set, agent.request_flush
        )
        tg.start_soon(_signals, agent)
        if not await anyio.to_thread.run_sync(agent.ingest.ready.wait, INGEST_START_TIMEOUT_S):
            log.error("ingest process not ready after %.0fs; still trying", INGEST_START_TIMEOUT_S)
        systemd.notify("READY=1")
        log.info(
            "agent ready pid=%d ingest_pid=%s runtime_dir=%s state_dir=%s", os.getpid(), agent.ingest.pid, cfg.runtime_dir, cfg.state_dir
        )
        await agent.stop_requested.wait()
        systemd.notify("STOPPING=1")
        log.info("agent draining deadline_s=%.1f", cfg.shutdown_timeout_s)
        with anyio.move_on_after(cfg.shutdown_timeout_s) as scope:
            agent.ingest.request_stop()
            await ingest_done.wait()
            agent.stop_sink.set()
            agent.wakeup.set()
            await sink_done.wait()
        if scope.cancelled_caught:
            log.warning("agent drain exceeded %.1fs; the rest stays in the WAL for the next start", cfg.shutdown_timeout_s)
            os._exit(1)
        tg.cancel_scope.cancel()


async def _signals(agent: Agent) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if agent.stop_requested.is_set():
                log.warning("second signal %d: exiting now", signum)
                os._exit(1)
            log.info("signal %d: stopping", signum)
            agent.stop_requested.set()
