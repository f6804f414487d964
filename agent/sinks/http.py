"""HTTP for remote sinks: worker threads with keep-alive connections, and the agent's own deadline.

A ``Pool`` runs requests on a few threads, so a stalled server holds up only the requests
sent to it; replies are collected by the caller when it wants them (``take``, ``wait``).
Every request gets a hard deadline: a watchdog shuts the socket down when it passes, which
ends the request wherever it waits (connecting, sending, a server that trickles its answer).
Per-operation socket timeouts alone would let a trickling server hold a request for ever.

``classify`` turns a reply into what the caller does next (pure). A reply says whether the
request may have reached the server (``sent``): only a failure to connect is known not to
have; a timeout, reset or drop after that is ambiguous, like a 5xx or a 2xx without a JSON
body. The standard library is used (``http.client``, ``ssl``): the deadline needs the socket
itself, and no more than JSON over keep-alive HTTP/1.1 is needed. Proxies come from the
environment (``https_proxy``, ``http_proxy``, ``no_proxy``); loopback never uses one.
"""

from __future__ import annotations

import collections
import enum
import heapq
import http.client
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

MAX_REPLY_BYTES: Final = 64 << 20
IDLE_CLOSE_S: Final = 4.0
"""A kept-alive connection idle this long is closed before the next request, not reused: many
servers close idle connections after 5 s, and a request sent on one they closed is ambiguous."""
_LOOPBACK: Final = frozenset(("localhost", "127.0.0.1", "::1"))


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request; ``tag`` comes back with its reply."""

    tag: Any
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | Iterable[bytes] | None
    """An iterable body is sent chunk by chunk; its ``Content-Length`` must be in ``headers``."""
    timeout_s: float


@dataclass(frozen=True, slots=True)
class Reply:
    """What came back: ``status`` 0 when no answer came (``error`` says why)."""

    tag: Any
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str | None = None
    sent: bool = True
    """False only when the request certainly never reached the server (connecting failed)."""
    timed_out: bool = False


class Outcome(enum.Enum):
    """What a reply means to the sender."""

    OK = "ok"
    """A 2xx with a JSON body."""
    DOWN = "down"
    """No connection: nothing was sent; retry later."""
    AMBIGUOUS = "ambiguous"
    """The server may have stored the request (timeout, reset after sending, 5xx, 2xx without JSON)."""
    RETRY = "retry"
    """Refused for now, certainly not stored (429, 408, a redirect): retry later."""
    AUTH = "auth"
    """401 or 403: the token is wrong; retrying with it is pointless."""
    REFUSED = "refused"
    """Any other 4xx: this request can never succeed."""


def classify(reply: Reply) -> tuple[Outcome, Any]:
    """The outcome of ``reply`` and its JSON body (None unless it parsed)."""
    status = reply.status
    if status == 0:
        return (Outcome.AMBIGUOUS if reply.sent else Outcome.DOWN), None
    if 200 <= status < 300:
        try:
            return Outcome.OK, orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            return Outcome.AMBIGUOUS, None
    if status >= 500:
        return Outcome.AMBIGUOUS, None
    if status in (401, 403):
        return Outcome.AUTH, None
    if status in (408, 429) or 300 <= status < 400 or status < 200:
        return Outcome.RETRY, None
    return Outcome.REFUSED, None


def retry_after_s(value: str | None, now: float | None = None) -> float:
    """Seconds a ``Retry-After`` header asks for (integer seconds or an HTTP date); 0 if absent or unreadable."""
    if not value:
        return 0.0
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return 0.0
    return max(0.0, when - (time.time() if now is None else now))


def describe(reply: Reply) -> str:
    """A short account of a failed reply for status and logs (never headers: they may echo a token)."""
    if reply.status == 0:
        return reply.error or "no answer"
    text = reply.body[:200].decode("utf-8", "replace").strip().replace("\n", " ")
    return f"HTTP {reply.status}" + (f": {text}" if text else "")


class Watchdog:
    """Shuts a socket down when its deadline passes (one thread for every request of a pool)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._live: set[int] = set()
        self._next = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    def arm(self, sock: socket.socket, deadline: float) -> int:
        """Watch ``sock`` until ``disarm``; at ``deadline`` (monotonic) it is shut down."""
        with self._cond:
            self._next += 1
            n = self._next
            heapq.heappush(self._heap, (deadline, n, sock))
            self._live.add(n)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dashcar-http-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        return n

    def disarm(self, n: int) -> bool:
        """The request ended; True if its deadline had shut the socket down first."""
        with self._cond:
            fired = n not in self._live
            self._live.discard(n)
            return fired

    def close(self) -> None:
        """Stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                heap = self._heap
                while heap and (heap[0][1] not in self._live or heap[0][0] <= now):
                    _, n, sock = heapq.heappop(heap)
                    if n in self._live:
                        self._live.discard(n)
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                self._cond.wait(heap[0][0] - now if heap else None)


class Pool:
    """Requests on ``workers`` threads, each with its own keep-alive connections; see the module docstring."""

    def __init__(self, workers: int = 4, user_agent: str = "dashcar") -> None:
        self.workers = workers
        self.user_agent = user_agent
        self._jobs: collections.deque[Request | None] = collections.deque()
        self._done: collections.deque[Reply] = collections.deque()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._watchdog = Watchdog()
        self._proxies = urllib.request.getproxies()
        self._tls: ssl.SSLContext | None = None
        self.in_flight = 0
        """Requests submitted whose replies were not taken yet."""

    def submit(self, req: Request) -> None:
        """Queue ``req``; its reply comes back through ``take``."""
        with self._cond:
            if len(self._threads) < self.workers and len(self._threads) <= self.in_flight:
                t = threading.Thread(target=self._work, name=f"dashcar-http-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
            self.in_flight += 1
            self._jobs.append(req)
            self._cond.notify_all()

    def take(self) -> list[Reply]:
        """Every reply that came back since the last call."""
        with self._cond:
            out = list(self._done)
            self._done.clear()
            self.in_flight -= len(out)
            return out

    def ready(self) -> bool:
        """True if a reply waits to be taken."""
        return bool(self._done)

    def wait(self, timeout_s: float) -> bool:
        """Block until a reply waits (True) or ``timeout_s`` passed."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._done), timeout_s)

    def close(self) -> None:
        """Let the threads end once their current request is over (they hold nothing durable)."""
        with self._cond:
            self._jobs.extend([None] * len(self._threads))
            self._cond.notify_all()
        self._watchdog.close()

    # ----------------------------------------------------------------- worker
    def _work(self) -> None:
        conns: dict[tuple[str, str, int], tuple[http.client.HTTPConnection, float]] = {}
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._jobs))
                req = self._jobs.popleft()
            if req is None:
                for conn, _ in conns.values():
                    conn.close()
                return
            try:
                reply = self._do(conns, req)
            except Exception as exc:  # a bug here must not kill the worker and strand the request
                reply = Reply(req.tag, 0, error=f"{type(exc).__name__}: {exc}", sent=True)
            with self._cond:
                self._done.append(reply)
                self._cond.notify_all()

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def _connect(self, scheme: str, host: str, port: int, timeout_s: float) -> tuple[http.client.HTTPConnection, bool]:
        """A new connection (through a proxy if the environment names one); True if requests need absolute URLs."""
        proxy = None if host in _LOOPBACK or urllib.request.proxy_bypass(host) else self._proxies.get(scheme)
        if proxy:
            p = urlsplit(proxy if "://" in proxy else "http://" + proxy)
            phost, pport = p.hostname or "", p.port or 80
            if scheme == "https":
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    phost, pport, timeout=timeout_s, context=self._tls_context())
                conn.set_tunnel(host, port)
                absolute = False
            else:
                conn, absolute = http.client.HTTPConnection(phost, pport, timeout=timeout_s), True
        elif scheme == "https":
            conn, absolute = http.client.HTTPSConnection(host, port, timeout=timeout_s, context=self._tls_context()), False
        else:
            conn, absolute = http.client.HTTPConnection(host, port, timeout=timeout_s), False
        conn.connect()
        if conn.sock is not None:
            # http.client writes headers and body separately: without this, Nagle's algorithm and
            # the server's delayed ACK add ~40 ms to every request.
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, absolute

    def _do(self, conns: dict[tuple[str, str, int], tuple[http.client.HTTPConnection, float]], req: Request) -> Reply:
        start = time.monotonic()
        deadline = start + req.timeout_s
        parts = urlsplit(req.url)
        scheme = parts.scheme
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        held = conns.pop(key, None)
        if held is not None and start - held[1] > IDLE_CLOSE_S:
            held[0].close()
            held = None
        if held is None:
            try:
                conn, absolute = self._connect(scheme, host, port, req.timeout_s)
            except (OSError, http.client.HTTPException) as exc:
                return Reply(req.tag, 0, error=f"cannot connect to {host}:{port}: {exc}", sent=False,
                             timed_out=time.monotonic() >= deadline)
            if time.monotonic() >= deadline:
                conn.close()
                return Reply(req.tag, 0, error=f"cannot connect to {host}:{port} within {req.timeout_s:g}s", sent=False,
                             timed_out=True)
            if absolute:
                target = req.url
        else:
            conn = held[0]
            if conn.sock is not None:
                conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock = conn.sock
        assert sock is not None
        armed = self._watchdog.arm(sock, deadline)
        late = f"no answer within {req.timeout_s:g}s"
        try:
            headers = {"User-Agent": self.user_agent, **req.headers}
            conn.request(req.method, target, body=req.body, headers=headers)
            resp = conn.getresponse()
            body = resp.read(MAX_REPLY_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if self._watchdog.disarm(armed) or isinstance(exc, TimeoutError) or time.monotonic() >= deadline:
                return Reply(req.tag, 0, error=late, sent=True, timed_out=True)
            return Reply(req.tag, 0, error=f"connection lost: {type(exc).__name__}: {exc}", sent=True)
        if self._watchdog.disarm(armed):
            # The deadline cut the connection: what was read may look whole (an answer that ends
            # at the connection's end) but is not.
            conn.close()
            return Reply(req.tag, 0, error=late, sent=True, timed_out=True)
        if len(body) > MAX_REPLY_BYTES:
            conn.close()
            return Reply(req.tag, 0, error=f"answer larger than {MAX_REPLY_BYTES} bytes", sent=True)
        reply_headers = {k.lower(): v for k, v in resp.getheaders()}
        if resp.will_close:
            conn.close()
        else:
            conns[key] = (conn, time.monotonic())
        return Reply(req.tag, resp.status, reply_headers, body)
