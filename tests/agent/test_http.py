"""The HTTP layer of remote sinks: the agent's own deadline against a server that trickles, and what replies mean."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from dashcar.agent.sinks.http import Outcome, Pool, Reply, Request, classify


@pytest.fixture
def trickler() -> Iterator[int]:
    """A TCP server that reads a request, then answers one byte every 0.1 s and never finishes."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.recv(65536)
                try:
                    conn.sendall(b"HTTP/1.1 200 OK\r\n")
                    while not stop.wait(0.1):
                        conn.sendall(b"X")
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield int(srv.getsockname()[1])
    stop.set()
    t.join(5)
    srv.close()


def test_a_trickling_server_cannot_hold_a_request_past_its_deadline(trickler: int) -> None:
    pool = Pool(workers=1)
    t0 = time.monotonic()
    pool.submit(Request("r", "POST", f"http://127.0.0.1:{trickler}/api/x", {}, b"{}", 0.8))
    assert pool.wait(10), "a reply came"
    (reply,) = pool.take()
    took = time.monotonic() - t0
    assert 0.7 < took < 3.0, took
    assert reply.status == 0 and reply.timed_out and reply.sent and "no answer within 0.8s" in (reply.error or "")
    assert classify(reply)[0] is Outcome.AMBIGUOUS
    pool.close()


def test_a_refused_connection_is_known_not_to_have_sent_anything() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = Pool(workers=1)
    pool.submit(Request("r", "GET", f"http://127.0.0.1:{port}/", {}, None, 5.0))
    assert pool.wait(10)
    (reply,) = pool.take()
    assert reply.status == 0 and not reply.sent and classify(reply)[0] is Outcome.DOWN
    pool.close()


@pytest.mark.parametrize(("status", "body", "outcome"), [
    (200, b'{"ok":1}', Outcome.OK), (201, b"[]", Outcome.OK), (200, b"", Outcome.AMBIGUOUS), (204, b"", Outcome.AMBIGUOUS),
    (500, b"", Outcome.AMBIGUOUS), (503, b"{}", Outcome.AMBIGUOUS), (429, b"", Outcome.RETRY), (408, b"", Outcome.RETRY),
    (301, b"", Outcome.RETRY), (401, b"", Outcome.AUTH), (403, b"", Outcome.AUTH), (400, b"", Outcome.REFUSED),
    (404, b"", Outcome.REFUSED), (409, b"", Outcome.REFUSED), (413, b"", Outcome.REFUSED),
])
def test_what_a_reply_means(status: int, body: bytes, outcome: Outcome) -> None:
    assert classify(Reply("t", status, {}, body))[0] is outcome
