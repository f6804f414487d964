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

Its own signals: ``measure`` samples every figure of ``signals.TABLE`` (the Prometheus
endpoint serves them, ``status`` places them in its document, with rates over the last few
seconds and ``health``: what is wrong now, and whether frames were lost in the last minute);
the watcher samples the history rates come from, pings systemd's watchdog from the event loop
(a wedged loop stops pinging) and sends ``STATUS=`` lines. ``hello`` answers a producer's
handshake at run start (protocol major, ``data_roots``), counting refusals.

Retention: after each core step the agent checks the WAL against its cap; past
``wal.SKIP_SHARE`` a sink whose ``when_full`` is ``skip`` that lags is told to jump over the
older half of its backlog (counted), so a slow remote never costs local files a frame.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

import anyio
from anyio.abc import TaskStatus

from dashcar.proto import (
    COUNTER,
    COUNTERS_DIR,
    PROTOCOL_MINOR,
    PROTOCOL_VERSION,
    ConfigError,
    Frame,
    Kind,
    ProducerGone,
    counter_path,
    internal_record,
    parse_counter_name,
)

from . import control, signals, systemd
from .access import group_id
from .config import AgentConfig, describe, root_allowed
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
RATE_WINDOW_S: Final = 5.0
"""Rates in ``status`` (and systemd's STATUS=) are averages over this many seconds."""
LOSS_WINDOW_S: Final = 60.0
"""Losses counted within this long make ``status`` report the agent as losing data."""
HISTORY_EVERY_S: Final = 1.0
STATUS_NOTIFY_S: Final = 2.0


def agent_version() -> str:
    """The installed dashcar's version (the agent and the SDK ship together)."""
    from dashcar import __version__

    return __version__


def _merge(into: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``extra`` into ``into``, dicts recursively."""
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
    return into


def _count(n: float) -> str:
    return f"{n:,.0f}"


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

    def __init__(self, cfg: AgentConfig, sources: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        self.sources = dict(sources or {})
        self.started = time.time()
        self.allowed_roots = cfg.allowed_roots()
        self.socket_gid = group_id(cfg.socket_group)
        self.refused_by: dict[str, int] = {}
        self.history: deque[tuple[float, dict[str, float]]] = deque()
        self.metrics: signals.MetricsServer | None = None
        self.stopping = False
        self.wal = Wal(cfg.state_dir / "wal", cfg.wal_max_bytes, cfg.wal_sync)
        self.wakeup = threading.Event()
        self.core = Core(
            self.wal, merge_window_s=cfg.merge_window_s, max_open_rows=cfg.max_open_rows, batch_records=cfg.core_batch,
            sinks_passed=self.sinks_passed, allowed_roots=self.allowed_roots,
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
    def _snapshot(self) -> tuple[list[signals.Sample], dict[str, dict[str, Any]]]:
        """Every signal's samples (see ``signals.TABLE``) and each sink runner's own status."""
        core = self.core
        ingest = dict(self.ingest.counters)
        cc = dict(core.book.counters)
        rejected_by = dict(self.ingest.rejected_by)
        for reason, n in list(core.rejected_by.items()):
            rejected_by[reason] = rejected_by.get(reason, 0) + n
        sinks = {r.name: r.status() for r in self.runners}
        rates = self._rates()
        try:
            free = float(shutil.disk_usage(self.cfg.state_dir).free)
        except OSError:
            free = 0.0
        out: list[signals.Sample] = [
            ("uptime_seconds", {}, round(time.time() - self.started, 3)),
            ("ingest_restarts", {}, self.ingest.restarts),
            ("frames_received", {}, ingest["received"]),
            ("messages_received", {}, ingest.get("messages", 0)),
            ("frames_stored", {}, ingest["stored"]),
            ("frames_written", {}, cc.get("frames", 0)),
            ("frames_control", {}, cc.get("control_frames", 0)),
            *(("frames_rejected", {"reason": k}, v) for k, v in sorted(rejected_by.items())),
            ("frames_dropped_disk_full", {}, ingest["dropped_wal"]),
            ("frames_dropped_by_producers", {}, cc.get("dropped_by_producer", 0)),
            ("frames_missing", {}, cc.get("missing", 0)),
            ("frames_lost_in_producer_queue", {}, cc.get("lost_in_producer_queue", 0)),
            ("frames_duplicate", {}, cc.get("duplicates", 0)),
            ("track_clashes", {}, cc.get("clashes", 0)),
            ("frames_in_per_second", {}, rates["in"]),
            ("frames_out_per_second", {}, rates["out"]),
            ("wal_backlog_records", {}, max(0, self.ingest.last_seq - core.cursor)),
            ("wal_bytes", {}, self.wal.used_bytes()),
            ("wal_cap_bytes", {}, self.cfg.wal_max_bytes),
            ("wal_full", {}, 1 if core.full else 0),
            ("state_free_bytes", {}, free),
            ("open_rows", {}, core.rows.count),
            ("runs_open", {}, len(core.book.runs)),
            ("producers_live", {}, len(core.book.live_pids())),
            *(("producers_refused", {"reason": k}, v) for k, v in sorted(self.refused_by.items())),
        ]
        for name, st in sinks.items():
            lab = {"sink": name}
            out += [
                ("sink_lag_frames", lab, st["lag"]["frames"]),
                ("sink_lag_bytes", lab, st["lag"]["bytes"]),
                ("sink_lag_seconds", lab, st["lag"]["oldest_age_s"] or 0.0),
                ("sink_out_per_second", lab, rates.get("sink:" + name, 0.0)),
                ("sink_up", lab, 0 if st["error"] else 1),
                ("sink_retry_attempt", lab, st["retry"]["attempt"] if st["retry"] else 0),
                ("sink_dead_letters", lab, st["counters"].get("dead_letters", 0)),
                ("sink_skipped_frames", lab, st["counters"].get("skipped_frames", 0)),
            ]
        return out, sinks

    def measure(self) -> list[signals.Sample]:
        """Every signal's samples, as the Prometheus endpoint exposes them."""
        return self._snapshot()[0]

    def status(self) -> dict[str, Any]:
        """Everything ``dashcar status`` shows: the signals, sinks, runs, versions and health."""
        samples, sinks = self._snapshot()
        core = self.core.status()
        # Not strict: two sinks of one name (two specs of one class) share an entry of ``sinks``.
        barrier_errors = [s["error"] for r, s in zip(self.runners, sinks.values(), strict=False) if r.sink.barrier and s["error"]]
        doc: dict[str, Any] = {
            "pid": os.getpid(),
            "ingest_pid": self.ingest.pid,
            "ingest_ready": self.ingest.ready.is_set(),
            "version": {"agent": agent_version(), "protocol": [PROTOCOL_VERSION, PROTOCOL_MINOR]},
            "runtime_dir": str(self.cfg.runtime_dir),
            "state_dir": str(self.cfg.state_dir),
            "data_roots": list(self.allowed_roots),
            "socket_group": self.cfg.socket_group or None,
            "metrics_address": self.metrics.address if self.metrics else None,
            "stopping": self.stopping,
            "frames": {"rejected_by": {}},
            "producers": {"refused_by": {}},
            "rates": {"window_s": RATE_WINDOW_S},
            "wal": {"error": self.ingest.wal_error},
            "core": {"cursor": core["cursor"], "stream_seq": core["stream_seq"], "stream_frames": self.core.total_frames,
                     "error": self.core_error},
            "sink": {"error": self.core_error or (barrier_errors[0] if barrier_errors else None)},
            "sinks": sinks,
            "runs": core["runs"],
            "config": describe(self.cfg, self.sources),
        }
        _merge(doc, signals.place(samples))
        doc["frames"]["rejected"] = sum(doc["frames"]["rejected_by"].values())
        doc["wal"]["full"] = bool(doc["wal"]["full"])
        doc["health"] = self._health(doc)
        return doc

    def _loss_totals(self) -> dict[str, float]:
        """Counters whose growth is data lost: the agent's, and what each sink skipped or dead-lettered."""
        cc = self.core.book.counters
        ing = self.ingest.counters
        totals = {
            "rejected": float(ing["rejected"] + cc.get("rejected", 0)),
            "dropped_disk_full": float(ing["dropped_wal"]),
            "dropped_by_producers": float(cc.get("dropped_by_producer", 0)),
            "missing": float(cc.get("missing", 0)),
            "lost_in_producer_queue": float(cc.get("lost_in_producer_queue", 0)),
        }
        for r in self.runners:
            totals[f"skipped by sink {r.name}"] = float(r.counters.get("skipped_frames", 0))
            totals[f"dead letters of sink {r.name}"] = float(r.counters.get("dead_letters", 0))
        return totals

    def sample_history(self) -> None:
        """Record the figures rates and recent losses are computed from (called about once a second)."""
        now = time.monotonic()
        point = {"in": float(self.ingest.counters["received"])}
        for r in self.runners:
            point["sink:" + r.name] = float(r.passed_frames)
        point.update({"loss:" + k: v for k, v in self._loss_totals().items()})
        self.history.append((now, point))
        while self.history and now - self.history[0][0] > LOSS_WINDOW_S + 2 * HISTORY_EVERY_S:
            self.history.popleft()

    def _rates(self) -> dict[str, float]:
        """Frames per second in, out (the slowest local sink) and per sink, over ``RATE_WINDOW_S``."""
        hist = list(self.history)
        rates: dict[str, float] = {"in": 0.0, "out": 0.0}
        if len(hist) < 2:
            return rates
        t1, last = hist[-1]
        t0, first = next(((t, p) for t, p in hist if t1 - t <= RATE_WINDOW_S + HISTORY_EVERY_S / 2), hist[-2])
        if t1 - t0 <= 0:
            t0, first = hist[-2]
        dt = max(t1 - t0, 1e-3)
        for key, value in last.items():
            if not key.startswith("loss:"):
                rates[key] = round(max(0.0, value - first.get(key, value)) / dt, 1)
        local = [rates.get("sink:" + r.name, 0.0) for r in self.runners if r.sink.barrier] or [
            rates.get("sink:" + r.name, 0.0) for r in self.runners]
        rates["out"] = min(local, default=0.0)
        return rates

    def recent_losses(self) -> dict[str, int]:
        """Frames lost within the last ``LOSS_WINDOW_S`` seconds, by kind (empty: none)."""
        hist = list(self.history)
        if not hist:
            return {}
        now = time.monotonic()
        first = next((p for t, p in hist if now - t <= LOSS_WINDOW_S), hist[-1][1])
        out = {}
        for k, v in self._loss_totals().items():
            grown = int(v - first.get("loss:" + k, v))
            if grown > 0:
                out[k] = grown
        return out

    def _health(self, doc: dict[str, Any]) -> dict[str, Any]:
        """What is wrong right now, in words; ``losing_data`` when frames were lost in the last minute."""
        problems: list[str] = []
        recent = self.recent_losses()
        if recent:
            detail = ", ".join(f"{k} {v}" for k, v in sorted(recent.items()))
            problems.append(f"lost {sum(recent.values())} frames in the last {LOSS_WINDOW_S:.0f} s ({detail})")
        if doc["wal"]["error"]:
            problems.append(f"the WAL cannot store frames: {doc['wal']['error']}")
        if doc["wal"]["full"]:
            problems.append("the WAL is at its cap: the core waits for the sinks, ingest drops past the cap")
        if self.core_error:
            problems.append(f"the core fails: {self.core_error}")
        for name, st in doc["sinks"].items():
            if st["error"]:
                attempt = st["retry"]["attempt"] if st["retry"] else 0
                problems.append(f"sink {name} fails (attempt {attempt}, data kept in the WAL): {st['error']}")
        return {"ok": not problems, "losing_data": bool(recent) or bool(doc["wal"]["error"]), "problems": problems}

    def status_line(self) -> str:
        """One line for systemd's STATUS=: rates, backlog, open runs, WAL use, trouble."""
        rates = self._rates()
        wal = self.wal.used_bytes() / max(1, self.cfg.wal_max_bytes) * 100
        line = (f"in {_count(rates['in'])} fps, out {_count(rates['out'])} fps, backlog "
                f"{_count(max(0, self.ingest.last_seq - self.core.cursor))}, {len(self.core.book.runs)} runs open, "
                f"WAL {wal:.1f}% of cap")
        recent = self.recent_losses()
        if recent:
            line += f"; LOST {sum(recent.values())} frames in the last minute"
        errors = [r.name for r in self.runners if r.error]
        if errors:
            line += f"; sink failing: {', '.join(errors)}"
        return line

    # ------------------------------------------------------------- handshake
    def hello(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        """Answer a producer at run start: its protocol major and data root are checked here, off the hot path."""
        proto = msg.get("proto")
        major = proto[0] if isinstance(proto, (list, tuple)) and proto else None
        minor = proto[1] if isinstance(proto, (list, tuple)) and len(proto) > 1 else 0
        pid = msg.get("pid")
        theirs = f"{major}.{minor}"
        ours = f"{PROTOCOL_VERSION}.{PROTOCOL_MINOR}"
        if major != PROTOCOL_VERSION:
            self.refused_by["version"] = self.refused_by.get("version", 0) + 1
            log.warning("producer refused pid=%s reason=version sdk_protocol=%s agent_protocol=%s", pid, theirs, ours)
            return {"ok": False, "reason": "version", "protocol": [PROTOCOL_VERSION, PROTOCOL_MINOR], "agent": agent_version(),
                    "error": f"the agent at {self.cfg.runtime_dir} speaks protocol {ours} (dashcar {agent_version()}), this SDK "
                             f"speaks {theirs} (dashcar {msg.get('sdk', '?')}): its frames are refused; install one dashcar "
                             "version for the SDK and the agent, then restart the agent (dashcar stop)"}
        root = msg.get("root")
        if isinstance(root, str) and not root_allowed(root, self.allowed_roots):
            self.refused_by["root"] = self.refused_by.get("root", 0) + 1
            log.warning("producer refused pid=%s reason=root root=%s", pid, root)
            return {"ok": False, "reason": "root", "protocol": [PROTOCOL_VERSION, PROTOCOL_MINOR], "agent": agent_version(),
                    "error": f"the agent at {self.cfg.runtime_dir} does not write under {root}: its data_roots are "
                             f"{', '.join(self.allowed_roots)}; pass dash_root= one of them (or a directory inside one)"}
        return {"ok": True, "protocol": [PROTOCOL_VERSION, PROTOCOL_MINOR], "agent": agent_version(), "pid": os.getpid(),
                "data_roots": list(self.allowed_roots)}

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
        last_wd = last_hist = last_status = 0.0
        self.sweep_counters()
        while True:
            now = time.monotonic()
            if now - last_hist >= HISTORY_EVERY_S:
                self.sample_history()
                last_hist = now
            if systemd.enabled() and now - last_status >= STATUS_NOTIFY_S and not self.stopping:
                systemd.notify("STATUS=" + self.status_line())
                last_status = now
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

    def close(self) -> None:
        """Release what outlives the threads: the metrics endpoint, the sinks, the WAL."""
        if self.metrics is not None:
            self.metrics.close()
        for s in self.sinks:
            s.close()
        self.wal.close()


async def _in_thread(done: anyio.Event, fn: Any) -> None:
    try:
        await anyio.to_thread.run_sync(fn, abandon_on_cancel=True)
    finally:
        done.set()


async def serve(
    cfg: AgentConfig, *, handle_signals: bool = True, sources: Mapping[str, str] | None = None,
    task_status: TaskStatus[Agent] = anyio.TASK_STATUS_IGNORED,
) -> bool:
    """Run the agent until a stop signal or request; see the module docstring.

    ``task_status`` receives the running ``Agent`` once it is ready (tests run it in-process);
    ``sources`` says where each setting came from (shown by ``dashcar config show --running``).
    Returns False when a sink left network calls running past their deadline: everything is
    committed, and only an immediate exit (``os._exit``) ends them without waiting.
    """
    agent = Agent(cfg, sources)
    if cfg.metrics_address:
        try:
            agent.metrics = signals.MetricsServer(cfg.metrics_address, agent.measure)
        except OSError as exc:
            agent.close()
            raise ConfigError(str(exc)) from exc
    tune_gc()
    try:
        await _serve(agent, handle_signals, task_status)
    except Exception:
        # Worker threads may still be inside LMDB; closing it under them would be worse than
        # exiting: everything stored is in the WAL, and the next start recovers it.
        log.critical("agent failed; exiting without cleanup", exc_info=True)
        os._exit(1)
    agent.close()
    left = sum(getattr(s, "unfinished", lambda: 0)() for s in agent.sinks)
    if left:
        log.info("agent stopped; %d remote calls past their deadline are left to the exit (the next start redoes them)", left)
        return False
    log.info("agent stopped")
    return True


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
        await tg.start(functools.partial(control.serve, cfg.runtime_dir, agent, group=agent.socket_gid))
        if handle_signals:
            tg.start_soon(_signals, agent)
        if not await anyio.to_thread.run_sync(agent.ingest.ready.wait, INGEST_START_TIMEOUT_S):
            log.error("ingest process not ready after %.0fs; still trying", INGEST_START_TIMEOUT_S)
        systemd.notify("READY=1")
        log.info(
            "agent ready pid=%d ingest_pid=%s version=%s protocol=%d.%d runtime_dir=%s state_dir=%s sinks=%s metrics=%s",
            os.getpid(), agent.ingest.pid, agent_version(), PROTOCOL_VERSION, PROTOCOL_MINOR, cfg.runtime_dir, cfg.state_dir,
            ",".join(r.name for r in agent.runners), agent.metrics.address if agent.metrics else "off",
        )
        task_status.started(agent)
        await agent.stop_requested.wait()
        agent.stopping = True
        systemd.notify(f"STOPPING=1\nSTATUS=draining, deadline {cfg.shutdown_timeout_s:g} s")
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
