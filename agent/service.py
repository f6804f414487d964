"""The agent's lifecycle: open the WAL, core and sinks (recovery), serve, drain on a signal.

Startup (teardown is the reverse):
1. the WAL opens; the core recovers its state and the open rows; every configured sink
   (``cfg.sinks``, through ``sinks.load``) opens behind its own ``Runner`` and recovers;
2. the ingest process (see ``ingest``) binds the PULL socket and starts storing messages;
3. the core thread follows the WAL, each runner thread follows the stream, the watcher
   looks after producer pids;
4. the control socket answers; systemd hears ``READY=1``; ``task_status`` gets the agent.

On SIGTERM or SIGINT (or a ``stop`` request) the agent has the ingest process store what
was already queued and exit, lets the core settle everything and the local sinks write it,
commits, and exits, all within ``shutdown_timeout_s``; a second signal exits at once. Remote
sinks stop after their current attempt, their backlog kept. Whatever is cut short by the
deadline or by ``kill -9`` is in the WAL and is recovered on the next start.

Retention: after each core step the agent checks the WAL against its cap; past
``wal.SKIP_SHARE`` a sink whose ``when_full`` is ``skip`` that lags is told to jump over the
older half of its backlog (counted), so a slow remote never costs local files a frame.
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
from anyio.abc import TaskStatus

from dashcar.proto import COUNTER, COUNTERS_DIR, Frame, Kind, ProducerGone, counter_path, internal_record, parse_counter_name

from . import control, systemd
from .config import AgentConfig
from .core import RECENT_BATCHES, Core
from .ingest import IngestProcess, tune_gc
from .sinks import Sink, load
from .sinks.runner import Runner
from .wal import SKIP_SHARE, Wal

log = logging.getLogger(__name__)

AGENT_ROOT = "/"
AGENT_PREFIX = "dashcar-agent"
INGEST_START_TIMEOUT_S = 30.0
CORE_BACKOFF_S = (0.05, 1.0)
PACE_WAIT_S = 0.2
"""The longest the core waits for a local sink at a time before it goes on anyway."""


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


def lower_thread_priority(by: int) -> None:
    """Make the calling thread ``by`` nice levels kinder (Linux schedules threads one by one).

    The core and the sinks format and write; under a burst they should yield the CPU to
    producers and to ingest, which keep frames from being dropped, and catch up from the WAL.
    """
    if by <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError as exc:
        log.warning("cannot lower a worker thread's priority: %s", exc)


class Agent:
    """The running service: the core, the sinks' runners, the ingest process and the stop request."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.started = time.time()
        self.wal = Wal(cfg.state_dir / "wal", cfg.wal_max_bytes, cfg.wal_sync)
        self.wakeup = threading.Event()
        self.core = Core(
            self.wal, merge_window_s=cfg.merge_window_s, max_open_rows=cfg.max_open_rows, batch_records=cfg.core_batch,
            sinks_passed=self.sinks_passed,
        )
        self.sinks: list[Sink] = [load(spec, cfg) for spec in cfg.sink_specs()]
        prepare = lambda: lower_thread_priority(cfg.sink_nice)  # noqa: E731
        self.runners = [
            Runner(s, self.core, self.wal, cfg.state_dir, on_progress=self.wakeup.set, prepare_thread=prepare) for s in self.sinks
        ]
        self.ingest = IngestProcess(cfg, self.wal, on_stored=self.wakeup.set)
        self.stop_core = threading.Event()
        self.stop_requested = anyio.Event()
        self.core_error: str | None = None
        self._flush_lock = threading.Lock()
        self._flush_cond = threading.Condition()
        self._flush_requested = 0
        self._flush_done = 0
        self._flush_head = 0

    def sinks_passed(self) -> int:
        """The last stream batch every sink has committed (what retention may delete)."""
        return min((r.durable for r in self.runners), default=self.core.out_seq)

    # ---------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        """Everything ``dashcar status`` shows: counters, backlog, sinks, runs, health."""
        core = self.core.status()
        ingest = dict(self.ingest.counters)
        cc = core["counters"]
        rejected_by = dict(self.ingest.rejected_by)
        for reason, n in core["rejected_by"].items():
            rejected_by[reason] = rejected_by.get(reason, 0) + n
        sinks = {r.name: r.status() for r in self.runners}
        # Not strict: two sinks of one name (two specs of one class) share an entry of ``sinks``.
        barrier_errors = [s["error"] for r, s in zip(self.runners, sinks.values(), strict=False) if r.sink.barrier and s["error"]]
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
                "rejected": ingest["rejected"] + cc.get("rejected", 0),
                "rejected_by": rejected_by,
                "dropped_disk_full": ingest["dropped_wal"],
                "dropped_by_producers": cc.get("dropped_by_producer", 0),
                "missing": cc.get("missing", 0),
                "duplicates": cc.get("duplicates", 0),
                "lost_in_producer_queue": cc.get("lost_in_producer_queue", 0),
                "written": cc.get("frames", 0),
                "control": cc.get("control_frames", 0),
                "clashes": cc.get("clashes", 0),
            },
            "wal": {
                "backlog": max(0, self.ingest.last_seq - self.core.cursor),
                "bytes": self.wal.used_bytes(),
                "cap_bytes": self.cfg.wal_max_bytes,
                "error": self.ingest.wal_error,
                "full": core["full"],
            },
            "core": {"cursor": core["cursor"], "stream_seq": core["stream_seq"], "stream_frames": self.core.total_frames,
                     "error": self.core_error},
            "sink": {"open_rows": core["open_rows"], "error": self.core_error or (barrier_errors[0] if barrier_errors else None)},
            "sinks": sinks,
            "runs": core["runs"],
        }

    # ----------------------------------------------------------------- flush
    def request_flush(self, timeout_s: float, *, remote: bool = False) -> bool:
        """Settle and write every open row now; True once the local sinks (``remote``: every sink) have it."""
        deadline = time.monotonic() + timeout_s
        with self._flush_lock:
            self._flush_requested += 1
            mine = self._flush_requested
        self.wakeup.set()
        with self._flush_cond:
            if not self._flush_cond.wait_for(lambda: self._flush_done >= mine, timeout_s):
                return False
            head = self._flush_head
        for r in self.runners:
            if (remote or r.sink.barrier) and not r.wait_passed(head, max(0.0, deadline - time.monotonic())):
                return False
        return True

    def wait_flushed(self, sid: int, seq: int, timeout_s: float) -> bool:
        """Block until producer ``sid``'s barrier ``seq`` is written by every local sink."""
        deadline = time.monotonic() + timeout_s
        return all(r.wait_flushed(sid, seq, max(0.0, deadline - time.monotonic())) for r in self.runners if r.sink.barrier)

    # ------------------------------------------------------------------ core
    def core_loop(self) -> None:
        """Follow the WAL until stopped and drained; recover and retry with backoff on failure."""
        lower_thread_priority(self.cfg.sink_nice)
        core = self.core
        backoff = CORE_BACKOFF_S[0]
        while True:
            flush_target = self._flush_requested
            try:
                batch = core.step()
                if batch is None and flush_target > self._flush_done:
                    core.step(settle_all=True)
                    with self._flush_cond:
                        self._flush_done, self._flush_head = flush_target, core.out_seq
                        self._flush_cond.notify_all()
                    continue
                self.core_error = None
                backoff = CORE_BACKOFF_S[0]
            except Exception as exc:
                self.core_error = str(exc)
                log.exception("core step failed, recovering in %.2fs", backoff)
                if self.stop_core.is_set():
                    log.warning("core stopping with its backlog in the WAL for the next start")
                    return
                time.sleep(backoff)
                backoff = min(backoff * 2, CORE_BACKOFF_S[1])
                try:
                    core.recover()
                except Exception as exc2:
                    log.warning("core recovery failed: %s", exc2)
                continue
            if batch is not None:
                self._retain()
                self._pace()
                continue
            if self.stop_core.is_set() and not core.full:
                while core.step(settle_all=True) is not None:
                    pass
                return
            self.wakeup.wait(min(0.05, self.cfg.merge_window_s / 4))
            self.wakeup.clear()

    def _pace(self) -> None:
        """Keep the core at most ``RECENT_BATCHES`` ahead of the local sinks that keep up: batches they
        read from memory cost nothing more, while one read back from the store is merged again."""
        head = self.core.out_seq
        for r in self.runners:
            if r.sink.barrier and r.error is None:

                def caught_up(r: Runner = r) -> bool:
                    return head - r.cursor < RECENT_BATCHES or r.error is not None or self.stop_core.is_set()

                with r.cond:
                    r.cond.wait_for(caught_up, PACE_WAIT_S)

    def _retain(self) -> None:
        """Near the WAL's cap, have lagging sinks that may skip jump over the older half of their backlog."""
        if self.wal.used_bytes() <= self.wal.max_bytes * SKIP_SHARE:
            return
        head = self.core.out_seq
        for r in self.runners:
            if r.sink.when_full == "skip" and r.cursor < head:
                r.skip_to(r.cursor + max(1, (head - r.cursor) // 2))

    # -------------------------------------------------------------- producers
    def _read_counter(self, pid: int, sid: int) -> tuple[int, int, int]:
        """The dead producer's own (last sent seq, dropped, still buffered) counters; the file is removed."""
        path = counter_path(self.cfg.runtime_dir, pid, sid)
        try:
            data = path.read_bytes()
            path.unlink()
        except OSError:
            return 0, 0, 0
        last, dropped, pending = COUNTER.unpack(data[: COUNTER.size].ljust(COUNTER.size, b"\0"))
        return int(last), int(dropped), int(pending)

    def sweep_counters(self) -> None:
        """Report producers that died while no agent ran: their queued frames were all lost."""
        known = set(self.core.book.live_pids())
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
        self.ingest.send_internal(internal_record(Frame(Kind.PRODUCER_GONE, sid, pid, AGENT_ROOT, AGENT_PREFIX, 1, gone)))
        log.info("producer sid=%x pid=%d ended last_sent=%d dropped=%d pending=%d", sid, pid, last_sent, dropped, pending)

    async def watch(self) -> None:
        """Report producers whose process ended, through the WAL so it is ordered and durable."""
        reported: set[int] = set()
        interval = self.cfg.watch_interval_s
        wd = systemd.watchdog_interval_s()
        last_wd = 0.0
        self.sweep_counters()
        while True:
            pids = self.core.book.live_pids()
            for sid, pid in pids.items():
                if sid not in reported and not pid_alive(pid):
                    reported.add(sid)
                    self._report_gone(sid, pid, *self._read_counter(pid, sid))
            reported &= set(pids)
            if wd is not None and time.monotonic() - last_wd >= wd:
                systemd.notify("WATCHDOG=1")
                last_wd = time.monotonic()
            await anyio.sleep(interval)

    def request_stop(self) -> None:
        """Ask the agent to drain and stop (what ``dashcar stop`` and SIGTERM do)."""
        self.stop_requested.set()


async def _in_thread(done: anyio.Event, fn: Any) -> None:
    try:
        await anyio.to_thread.run_sync(fn, abandon_on_cancel=True)
    finally:
        done.set()


async def serve(
    cfg: AgentConfig, *, handle_signals: bool = True, task_status: TaskStatus[Agent] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Run the agent until a stop signal or request; see the module docstring.

    ``task_status`` receives the running ``Agent`` once it is ready (tests run it in-process).
    """
    agent = Agent(cfg)
    tune_gc()
    try:
        await _serve(agent, handle_signals, task_status)
    except Exception:
        # Worker threads may still be inside LMDB; closing it under them would be worse than
        # exiting: everything stored is in the WAL, and the next start recovers it.
        log.critical("agent failed; exiting without cleanup", exc_info=True)
        os._exit(1)
    for s in agent.sinks:
        s.close()
    agent.wal.close()
    log.info("agent stopped")


async def _serve(agent: Agent, handle_signals: bool, task_status: TaskStatus[Agent]) -> None:
    """Start the threads, the ingest process and the tasks; serve until a stop, then drain in order."""
    ingest_done, core_done = anyio.Event(), anyio.Event()
    runners_done = [anyio.Event() for _ in agent.runners]
    agent.core.recover()
    try:
        await _run(agent, handle_signals, task_status, ingest_done, core_done, runners_done)
    finally:
        # Whatever ended the service (a stop, or a cancellation from the caller), no worker
        # thread may be left running: they are told to finish.
        agent.ingest.request_stop()
        agent.stop_core.set()
        agent.wakeup.set()
        for r in agent.runners:
            r.stop()


async def _run(
    agent: Agent, handle_signals: bool, task_status: TaskStatus[Agent], ingest_done: anyio.Event, core_done: anyio.Event,
    runners_done: list[anyio.Event],
) -> None:
    cfg = agent.cfg
    async with anyio.create_task_group() as tg:
        tg.start_soon(_in_thread, ingest_done, agent.ingest.run)
        tg.start_soon(_in_thread, core_done, agent.core_loop)
        for runner, done in zip(agent.runners, runners_done, strict=True):
            tg.start_soon(_in_thread, done, runner.run)
        tg.start_soon(agent.watch)
        await tg.start(control.serve, cfg.runtime_dir, agent)
        if handle_signals:
            tg.start_soon(_signals, agent)
        if not await anyio.to_thread.run_sync(agent.ingest.ready.wait, INGEST_START_TIMEOUT_S):
            log.error("ingest process not ready after %.0fs; still trying", INGEST_START_TIMEOUT_S)
        systemd.notify("READY=1")
        log.info(
            "agent ready pid=%d ingest_pid=%s runtime_dir=%s state_dir=%s sinks=%s",
            os.getpid(), agent.ingest.pid, cfg.runtime_dir, cfg.state_dir, ",".join(r.name for r in agent.runners),
        )
        task_status.started(agent)
        await agent.stop_requested.wait()
        systemd.notify("STOPPING=1")
        log.info("agent draining deadline_s=%.1f", cfg.shutdown_timeout_s)
        with anyio.move_on_after(cfg.shutdown_timeout_s) as scope:
            agent.ingest.request_stop()
            await ingest_done.wait()
            agent.stop_core.set()
            agent.wakeup.set()
            await core_done.wait()
            for r in agent.runners:
                r.stop()
            for done in runners_done:
                await done.wait()
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
