"""The hot path: one PUSH socket per (process, thread), never blocking, counting every drop.

Each producer packs a frame from its cached constant head, the next sequence number and the
payload, and hands it to ZeroMQ with ``NOBLOCK``. A full queue (the agent slow, down or
absent past ``SNDHWM`` frames) raises ``zmq.Again``: the frame is dropped and counted, and
its sequence number is not used, so the agent's gap count measures only frames lost after
they left this process. After ``fork()`` the child leaves the inherited context alone and
builds its own producers with fresh ids (pyzmq's ``Context.instance()`` rule).

A message that left is kept until the agent acknowledges it as stored, and sent again to a
restarted agent (see ``Producer``): reading acknowledgements costs one non-blocking receive
every 64 sends, no thread of ours.

Coalescing (off by default; ``DASHCAR_COALESCE_MS`` or ``Experiment(coalesce_ms=...)``) keeps
packed frames in the thread's buffer and hands them to ZeroMQ as one message once the oldest
has waited the window: the check runs on the next call, so a frame waits at most the window
plus one call interval, or until ``flush()``, a read, a run close or interpreter exit ships
it. That saves the cross-process wake-up per call. Frames still buffered when the process is
killed are lost; the counter file holds how many, and the agent reports them with the frames
that died in the send queue.
"""

from __future__ import annotations

import atexit
import logging
import mmap
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from dashcar.proto import (
    ACKS_SOCKET,
    COUNTER,
    HELLO_TOPIC,
    INGEST_SOCKET,
    MAX_FRAME_BYTES,
    NDARRAY_MIN_SIZE,
    Kind,
    counter_path,
    frame_head,
    ndarray_ext,
)

from . import _agent

if TYPE_CHECKING:
    import zmq
else:
    zmq = None  # pyzmq, imported when the first transport is made, so ``import dashcar`` stays light

log = logging.getLogger("dashcar")


def load_zmq() -> None:
    """Import pyzmq on first use into this module's ``zmq`` (the hot path reads it as a global)."""
    global zmq
    if zmq is None:
        import zmq as module

        zmq = module

SNDHWM_DEFAULT = 100_000
LINGER_MS_DEFAULT = 1000
DROP_REPORT_INTERVAL_S = 10.0
COALESCE_MAX_MS = 100.0
COALESCE_MAX_FRAMES = 16
COALESCE_MAX_BYTES = 16 << 10
RESEND_MAX_BYTES = 32 << 20
RESEND_MAX_MESSAGES = 100_000
"""A producer keeps each message until the agent acknowledges it as stored, at most this much
(32 MiB or 100 000 messages per thread); past it the oldest is forgotten and counted."""
RECONNECT_IVL_MS = 10
RECONNECT_IVL_MAX_MS = 1000
"""A socket retries its connection after 10 ms, backing off to 1 s while no agent is there."""
ACK_POLL_EVERY = 255
"""Acknowledgements are read (and the message bound enforced) whenever a frame's seq passes a
multiple of 256, before a barrier and at exit, and at once past the byte bound: rare enough to
stay out of the call's p99, often enough to keep ``held`` small."""
_ALONE = frozenset((Kind.RUN_OPEN, Kind.FLUSH, Kind.RUN_CLOSE, Kind.FILE_PUT, Kind.FILE_COPY, Kind.FILE_UPDATE,
                    Kind.FILE_DELETE))
"""Never buffered: a run open (so the agent learns of the producer, and watches it, at once), a
barrier and a close (the agent commits at once when one arrives), and file frames (rare; a
``FILE_PUT`` may carry binary content, which the agent admits only in a frame sent alone)."""


def _default(obj: Any) -> Any:
    """Pack numpy arrays and scalars (and anything with ``tolist``) as plain values.

    Numeric arrays of ``NDARRAY_MIN_SIZE`` elements or more go as their raw bytes (see
    ``dashcar.proto._ndarray``); the agent writes them as the same lists.
    """
    cls = type(obj)
    if cls.__name__ == "ndarray" and cls.__module__ == "numpy" and obj.size >= NDARRAY_MIN_SIZE:
        ext = ndarray_ext(obj)
        if ext is not None:
            return ext
    tolist = getattr(obj, "tolist", None)
    if tolist is not None:
        return tolist()
    raise TypeError(f"cannot log a value of type {type(obj).__name__}; use numbers, str, lists or dicts")


_pack_counter = COUNTER.pack_into


def _open_counter(path: Path) -> mmap.mmap | bytearray:
    """Map this producer's counter file, which the agent reads if the process dies.

    Without a runtime dir (no agent has made one, or it was removed) the counters go to plain
    memory: logging still works, only the count of frames lost in the send queue at a crash is
    then unknown to the agent. The runtime dir itself is never created here.
    """
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)  # group: a shared agent reads it (see agent/access.py)
    except OSError:
        return bytearray(COUNTER.size)
    try:
        gid = os.stat(path.parent).st_gid
        if gid != os.getegid():
            os.fchown(fd, -1, gid)  # a shared agent's directory: its group reads the file
    except OSError:
        pass
    try:
        os.ftruncate(fd, COUNTER.size)
        return mmap.mmap(fd, COUNTER.size)
    finally:
        os.close(fd)


def _batch_io_thread(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    """Run ZeroMQ's I/O thread as ``SCHED_BATCH`` (Linux): woken by a send, it then never preempts
    the caller's thread, which finishes its call first (halves the paced call's p50, measured)."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is not None:
        try:
            ctx.set(zmq.THREAD_SCHED_POLICY, policy)
            ctx.set(zmq.THREAD_PRIORITY, 0)
        except (AttributeError, zmq.ZMQError):
            pass


class Producer:
    """One thread's PUSH socket, producer id, sequence counter, drop counter and unacknowledged frames.

    Every message sent stays in ``held`` until ingest acknowledges it as stored (an ``acks`` SUB
    socket, read on every 256th send and before a barrier), at most ``RESEND_MAX_BYTES``. When a
    new agent speaks (another incarnation: the one before died), everything it never
    acknowledged is sent again; the new agent admits what fills its gaps and drops the rest by
    sequence number, so no stored frame lands twice and none sent is lost while this process
    lives. Frames sent again land after those that came through meanwhile: a track row merges
    into place, a metric point or log line takes the next index.
    """

    __slots__ = (
        "sock", "sid", "pid", "seq", "dropped", "counter", "coalesce_s", "_heads", "_packer", "_last_report",
        "_buf", "_buf_t", "_buf_bytes", "acks", "held", "held_lo", "held_bytes", "_groups", "incarnation", "released",
        "resent", "_released_report", "runtime_dir",
    )

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        runtime_dir: Path,
        endpoint: str,
        sndhwm: int,
        linger_ms: int,
        coalesce_s: float = 0.0,
    ) -> None:
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.setsockopt(zmq.LINGER, linger_ms)
        self.sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        self.sock.connect(endpoint)
        self.runtime_dir = runtime_dir
        self.sid = (int.from_bytes(os.urandom(8), "big") >> 2) | (1 << 62)
        self.pid = os.getpid()
        self.seq = 0
        self.dropped = 0
        self.counter = _open_counter(counter_path(runtime_dir, self.pid, self.sid))
        self._heads: dict[tuple[int, str, str], bytes] = {}
        self._packer = msgpack.Packer(default=_default)
        self._last_report = 0.0
        self.coalesce_s = coalesce_s
        self._buf: list[bytes] = []
        self._buf_t = 0.0
        self._buf_bytes = 0
        self.acks = ctx.socket(zmq.SUB)
        self.acks.setsockopt(zmq.LINGER, 0)
        self.acks.setsockopt(zmq.RCVHWM, 1000)
        self.acks.setsockopt(zmq.SUBSCRIBE, self.sid.to_bytes(8, "big"))
        self.acks.setsockopt(zmq.SUBSCRIBE, HELLO_TOPIC)
        self.acks.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        self.acks.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        self.acks.connect(f"ipc://{runtime_dir / ACKS_SOCKET}")
        self.held: deque[bytes] = deque()
        """Messages sent but not yet acknowledged as stored, in order; their frames' seqs follow one
        another from ``held_lo`` (a dropped frame takes no seq)."""
        self.held_lo = 1
        self.held_bytes = 0
        self._groups: dict[int, int] = {}
        """First seq → frame count of each held message of more than one frame (coalesced)."""
        self.incarnation: int | None = None
        self.released = 0
        self.resent = 0
        self._released_report = 0.0

    def send(self, kind: int, root: str, prefix: str, payload: object, wait_s: float = 0.0) -> int:
        """Send one frame; returns its sequence number, 0 if it was dropped, -1 if it was buffered.

        The hot path never waits (``wait_s=0``); barriers and run closes may wait up to
        ``wait_s`` for room in a full queue, since they are called outside the control loop.
        """
        key = (kind, root, prefix)
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = frame_head(kind, self.sid, self.pid, root, prefix)
            if kind == Kind.RUN_OPEN:
                _agent.hello(self.runtime_dir, root)
        pack = self._packer.pack
        body = pack(payload)
        size = len(head) + len(body) + 9
        if size > MAX_FRAME_BYTES:
            raise ValueError(
                f"frame of {size} bytes exceeds the {MAX_FRAME_BYTES}-byte limit; log less per call"
            )
        if self.coalesce_s and kind not in _ALONE:
            return self._coalesce(head, body, size)
        if self._buf:
            self.ship(wait_s)
        seq = self.seq + 1
        return self._hand_over(head + pack(seq) + body, seq, 1, wait_s)

    def _hand_over(self, data: bytes, seq: int, n: int, wait_s: float) -> int:
        """Give ``n`` packed frames ending at ``seq`` to ZeroMQ; ``seq``, or 0 once their drop is counted."""
        try:
            self.sock.send(data, zmq.NOBLOCK)
        except zmq.Again:
            if not (wait_s > 0 and self._send_waiting(data, wait_s)):
                self._drop(n)
                return 0
        except zmq.ZMQError:
            self._drop(n)
            return 0
        self.seq = seq
        _pack_counter(self.counter, 0, seq, self.dropped, 0)
        self.held.append(data)
        self.held_bytes += len(data)
        if n > 1:
            self._groups[seq - n + 1] = n
        if (seq & ACK_POLL_EVERY) < n or self.held_bytes > RESEND_MAX_BYTES:
            self.poll_acks()
        return seq

    def poll_acks(self) -> None:
        """Read the agent's acknowledgements and announcements: forget what it stored, and send
        again what a new agent (another incarnation) never got; past the bound, forget the oldest."""
        while self.held_bytes > RESEND_MAX_BYTES or len(self.held) > RESEND_MAX_MESSAGES:
            self._release_oldest()
        if not int(self.acks.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            return
        recv = self.acks.recv_multipart
        while True:
            try:
                _, body = recv(zmq.NOBLOCK)
                msg = msgpack.unpackb(body)
            except zmq.Again:
                return
            except (zmq.ZMQError, ValueError, msgpack.UnpackException):
                return
            if type(msg) is not list or not msg:
                continue
            known, self.incarnation = self.incarnation, msg[0]
            if len(msg) == 3:
                first, last = msg[1], msg[2]
                if known != msg[0] and self.held and self.held_lo < first:
                    self._resend(first)
                self._forget(first, last)
            elif known is not None and known != msg[0]:
                self._resend(None)

    def _forget(self, first: int, last: int) -> None:
        """The agent stored frames ``first``..``last``: drop the held messages wholly inside."""
        held, groups, lo = self.held, self._groups, self.held_lo
        while held and first <= lo:
            n = groups.get(lo, 1)
            if lo + n - 1 > last:
                break
            if n > 1:
                del groups[lo]
            self.held_bytes -= len(held.popleft())
            lo += n
        self.held_lo = lo

    def _resend(self, first: int | None) -> None:
        """Send again, in order, what was sent before ``first`` (all if None) and never acknowledged."""
        lo = self.held_lo
        for data in list(self.held):
            n = self._groups.get(lo, 1)
            if first is not None and lo + n - 1 >= first:
                break
            try:
                self.sock.send(data, zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            self.resent += n
            lo += n

    def _release_oldest(self) -> None:
        """Past the bound, the oldest unacknowledged message is forgotten: it can no longer be re-sent."""
        data = self.held.popleft()
        n = self._groups.pop(self.held_lo, 1)
        self.held_lo += n
        self.held_bytes -= len(data)
        self.released += n
        now = time.monotonic()
        if now - self._released_report >= DROP_REPORT_INTERVAL_S:
            self._released_report = now
            log.warning(
                "dashcar: the agent has not acknowledged %d MiB of frames; the oldest could not be re-sent "
                "if it died (%d so far)", RESEND_MAX_BYTES >> 20, self.released,
            )

    def _coalesce(self, head: bytes, body: bytes, size: int) -> int:
        """Buffer a frame, packed whole with the seq it will have, so the call that ships pays no packing."""
        buf = self._buf
        buf.append(head + self._packer.pack(self.seq + len(buf) + 1) + body)
        self._buf_bytes += size
        now = time.monotonic()
        if len(buf) == 1:
            self._buf_t = now
        elif (
            now - self._buf_t >= self.coalesce_s
            or len(buf) >= COALESCE_MAX_FRAMES
            or self._buf_bytes >= COALESCE_MAX_BYTES
        ):
            return self.ship()
        _pack_counter(self.counter, 0, self.seq, self.dropped, len(buf))
        return -1

    def ship(self, wait_s: float = 0.0) -> int:
        """Send the coalescing buffer as one message; returns the last seq, 0 if it was dropped."""
        buf = self._buf
        if not buf:
            return self.seq
        n = len(buf)
        data = (bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big")) + b"".join(buf)
        buf.clear()
        self._buf_bytes = 0
        return self._hand_over(data, self.seq + n, n, wait_s)

    def _send_waiting(self, data: bytes, wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(max(1, int(left * 1000)), zmq.POLLOUT):
                try:
                    self.sock.send(data, zmq.NOBLOCK)
                    return True
                except zmq.Again:
                    continue
        return False

    def _drop(self, n: int = 1) -> None:
        self.dropped += n
        _pack_counter(self.counter, 0, self.seq, self.dropped, len(self._buf))
        now = time.monotonic()
        if now - self._last_report >= DROP_REPORT_INTERVAL_S:
            self._last_report = now
            log.warning(
                "dashcar: send queue full or agent unreachable; %d frames dropped so far", self.dropped
            )


class Transport:
    """The process-wide set of producers for one runtime directory."""

    def __init__(
        self,
        runtime_dir: Path,
        sndhwm: int = SNDHWM_DEFAULT,
        linger_ms: int = LINGER_MS_DEFAULT,
        coalesce_ms: float = 0.0,
    ) -> None:
        self.runtime_dir = runtime_dir
        self.endpoint = f"ipc://{runtime_dir / INGEST_SOCKET}"
        self.sndhwm = sndhwm
        self.linger_ms = linger_ms
        self.coalesce_s = check_coalesce_ms(coalesce_ms) / 1000
        self.pid = os.getpid()
        self.stale = False
        load_zmq()
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        _batch_io_thread(self.ctx)
        self._local = threading.local()
        self._producers: list[Producer] = []
        self._lock = threading.Lock()

    def producer(self) -> Producer:
        """This thread's producer, created on first use."""
        p: Producer | None = getattr(self._local, "p", None)
        if p is None:
            p = Producer(
                self.ctx, self.runtime_dir, self.endpoint, self.sndhwm, self.linger_ms, self.coalesce_s
            )
            self._local.p = p
            with self._lock:
                self._producers.append(p)
        return p

    def set_coalescing(self, ms: float) -> None:
        """Coalesce for ``ms`` milliseconds (0 turns it off) in every thread of this process."""
        self.coalesce_s = check_coalesce_ms(ms) / 1000
        with self._lock:
            for p in self._producers:
                p.coalesce_s = self.coalesce_s

    def dropped(self) -> int:
        """Frames this process dropped (all threads)."""
        with self._lock:
            return sum(p.dropped for p in self._producers)

    def close(self) -> None:
        """Give queued frames up to ``linger_ms`` to leave, then release the context."""
        if self.pid != os.getpid():
            return
        with self._lock:
            producers, self._producers = self._producers, []
        for p in producers:
            p.ship()
            p.poll_acks()
            p.sock.close(linger=self.linger_ms)
            p.acks.close(linger=0)
        self.ctx.term()


_transports: dict[Path, Transport] = {}
_transports_lock = threading.Lock()
_hooks_installed = False


def get_transport(runtime_dir: Path) -> Transport:
    """The transport of this process for ``runtime_dir``, created on first use."""
    global _hooks_installed
    with _transports_lock:
        if not _hooks_installed:
            os.register_at_fork(after_in_child=reset)
            atexit.register(close_all)
            _hooks_installed = True
        t = _transports.get(runtime_dir)
        if t is None:
            t = _transports[runtime_dir] = Transport(runtime_dir, *_limits_from_env())
        return t


def check_coalesce_ms(ms: float) -> float:
    """A valid coalescing window in milliseconds, or ``ValueError``."""
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 <= ms <= COALESCE_MAX_MS:
        raise ValueError(
            f"coalesce_ms must be a number of milliseconds in [0, {COALESCE_MAX_MS:g}], got {ms!r}"
        )
    return float(ms)


def _limits_from_env() -> tuple[int, int, float]:
    env = os.environ
    try:
        coalesce = float(env.get("DASHCAR_COALESCE_MS") or 0)
    except ValueError:
        raise ValueError(
            f"DASHCAR_COALESCE_MS must be a number of milliseconds, got {env['DASHCAR_COALESCE_MS']!r}"
        ) from None
    sndhwm = int(env.get("DASHCAR_SNDHWM", SNDHWM_DEFAULT))
    linger_ms = int(env.get("DASHCAR_LINGER_MS", LINGER_MS_DEFAULT))
    return sndhwm, linger_ms, coalesce


def reset() -> None:
    """Forget every transport without touching its sockets (after fork, and for tests)."""
    global _transports_lock
    for t in _transports.values():
        t.stale = True
    _transports.clear()
    _transports_lock = threading.Lock()


def close_all() -> None:
    """Close every transport of this process, giving queued frames ``linger_ms`` to leave."""
    with _transports_lock:
        transports = list(_transports.values())
        _transports.clear()
    for t in transports:
        t.stale = True
        t.close()

