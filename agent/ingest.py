"""Ingest: PULL socket → one WAL record per message → one WAL transaction per batch → acknowledgements.

A message holds one frame, or an array of frames from a coalescing producer; it is stored
as it came, as one record. Ingest checks only what it must to store and count it: its size
and, from its first bytes, that it is a v1 message and how many frames it holds
(``proto.frame_count``), and who sent it (``proto.message_ids``: the producer id and seqs,
read from the frame head without decoding). Every other check (promise 7) happens in the core,
before a frame can touch the book, a file or another run; ingest's cost per message stays a
few microseconds whatever the message holds.

After each committed batch ingest acknowledges, per producer, the last seq it stored (and the
first this incarnation ever saw of that producer) on a PUB socket (``acks.sock``, topic: the
producer id); every second it announces its incarnation (``hello``). A producer keeps what is
not acknowledged and sends it again when it hears a new incarnation (see ``dashcar._transport``).

The receive path runs in a child process (``python -m dashcar.agent.ingest``) so that it has
an interpreter lock of its own: in one process it shared the lock with the sink, which keeps
a core busy under load, and receiving stalled behind it. The agent and its ingest child share
nothing but the WAL (LMDB serialises their writes: the child appends, the agent's sink
garbage-collects) and a ``SOCK_SEQPACKET`` socketpair carrying small msgpack messages:

- child → agent ``stored``: the counters and the last WAL seq after each committed batch
  (the agent's sink wakes on it); ``ready`` once the PULL socket is bound;
- agent → child ``internal``: records the agent made itself (a producer ended; marked so no
  wire message can pass for one), stored only once the socket was seen empty, so every frame
  the dead producer sent lands before the news of its death; ``stop``: drain what is queued,
  store it, and exit.

The child dies with the agent (``PR_SET_PDEATHSIG``; on other systems, at the socketpair's
end of file), ignores SIGINT and SIGTERM (the agent orders the drain), and the agent starts
a new child if one dies on its own. A message that is no v1 message is counted by reason and
never stored; a full or failing WAL drops the batch and counts its frames; the loop keeps
serving.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import lmdb
import msgpack
import zmq

from dashcar.proto import (
    ACKS_SOCKET,
    HELLO_TOPIC,
    INGEST_SOCKET,
    MAX_FRAME_BYTES,
    FrameTooLarge,
    Kind,
    frame_count,
    message_ids,
    refusal_reason,
)

from . import logs
from .access import group_id, share
from .config import AgentConfig
from .errors import WALError
from .wal import Wal

log = logging.getLogger("dashcar.agent.ingest")  # not __name__: the child runs as __main__

WARN_INTERVAL_S: Final = 10.0
MAX_MESSAGE: Final = 1 << 20
MAX_BATCH_BYTES: Final = 4 << 20
"""A batch ends at ``ingest_batch`` messages or this many bytes, whichever comes first (a
coalesced message holds up to 16 frames)."""
RESTART_BACKOFF_S: Final = (0.2, 5.0)
HELLO_INTERVAL_S: Final = 1.0
ACK_HEAD: Final = 16
"""Leading bytes of a message that name its producer (and kind): the seq follows them."""
ACK_HWM: Final = 64
"""Acknowledgements queued per producer that is not reading them; they are cumulative, so
dropping older ones past this loses nothing."""
MAX_PRODUCERS: Final = 65_536
_PR_SET_PDEATHSIG: Final = 1

_BARRIER_KINDS = (bytes([Kind.FLUSH]), bytes([Kind.RUN_CLOSE]))
"""Byte 2 of a single v1 frame is its kind; a flush or close commits its batch without waiting
(they are never coalesced)."""


def tune_gc() -> None:
    """Move start-up objects out of the collector's sight and collect young objects less often.

    Both agent processes allocate a few containers per frame, nearly all freed by reference
    counting (the agent's structures hold no cycles); with the default threshold the collector
    runs every 700 allocations and rescans the long-lived state each time. At 500 000 a
    young collection runs a few times a second at full load (measured: +20 % drain rate).
    """
    gc.freeze()
    gc.set_threshold(500_000, 20, 100)


def saved_counters(wal: Wal) -> tuple[dict[str, Any], dict[str, int]]:
    """Ingest's counters and rejections by reason as last committed with a batch."""
    saved = wal.get_meta("ingest", {})
    counters: dict[str, Any] = {"received": 0, "messages": 0, "stored": 0, "rejected": 0, "dropped_wal": 0}
    counters.update(saved if isinstance(saved, dict) else {})
    return counters, dict(wal.get_meta("rejected_by", {}) or {})  # type: ignore[call-overload]


class Ingest:
    """The child's receive side: owns the PULL socket and the WAL's append path."""

    def __init__(
        self, wal: Wal, runtime_dir: Path, chan: socket.socket, *, batch: int, rcvhwm: int, group_commit_s: float,
        group: int | None = None,
    ) -> None:
        self.wal = wal
        self.group = group
        self.chan = chan
        self.batch = batch
        self.max_batch_bytes = min(MAX_BATCH_BYTES, max(64 << 10, wal.max_bytes // 64))
        """A batch never takes more than a small share of a small WAL: the append check must not
        refuse a burst that the cap could hold."""
        self.group_commit_s = group_commit_s
        self.endpoint = f"ipc://{runtime_dir / INGEST_SOCKET}"
        self._sock_path = runtime_dir / INGEST_SOCKET
        self._rcvhwm = rcvhwm
        self.internal: list[bytes] = []
        self.counters, self.rejected_by = saved_counters(wal)
        self.wal_error: str | None = None
        self.incarnation = int.from_bytes(os.urandom(8), "big") >> 1
        """Who acknowledges: a producer that hears a new one re-sends what the last one never acknowledged."""
        self.first_seen: dict[int, int] = {}
        self._pending_acks: dict[int, int] = {}
        self._acks_path = runtime_dir / ACKS_SOCKET
        self._hello_at = 0.0
        self._emptied = False
        self._stopping = False
        self._warned: dict[str, float] = {}

    def _warn(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_INTERVAL_S) >= WARN_INTERVAL_S:
            self._warned[key] = now
            log.warning(msg, *args)

    def _tell(self, msg: dict[str, Any]) -> None:
        self.chan.send(msgpack.packb(msg))

    def _report(self) -> None:
        self._tell(
            {
                "t": "stored", "counters": self.counters, "rejected_by": self.rejected_by, "last_seq": self.wal.last_seq,
                "wal_error": self.wal_error,
            }
        )

    def _control(self) -> None:
        """Read one message from the agent; its end of file means the agent is gone."""
        data = self.chan.recv(MAX_MESSAGE)
        if not data:
            log.error("agent went away; ingest stops")
            self._stopping = True
            return
        msg = msgpack.unpackb(data)
        if msg["t"] == "internal":
            self.internal.extend(msg["frames"])
        elif msg["t"] == "stop":
            self._stopping = True

    def run(self) -> None:
        """Serve until the agent says stop, then drain what is already queued and return."""
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            os.unlink(self._sock_path)
        except FileNotFoundError:
            pass
        sock.bind(self.endpoint)
        share(self._sock_path, self.group, 0o660)
        self._acks = ctx.socket(zmq.PUB)
        self._acks.setsockopt(zmq.LINGER, 0)
        self._acks.setsockopt(zmq.SNDHWM, ACK_HWM)
        try:
            os.unlink(self._acks_path)
        except FileNotFoundError:
            pass
        self._acks.bind(f"ipc://{self._acks_path}")
        share(self._acks_path, self.group, 0o660)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self.chan.fileno(), zmq.POLLIN)
        self._tell({"t": "ready"})
        self._report()
        try:
            while not self._stopping:
                events = dict(poller.poll(50))
                if time.monotonic() >= self._hello_at:
                    self._hello_at = time.monotonic() + HELLO_INTERVAL_S
                    self._acks.send_multipart([HELLO_TOPIC, msgpack.packb([self.incarnation])])
                if self.chan.fileno() in events:
                    self._control()
                if sock in events:
                    self._collect(sock)
                elif self.internal:
                    self._emptied = True
                    self._store([], 0)
            while self._collect(sock, linger=False):
                pass
            if self.internal:
                self._emptied = True
                self._store([], 0)
        finally:
            sock.close(linger=0)
            self._acks.close(linger=0)
            ctx.term()

    def _collect(self, sock: zmq.Socket[bytes], linger: bool = True) -> int:
        """Gather one batch: drain the queue, and keep gathering for up to ``group_commit_s``.

        A trickle of frames (a 1 kHz loop) then costs one fsync per interval, not one per frame;
        a flush barrier in the batch, or a full batch (``batch`` messages or ``max_batch_bytes``),
        commits at once.
        """
        raws: list[bytes] = []
        size = 0
        barrier = emptied = False
        deadline = time.monotonic() + self.group_commit_s
        recv = sock.recv
        while True:
            try:
                while len(raws) < self.batch and size < self.max_batch_bytes:
                    raw = recv(zmq.NOBLOCK)
                    raws.append(raw)
                    size += len(raw)
                    if raw[2:3] in _BARRIER_KINDS:
                        barrier = True
            except zmq.Again:
                emptied = True
            left = deadline - time.monotonic()
            if not linger or barrier or len(raws) >= self.batch or size >= self.max_batch_bytes or left <= 0:
                break
            sock.poll(max(1, int(left * 1000)))
        if not raws:
            return 0
        self._emptied = emptied
        good: list[bytes] = []
        frames = refused = 0
        # A message's first bytes are constant for its producer and kind (the seq comes later): only the
        # last message of each such head is parsed for the acknowledgement, not every message.
        lasts: dict[bytes, bytes] = {}
        for raw in raws:
            n = frame_count(raw) if len(raw) <= MAX_FRAME_BYTES else 0
            if n:
                good.append(raw)
                frames += n
                lasts[raw[:ACK_HEAD]] = raw
                continue
            reason = FrameTooLarge.reason if len(raw) > MAX_FRAME_BYTES else refusal_reason(raw)
            self.rejected_by[reason] = self.rejected_by.get(reason, 0) + 1
            refused += 1
            self._warn("reject:" + reason, "message refused reason=%s bytes=%d", reason, len(raw))
        self._note_acks(lasts, good)
        self.counters["messages"] += len(raws)
        self.counters["received"] += frames + refused
        self.counters["rejected"] += refused
        self._store(good, frames)
        return len(raws)

    def _store(self, good: list[bytes], frames: int) -> None:
        if self._emptied and self.internal:
            good.extend(self.internal)
            self.internal.clear()
        self.counters["stored"] += frames
        meta = {"ingest": self.counters, "rejected_by": self.rejected_by}
        acks, self._pending_acks = self._pending_acks, {}
        try:
            self.wal.append(good, meta)
        except (WALError, lmdb.Error) as exc:
            self.counters["stored"] -= frames
            self.counters["dropped_wal"] += frames
            self.wal_error = str(exc)
            self._warn("wal", "WAL append failed, %d frames dropped (total %d): %s", frames, self.counters["dropped_wal"], exc)
        else:
            self.wal_error = None
            self._acknowledge(acks)
        self._report()

    def _note_acks(self, lasts: dict[bytes, bytes], good: list[bytes]) -> None:
        """The last seq stored per producer, from the last message of each head; a producer never
        seen before is looked up in the batch for its first message (rare)."""
        acks = self._pending_acks
        for raw in lasts.values():
            ids = message_ids(raw)
            if ids is None:
                continue
            sid, _, last = ids
            if last > acks.get(sid, 0):
                acks[sid] = last
            if sid not in self.first_seen:
                first = next(i[1] for m in good if (i := message_ids(m)) is not None and i[0] == sid)
                self._remember_first(sid, first)

    def _remember_first(self, sid: int, first: int) -> None:
        if len(self.first_seen) >= MAX_PRODUCERS:
            self.first_seen.pop(next(iter(self.first_seen)))
        self.first_seen[sid] = first

    def _acknowledge(self, acks: dict[int, int]) -> None:
        """Tell each producer the last seq this incarnation stored, and the first it ever saw of it."""
        send = self._acks.send_multipart
        for sid, last in acks.items():
            try:
                send([sid.to_bytes(8, "big"), msgpack.packb([self.incarnation, self.first_seen.get(sid, 1), last])], zmq.NOBLOCK)
            except zmq.Again:
                pass


class IngestProcess:
    """The agent's side: starts the ingest child, keeps its figures, restarts it if it dies."""

    def __init__(self, cfg: AgentConfig, wal: Wal, on_stored: Callable[[], None]) -> None:
        self.cfg = cfg
        self.on_stored = on_stored
        self.counters, self.rejected_by = saved_counters(wal)
        self.wal_error: str | None = None
        self.last_seq = wal.last_seq
        self.pid: int | None = None
        self.ready = threading.Event()
        self.restarts = 0
        self._lock = threading.Lock()
        self._chan: socket.socket | None = None
        self._pending: list[bytes] = []
        self._stopping = False

    def send_internal(self, frame: bytes) -> None:
        """Have the child store an agent-made record (kept and re-sent if the child is restarting)."""
        with self._lock:
            self._pending.append(frame)
            self._send_pending()

    def _send_pending(self) -> None:
        if self._chan is None or not self._pending:
            return
        try:
            self._chan.send(msgpack.packb({"t": "internal", "frames": self._pending}))
        except OSError:
            return
        self._pending = []

    def request_stop(self) -> None:
        """Ask the child to drain and exit; ``run`` returns once it has."""
        with self._lock:
            self._stopping = True
            if self._chan is not None:
                try:
                    self._chan.send(msgpack.packb({"t": "stop"}))
                except OSError:
                    pass

    def _spawn(self) -> tuple[subprocess.Popen[bytes], socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cfg = self.cfg
        settings = {
            "runtime_dir": str(cfg.runtime_dir), "wal": str(cfg.state_dir / "wal"), "wal_max_bytes": cfg.wal_max_bytes,
            "wal_sync": cfg.wal_sync, "batch": cfg.ingest_batch, "rcvhwm": cfg.rcvhwm, "group_commit_s": cfg.group_commit_s,
            "log_level": cfg.log_level, "socket_group": group_id(cfg.socket_group),
        }
        argv = [sys.executable, "-m", "dashcar.agent.ingest", str(theirs.fileno()), str(os.getpid()), json.dumps(settings)]
        try:
            proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        return proc, ours

    def run(self) -> None:
        """Keep one child serving until ``request_stop``; a child that dies alone is replaced."""
        backoff = RESTART_BACKOFF_S[0]
        while True:
            with self._lock:
                if self._stopping:
                    return
                proc, chan = self._spawn()
                self._chan = chan
                self.pid = proc.pid
                self._send_pending()
            started = time.monotonic()
            try:
                self._pump(chan)
            finally:
                with self._lock:
                    self._chan = None
                chan.close()
                code = proc.wait()
            self.ready.clear()
            if self._stopping:
                if code != 0:
                    log.warning("ingest process pid=%d ended with code %s while stopping", proc.pid, code)
                return
            if time.monotonic() - started > 60:
                backoff = RESTART_BACKOFF_S[0]
            self.restarts += 1
            log.error("ingest process pid=%d ended with code %s; restarting in %.1fs", proc.pid, code, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_S[1])

    def _pump(self, chan: socket.socket) -> None:
        while True:
            try:
                data = chan.recv(MAX_MESSAGE)
            except OSError:
                return
            if not data:
                return
            msg = msgpack.unpackb(data)
            if msg["t"] == "ready":
                self.ready.set()
                continue
            self.counters = msg["counters"]
            self.rejected_by = msg["rejected_by"]
            self.wal_error = msg["wal_error"]
            if msg["last_seq"] > self.last_seq:
                self.last_seq = msg["last_seq"]
                self.on_stored()


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when the agent ends; exit now if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def child_main(argv: list[str]) -> int:
    """Entry of the ingest child: ``<socketpair fd> <agent pid> <settings as JSON>``."""
    fd, parent, raw = int(argv[0]), int(argv[1]), json.loads(argv[2])
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.setup(raw["log_level"])
    chan = socket.socket(fileno=fd)
    wal = Wal(Path(raw["wal"]), raw["wal_max_bytes"], raw["wal_sync"], state=False)
    tune_gc()
    try:
        Ingest(
            wal, Path(raw["runtime_dir"]), chan, batch=raw["batch"], rcvhwm=raw["rcvhwm"], group_commit_s=raw["group_commit_s"],
            group=raw.get("socket_group"),
        ).run()
    except (BrokenPipeError, ConnectionResetError):
        log.error("agent went away; ingest stops")
        return 1
    finally:
        wal.close()
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
