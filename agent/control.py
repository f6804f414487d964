"""The control socket: ping, hello, status, flush barriers and stop, over a local ROUTER.

``hello`` is what a producer asks once per data root when a run starts (never on the hot
path): the agent checks its protocol major and its data root (``data_roots``) and answers
``ok`` or why not; a refusal is counted (``producers.refused_by``) and the SDK logs it.

Requests and replies are msgpack maps. ``wait`` answers once every local sink has written
and committed the producer's flush frame ``(sid, seq)``; ``flush`` settles every open row
and answers once the local sinks (with ``remote``: every sink) have it. Each waiter parks on
a worker thread, so a slow barrier never holds up status or other barriers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol

import anyio
import msgpack
import zmq
import zmq.asyncio
from anyio.abc import TaskStatus

from dashcar.proto import CONTROL_SOCKET, PROTOCOL_VERSION

from .access import share

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 16


class Controlled(Protocol):
    """What the control socket asks of the agent."""

    def status(self) -> dict[str, Any]:
        """Everything ``dashcar status`` shows."""

    def request_stop(self) -> None:
        """Drain and stop."""

    def request_flush(self, timeout_s: float, *, remote: bool = False) -> bool:
        """Settle and write every open row; True once done within the timeout."""

    def wait_flushed(self, sid: int, seq: int, timeout_s: float) -> bool:
        """True once producer ``sid``'s barrier ``seq`` is written locally."""

    def hello(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Check a producer's protocol version and data root at run start."""


def _parse(raw: bytes) -> dict[str, Any] | None:
    """A request map with a string ``op``, or None if it is not one."""
    if len(raw) > MAX_REQUEST_BYTES:
        return None
    try:
        msg = msgpack.unpackb(raw)
    except Exception:
        return None
    return msg if isinstance(msg, dict) and isinstance(msg.get("op"), str) else None


def _number(msg: dict[str, Any], key: str, default: float) -> float:
    value = msg.get(key, default)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


async def serve(
    runtime_dir: Path, agent: Controlled, *, group: int | None = None, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Answer control requests until cancelled; with ``group``, members of that group may connect."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    path = runtime_dir / CONTROL_SOCKET
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock.bind(f"ipc://{path}")
    share(path, group, 0o660)
    waiters = anyio.CapacityLimiter(256)

    async def reply(ident: bytes, body: dict[str, Any]) -> None:
        await sock.send_multipart([ident, msgpack.packb(body)])

    async def wait(ident: bytes, sid: int, seq: int, timeout_s: float) -> None:
        ok = await anyio.to_thread.run_sync(agent.wait_flushed, sid, seq, timeout_s, limiter=waiters)
        await reply(ident, {"ok": ok})

    async def flush(ident: bytes, timeout_s: float, remote: bool) -> None:
        ok = await anyio.to_thread.run_sync(lambda: agent.request_flush(timeout_s, remote=remote), limiter=waiters)
        await reply(ident, {"ok": ok})

    try:
        async with anyio.create_task_group() as tg:
            task_status.started()
            while True:
                parts = await sock.recv_multipart()
                if len(parts) != 2:
                    continue
                ident, raw = parts
                msg = _parse(raw)
                if msg is None:
                    await reply(ident, {"ok": False, "error": "malformed request"})
                    continue
                op = msg["op"]
                if op == "ping":
                    await reply(ident, {"ok": True, "pid": os.getpid(), "version": PROTOCOL_VERSION})
                elif op == "hello":
                    await reply(ident, agent.hello(msg))
                elif op == "status":
                    await reply(ident, {"ok": True, **agent.status()})
                elif op == "wait":
                    sid, seq = msg.get("sid"), msg.get("seq")
                    if type(sid) is not int or type(seq) is not int:
                        await reply(ident, {"ok": False, "error": "wait needs int sid and seq"})
                        continue
                    tg.start_soon(wait, ident, sid, seq, _number(msg, "timeout_s", 5.0))
                elif op == "flush":
                    tg.start_soon(flush, ident, _number(msg, "timeout_s", 10.0), bool(msg.get("remote", False)))
                elif op == "stop":
                    await reply(ident, {"ok": True})
                    agent.request_stop()
                else:
                    await reply(ident, {"ok": False, "error": f"unknown op {op!r}"})
    finally:
        sock.close(linger=0)
        ctx.term()
