"""Shipping to object storage: a WAL backlog → Parquet on a loopback S3 server, with JSONL's rate in the same run.

- ``archive``: a backlog of 6-DOF track frames from 4 runs already in the WAL (as ingest stores
  them), then an agent started with the JSONL and the archive sinks, the archive shipping to
  moto's S3 server in another process on 127.0.0.1. Frames/s until the archive's cursor passed
  every frame (every object uploaded and committed), and until JSONL wrote every frame.
- the same backlog drained by JSONL alone (``jsonl_alone_*``): what the archive costs JSONL.

The archive's roll settings are its defaults (``archive_roll_rows``, ``archive_roll_bytes``) but
``archive_roll_s`` (1 s instead of 60: the tail of the backlog is not held for a minute); the
bucket is then listed to report objects and bytes (every object under 10 MiB, one PUT each).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._util import Agent, emit
from bench.bench_ingest import wal_backlog

ROLL_S = 1.0
CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1",
         "AWS_EC2_METADATA_DISABLED": "true"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Moto:
    """moto's S3 server in its own process on 127.0.0.1."""

    def __init__(self) -> None:
        self.port = _free_port()
        code = f"from moto.server import main; main(['-H', '127.0.0.1', '-p', '{self.port}'])"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        try:
            self._wait()
        except BaseException:
            self.close()
            raise

    def _wait(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client().list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("moto did not start") from None
                time.sleep(0.1)

    def client(self) -> Any:
        import boto3  # type: ignore[import-untyped]

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"], region_name=CREDS["AWS_DEFAULT_REGION"])

    def objects(self, bucket: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                out[o["Key"]] = o["Size"]
        return out

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def drain(frames: int, moto: Moto | None, *extra: str) -> dict[str, Any]:
    """Start an agent on a backlog; frames/s into JSONL and (with ``moto``) into the bucket."""
    base = Path(tempfile.mkdtemp(prefix="dca-", dir="/tmp"))
    bucket = f"bench-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    try:
        state = base / "state"
        records = wal_backlog(state, str(base / "data"), "archive", frames)
        args = ["--merge-window-s", "0.2", "--state-dir", str(state)]
        if moto is not None:
            moto.client().create_bucket(Bucket=bucket)
            os.environ.update(CREDS)
            args += ["--archive-uri", f"s3://{bucket}/fleet", "--archive-endpoint", moto.endpoint,
                     "--archive-roll-s", str(ROLL_S), *extra]
        t0 = time.perf_counter()
        agent = Agent(*args)
        t_jsonl = t_archive = None
        peak = 0
        try:
            while time.perf_counter() - t0 < 600:
                st = agent.status()
                now = time.perf_counter() - t0
                try:
                    peak = max(peak, agent.rss_anon_kb())
                except OSError:
                    pass  # a thread ended while its children were listed
                if t_jsonl is None and st["frames"]["written"] >= records:
                    t_jsonl = now
                arch = st["sinks"].get("archive")
                if arch is not None and t_archive is None and st["frames"]["written"] >= records and arch["lag"]["frames"] == 0:
                    t_archive = now
                if t_jsonl is not None and (moto is None or t_archive is not None):
                    break
                if arch is not None and arch["error"] and arch["retry"] and arch["retry"]["attempt"] > 5:
                    raise RuntimeError(f"archive failing: {arch['error']}")
                time.sleep(0.01)
            arch = agent.status()["sinks"].get("archive") or {}
        finally:
            agent.close()
        out: dict[str, Any] = {"frames": records, "jsonl_frames_per_s": round(records / t_jsonl) if t_jsonl else None,
                               "agent_rss_anon_mb_peak": round(peak / 1024, 1)}
        if moto is not None:
            objs = moto.objects(bucket)
            parquet = [v for k, v in objs.items() if k.endswith(".parquet")]
            out.update(archive_frames_per_s=round(records / t_archive) if t_archive else None,
                       objects=len(parquet), object_mb_max=round(max(parquet) / 2**20, 2),
                       parquet_mb=round(sum(parquet) / 2**20, 2), uploads_retried=arch.get("replayed", 0))
        return out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=400_000)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.frames = 40_000
    moto = Moto()
    try:
        r = drain(args.frames, moto)
    finally:
        moto.close()
    base = drain(args.frames, None)
    emit("archive", {**r, "jsonl_alone_frames_per_s": base["jsonl_frames_per_s"],
                     "jsonl_alone_rss_anon_mb_peak": base["agent_rss_anon_mb_peak"]})


if __name__ == "__main__":
    main()
