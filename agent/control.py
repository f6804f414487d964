"""The control socket: ping, status, flush barriers and stop, over a local ROUTER.

Requests and replies are msgpack maps. ``wait`` answers once the sink has written and
committed the producer's flush frame ``(sid, seq)``; each waiter parks on a worker thread,
so a slow barrier never holds up status or other barriers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgpack
import zmq
import zmq.asyncio
from anyio.abc import TaskStatus

from dashcar.proto import CONTROL_SOCKET, PROTOCOL_VERSION

from .sinks.jsonl import JsonlSink

log = logging.getLogger(__name__)


async def serve(
    runtime_dir: Path,
    sink: JsonlSink,
    status: Callable[[], dict[str, Any]],
    request_stop: Callable[[], None],
    request_flush: Callable[[float], bool],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Answer control requests until cancelled."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    path = runtime_dir / CONTROL_SOCKET
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock.bind(f"ipc://{path}")
    waiters = anyio.CapacityLimiter(256)

    async def reply(ident: bytes, body: dict[str, Any]) -> None:
        await sock.send_multipart([ident, msgpack.packb(body)])

    async def wait(ident: bytes, sid: int, seq: int, timeout_s: float) -> None:
        ok = await anyio.to_thread.run_sync(sink.wait_flushed, sid, seq, timeout_s, limiter=waiters)
        await reply(ident, {"ok": ok})

    async def flush_all(ident: bytes, timeout_s: float) -> None:
        ok = await anyio.to_thread.run_sync(request_flush, timeout_s, limiter=waiters)
        await reply(ident, {"ok": ok})

    try:
        async with anyio.create_task_group() as tg:
            task_status.started()
            while True:
                parts = await sock.recv_multipart()
                if len(parts) != 2:
                    continue
                ident, raw = parts
                try:
                    msg = msgpack.unpackb(raw) if len(raw) <= 1 << 16 else None
                    op = msg["op"]
                    if op == "wait":
                        args = (int(msg["sid"]), int(msg["seq"]), float(msg.get("timeout_s", 5.0)))
                except Exception:
                    await reply(ident, {"ok": False, "error": "malformed request"})
                    continue
                if op == "ping":
                    await reply(ident, {"ok": True, "pid": os.getpid(), "version": PROTOCOL_VERSION})
                elif op == "status":
                    await reply(ident, {"ok": True, **status()})
                elif op == "wait":
                    tg.start_soon(wait, ident, *args)
                elif op == "flush":
                    tg.start_soon(flush_all, ident, float(msg.get("timeout_s", 10.0)) if isinstance(msg.get("timeout_s", 0), (int, float)) else 10.0)
                elif op == "stop":
                    await reply(ident, {"ok": True})
                    request_stop()
                else:
                    await reply(ident, {"ok": False, "error": f"unknown op {op!r}"})
    finally:
        sock.close(linger=0)
        ctx.term()
