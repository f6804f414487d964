"""Finding the agent: its runtime directory, the control client, auto-spawn and the handshake.

The agent holds an exclusive ``flock`` on ``agent.lock`` in its runtime directory for as
long as it lives, so "is an agent there?" is a non-blocking lock probe, not a network
round trip. Spawning is serialised by ``spawn.lock``: of ten processes starting at once,
the first spawns and waits until the new agent holds its lock; the others then see it.

The handshake (``hello``): when a run starts, once per process, runtime dir and data root, a
background thread tells the agent this SDK's protocol version and the run's data root. An
agent of another protocol major, or one whose ``data_roots`` do not hold the root, answers
why; the SDK logs that as an ERROR (the producer's log says what to do) and the agent counts
the refusal, and the frames it then refuses too. The caller never waits for it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack

from dashcar.proto import AGENT_LOCK, CONTROL_SOCKET, PROTOCOL_MINOR, PROTOCOL_VERSION, SPAWN_LOCK, ensure_private_dir, state_dir

log = logging.getLogger("dashcar")

SPAWN_WAIT_S = 10.0
HELLO_TIMEOUT_S = 5.0


def agent_running(runtime_dir: Path) -> bool:
    """True if a live agent holds the lock of ``runtime_dir``."""
    try:
        fd = os.open(runtime_dir / AGENT_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def ensure_agent(runtime_dir: Path, environ: Mapping[str, str]) -> bool:
    """Start a detached agent for ``runtime_dir`` unless one runs; True if one runs afterwards."""
    if agent_running(runtime_dir):
        return True
    ensure_private_dir(runtime_dir)
    fd = os.open(runtime_dir / SPAWN_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if agent_running(runtime_dir):
            return True
        _spawn(runtime_dir, environ)
        deadline = time.monotonic() + SPAWN_WAIT_S
        while time.monotonic() < deadline:
            if agent_running(runtime_dir):
                return True
            time.sleep(0.005)
        log.warning(
            "dashcar: the agent spawned for %s did not come up within %.0f s", runtime_dir, SPAWN_WAIT_S
        )
        return False
    finally:
        os.close(fd)


def _spawn(runtime_dir: Path, environ: Mapping[str, str]) -> None:
    """Start ``python -m dashcar.agent --detach``; it double-forks, so it is nobody's child."""
    logdir = ensure_private_dir(state_dir(environ))
    with open(logdir / "agent.log", "ab") as errlog:
        subprocess.run(
            [sys.executable, "-m", "dashcar.agent", "--detach", "--runtime-dir", str(runtime_dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errlog,
            close_fds=True,
            start_new_session=True,
            env=dict(environ),
            check=False,
            timeout=SPAWN_WAIT_S,
        )


def request(runtime_dir: Path, message: dict[str, object], timeout_s: float) -> dict[str, Any] | None:
    """One control request; the reply, or None if no agent answered within ``timeout_s``."""
    import zmq  # here, not at the top: ``import dashcar`` stays light

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{runtime_dir / CONTROL_SOCKET}")
        sock.send(msgpack.packb(message))
        if not sock.poll(int(timeout_s * 1000)):
            return None
        reply = msgpack.unpackb(sock.recv())
        return reply if isinstance(reply, dict) else None
    finally:
        sock.close()


class _Hello:
    """One handshake, run on its own daemon thread; ``reply`` once it is answered."""

    def __init__(self, runtime_dir: Path, root: str) -> None:
        self.runtime_dir = runtime_dir
        self.root = root
        self.reply: dict[str, Any] | None = None
        self.done = threading.Event()
        threading.Thread(target=self._run, name="dashcar-hello", daemon=True).start()

    def _run(self) -> None:
        from dashcar import __version__

        try:
            msg: dict[str, object] = {
                "op": "hello", "proto": [PROTOCOL_VERSION, PROTOCOL_MINOR], "sdk": __version__, "pid": os.getpid(),
                "root": self.root,
            }
            self.reply = request(self.runtime_dir, msg, HELLO_TIMEOUT_S)
        except Exception as exc:  # the handshake must never hurt the producer
            log.debug("dashcar: hello to the agent failed: %s", exc)
        finally:
            if self.reply is None:  # no agent answered: the next run start asks again
                with _hellos_lock:
                    _hellos.pop((str(self.runtime_dir), self.root, os.getpid()), None)
            self.done.set()
        reply = self.reply
        if reply is not None and not reply.get("ok") and reply.get("reason"):
            log.error("dashcar: %s", reply.get("error") or f"the agent refused this producer ({reply['reason']})")


_hellos: dict[tuple[str, str, int], _Hello] = {}
_hellos_lock = threading.Lock()


def hello(runtime_dir: Path, root: str) -> None:
    """Start the handshake for ``root`` with the agent at ``runtime_dir`` unless this process did already."""
    key = (str(runtime_dir), root, os.getpid())
    with _hellos_lock:
        if key not in _hellos:
            _hellos[key] = _Hello(runtime_dir, root)


def wait_hello(runtime_dir: Path, root: str, timeout_s: float = HELLO_TIMEOUT_S + 1) -> dict[str, Any] | None:
    """The agent's answer to this process's handshake for ``root`` (None: not asked, or no agent answered)."""
    with _hellos_lock:
        h = _hellos.get((str(runtime_dir), root, os.getpid()))
    if h is None or not h.done.wait(timeout_s):
        return None
    return h.reply
