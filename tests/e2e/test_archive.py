"""The archive sink against real S3 servers on 127.0.0.1: outages, stalls, SIGKILLs, each frame once.

The agent runs as a subprocess shipping to moto (through a TCP proxy that can refuse, stall or
half-open connections) or to SeaweedFS (killed with SIGKILL and started again on its data).
What the bucket holds is read back by DuckDB (httpfs), pandas and ``pyarrow.dataset``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.dataset as ds
import pytest

from dashcar.agent.main import STARTUP_FAILURE
from tests.conftest import AgentHandle, read_jsonl, wait_until
from tests.e2e.s3_servers import Moto, Proxy, Weed, arrow_fs, client, duck, objects, s3_env

RUN = "lab/fleet/arm-1"
ODD = "odd%=topic name"
MAX_OBJECT = 10 * 1024 * 1024

PRODUCER = """
    import sys, dashcar
    exp = dashcar.Experiment(prefix={run!r}, dash_root={root!r}, echo_logs=False).start()
    exp.params.set(lr=0.1, robot={{"name": "franka", "dof": 7}})
    state, odd, loss = exp.tracks("robot/state"), exp.tracks({odd!r}), exp.metrics("train/loss")
    for phase in {phases!r}:
        lo, hi = phase
        for i in range(lo, hi):
            state.append(i=i, q=[i * 0.5, 1.0, -1.0], mode=3 if i % 7 == 6 else "run", _ts=i * 0.001)
            if i % 10 == 0:
                odd.append(v=i, _ts=i * 0.001)
                loss.log(loss=1.0 / (i + 1), step=i)
            if i % 250 == 0:
                exp.log(f"step {{i}}", metadata={{"i": i}})
        assert exp.flush(30), "local barrier"
        if lo == {late_after}:
            state.append(late=True, _ts=0.0)
            assert exp.flush(30), "late entry written"
        print("phase", hi, flush=True)
        sys.stdin.readline()
    exp.complete()
    print("done", flush=True)
"""


def expected(n: int) -> dict[str, int]:
    """What a producer that ran ``range(n)`` sent: rows per topic, metric points, log entries."""
    tens = len(range(0, n, 10))
    return {"state": n, "odd": tens, "points": tens, "logs": len(range(0, n, 250))}


def start_producer(producers: Any, agent: AgentHandle, phases: list[tuple[int, int]], late_after: int = -1) -> Any:
    code = PRODUCER.format(run=RUN, root=str(agent.data_dir), odd=ODD, phases=phases, late_after=late_after)
    return producers(code, agent.env())


def next_phase(proc: Any, want: str, timeout_s: float = 60.0) -> None:
    """Wait for the producer's line ``want`` (its phase written and flushed locally)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline().strip()
        if line == want:
            return
        assert line or proc.poll() is None, f"producer ended: {proc.stderr.read()}"
    raise AssertionError(f"producer did not reach {want!r}")


def go(proc: Any) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()


def remote_flush(agent: AgentHandle, timeout_s: float) -> bool:
    reply = agent.request({"op": "flush", "remote": True, "timeout_s": timeout_s}, timeout_s + 5)
    return bool(reply and reply["ok"])


def archive_agent(agent_factory: Any, monkeypatch: pytest.MonkeyPatch, endpoint: str, bucket: str) -> AgentHandle:
    for k, v in s3_env(endpoint).items():
        monkeypatch.setenv(k, v)
    agent: AgentHandle = agent_factory(
        "--merge-window-s", "0.05", "--archive-uri", f"s3://{bucket}/fleet", "--archive-endpoint", endpoint,
        "--archive-roll-s", "0.3", "--archive-timeout-s", "2",
    )
    return agent


def check_bucket(endpoint: str, bucket: str, want: dict[str, int], late: int = 0) -> dict[str, Any]:
    """Assert the bucket holds every frame exactly once, in keys without ``%``, objects under 10 MiB."""
    keys = objects(endpoint, bucket)
    assert keys, "the bucket holds objects"
    assert not any("%" in k for k in keys), [k for k in keys if "%" in k]
    assert all(k.endswith((".parquet", ".json")) for k in keys), "nothing but objects and manifests"
    assert max(keys.values()) < MAX_OBJECT
    assert not client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads"), "no multipart upload left"
    con = duck(endpoint)
    src = f"read_parquet('s3://{bucket}/fleet/tracks/**/*.parquet', hive_partitioning = true, union_by_name = true)"
    merged = con.sql(f"""
        SELECT run, name, timestamp, arg_max(COLUMNS(* EXCLUDE (run, name, timestamp, _seq, run_dir, name_dir)), _seq)
        FROM {src} GROUP BY run, name, timestamp""").df()
    state = merged[merged["name"] == "robot/state"].sort_values("timestamp")
    assert list(state["i"]) == [float(i) for i in range(want["state"])], "one merged row per timestamp, every one"
    assert (state["run"] == RUN).all()
    plain = con.sql(f"SELECT name, count(*), count(DISTINCT timestamp) FROM {src} GROUP BY name ORDER BY name").fetchall()
    assert plain == sorted([("robot/state", want["state"] + late, want["state"]), (ODD, want["odd"], want["odd"])])
    if late:
        assert bool(state.iloc[0]["late"]) and state["late"].isna().sum() == want["state"] - 1, "the correction merged"
        assert list(state["q"].iloc[0]) == [0.0, 1.0, -1.0]
    modes = {(m if isinstance(m, str) else None, j if isinstance(j, str) else None)
             for m, j in zip(state["mode"], state["mode:json"], strict=True)}
    assert modes == {("run", None), (None, "3")}, "a value of another type is kept as JSON"
    metrics = con.sql(f"""SELECT name, count(*), count(DISTINCT index), min(index), max(index)
        FROM read_parquet('s3://{bucket}/fleet/metrics/**/*.parquet', hive_partitioning = true, union_by_name = true)
        GROUP BY name""").fetchall()
    assert metrics == [("train/loss", want["points"], want["points"], 0, want["points"] - 1)]
    logs = con.sql(f"SELECT count(*), count(DISTINCT sequence) FROM read_parquet('s3://{bucket}/fleet/logs/**/*.parquet')")
    assert logs.fetchall() == [(want["logs"], want["logs"])]
    params = con.sql(f"SELECT run, lr, \"robot.name\" FROM read_parquet('s3://{bucket}/fleet/params/**/*.parquet')")
    assert params.fetchall() == [(RUN, 0.1, "franka")]
    manifests = [k for k in keys if k.startswith("fleet/runs/")]
    assert len(manifests) == 1
    doc: dict[str, Any] = json.loads(client(endpoint).get_object(Bucket=bucket, Key=manifests[0])["Body"].read())
    assert doc["run"] == RUN and doc["tracks"]["robot/state"]["rows"] == want["state"] + late
    return doc


@pytest.fixture
def moto() -> Iterator[Moto]:
    server = Moto().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(moto: Moto) -> Iterator[Proxy]:
    p = Proxy(moto.port)
    try:
        yield p
    finally:
        p.close()


def test_an_outage_mid_run_costs_jsonl_nothing_and_the_bucket_ends_with_every_frame_once(
    agent_factory: Any, producers: Any, moto: Moto, proxy: Proxy, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="werkzeug")
    bucket = "outage"
    client(moto.endpoint).create_bucket(Bucket=bucket)
    agent = archive_agent(agent_factory, monkeypatch, proxy.endpoint, bucket).start()
    n1, n2, n3 = 6000, 12000, 14000
    proc = start_producer(producers, agent, [(0, n1), (n1, n2), (n2, n3)], late_after=n2)
    t0 = time.monotonic()
    next_phase(proc, f"phase {n1}")
    rate_up = n1 / (time.monotonic() - t0)
    assert remote_flush(agent, 30), f"archive caught up:\n{agent.log()[-3000:]}"
    up = objects(moto.endpoint, bucket)
    assert any("/tracks/" in k for k in up)

    moto.stop()
    proxy.set_mode("refuse")
    t0 = time.monotonic()
    go(proc)
    next_phase(proc, f"phase {n2}")
    rate_down = (n2 - n1) / (time.monotonic() - t0)
    run_dir = agent.data_dir / RUN
    rows = read_jsonl(run_dir / "tracks" / "robot_state" / "data.jsonl")
    assert [r["i"] for r in rows] == list(range(n2)), "JSONL complete while the archive is down"
    assert rate_down >= 0.5 * rate_up, f"JSONL kept its rate: {rate_down:.0f} rows/s down vs {rate_up:.0f} up"
    st = wait_until(lambda: (s := agent.status()["sinks"]["archive"])["error"] and s["retry"] and s, 20, "archive retrying")
    assert st["lag"]["frames"] > 0 and st["lag"]["oldest_age_s"] is not None
    assert agent.status()["sinks"]["jsonl"]["error"] is None
    assert not remote_flush(agent, 1.0), "a remote flush waits for the archive and times out while it is down"

    go(proc)
    next_phase(proc, f"phase {n3}")
    moto.start()
    proxy.set_mode("pass")
    go(proc)
    next_phase(proc, "done")
    assert remote_flush(agent, 60), f"archive caught up after the outage:\n{agent.log()[-3000:]}"
    doc = check_bucket(moto.endpoint, bucket, expected(n3), late=1)
    requests = [r.getMessage() for r in caplog.records if r.name == "werkzeug"]
    assert any(f"PUT /{bucket}/fleet/tracks/" in m for m in requests), "moto logs the requests it served"
    assert not any('"POST ' in m or "partNumber=" in m for m in requests), "one PutObject per object, never a multipart upload"
    assert doc["complete"]
    wait_until(lambda: agent.status()["sinks"]["archive"]["lag"]["frames"] == 0, 20, "no archive lag left")

    fs = arrow_fs(moto.endpoint)
    dataset = ds.dataset(f"{bucket}/fleet/metrics", filesystem=fs, format="parquet", partitioning="hive")
    table = dataset.to_table(columns=["run", "name", "index", "loss", "run_dir", "name_dir"])
    assert table.num_rows == expected(n3)["points"] and set(table.column("name_dir").to_pylist()) == {"train_loss"}
    import pandas as pd  # type: ignore[import-untyped]

    frame = pd.read_parquet(f"{bucket}/fleet/logs", filesystem=fs)
    assert sorted(frame["sequence"]) == list(range(expected(n3)["logs"])) and set(frame["run"]) == {RUN}


def kill_mid_upload(agent: AgentHandle, proc: Any, proxy: Proxy, moto: Moto, bucket: str, phases: list[str],
                    modes: list[str], kind: str) -> None:
    """At each phase the producer reaches, SIGKILL the agent while an upload is held by the proxy (the
    second time once a half-open upload of ``kind`` objects reached the server unanswered), switch the
    proxy to the next mode, restart the agent and let the producer go on."""
    for k, (phase, mode) in enumerate(zip(phases, modes, strict=True)):
        next_phase(proc, phase)
        held = proxy.held
        wait_until(lambda held=held: proxy.held > held, 30, "an upload in flight")
        if k == 1:
            wait_until(lambda: any(kind in key for key in objects(moto.endpoint, bucket)), 30,
                       "a half-open upload stored on the server, unanswered")
        agent.kill()
        proxy.set_mode(mode)
        agent.start()
        go(proc)


def test_three_agent_sigkills_mid_upload_leave_every_frame_once_and_nothing_else(
    agent_factory: Any, producers: Any, moto: Moto, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = "sigkill"
    client(moto.endpoint).create_bucket(Bucket=bucket)
    agent = archive_agent(agent_factory, monkeypatch, proxy.endpoint, bucket)
    phases = [(0, 3000), (3000, 5000), (5000, 8000), (8000, 9000)]
    proxy.set_mode("stall")
    agent.start()
    proc = start_producer(producers, agent, phases)
    kill_mid_upload(agent, proc, proxy, moto, bucket, [f"phase {end}" for _, end in phases[:3]],
                    ["halfopen", "stall", "pass"], "/tracks/")
    next_phase(proc, f"phase {phases[-1][1]}")
    go(proc)
    next_phase(proc, "done")
    assert remote_flush(agent, 60), f"archive caught up:\n{agent.log()[-3000:]}"
    doc = check_bucket(moto.endpoint, bucket, expected(phases[-1][1]))
    assert doc["complete"] and doc["status"] == "completed"
    st = agent.status()["sinks"]["archive"]
    assert st["planned_objects"] == 0 and st["replayed"] > 0, "the last start wrote the killed attempt's plan again"


def test_a_seaweedfs_server_killed_mid_run_keeps_its_data_and_the_archive_completes_once(
    agent_factory: Any, producers: Any, dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = "weed"
    weed = Weed(dirs / "weed", bucket).start()
    try:
        agent = archive_agent(agent_factory, monkeypatch, weed.endpoint, bucket).start()
        proc = start_producer(producers, agent, [(0, 4000), (4000, 8000)])
        next_phase(proc, "phase 4000")
        assert remote_flush(agent, 30), f"archive caught up:\n{agent.log()[-3000:]}"
        before = objects(weed.endpoint, bucket)
        weed.kill()
        go(proc)
        next_phase(proc, "phase 8000")
        wait_until(lambda: agent.status()["sinks"]["archive"]["error"], 20, "archive retrying while the server is gone")
        weed.start()
        assert set(before) <= set(objects(weed.endpoint, bucket)), "the killed server kept what it stored"
        go(proc)
        next_phase(proc, "done")
        assert remote_flush(agent, 60), f"archive caught up after the server came back:\n{agent.log()[-3000:]}"
        doc = check_bucket(weed.endpoint, bucket, expected(8000))
        assert doc["complete"]
    finally:
        weed.cleanup()


def test_the_agent_stops_at_once_while_an_upload_stalls_and_ships_the_rest_on_its_next_start(
    agent_factory: Any, producers: Any, moto: Moto, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = "stopping"
    client(moto.endpoint).create_bucket(Bucket=bucket)
    agent = archive_agent(agent_factory, monkeypatch, proxy.endpoint, bucket)
    agent.extra_args += ["--archive-timeout-s", "60"]
    proxy.set_mode("stall")
    agent.start()
    proc = start_producer(producers, agent, [(0, 2000)])
    next_phase(proc, "phase 2000")
    wait_until(lambda: proxy.held > 0, 30, "an upload in flight")
    go(proc)
    next_phase(proc, "done")
    t0 = time.monotonic()
    assert agent.stop(30) == 0, agent.log()[-3000:]
    assert time.monotonic() - t0 < 10, "the stop did not wait for the stalled upload's 60 s deadline"
    proxy.set_mode("pass")
    agent.start()
    assert remote_flush(agent, 60), f"archive caught up:\n{agent.log()[-3000:]}"
    assert check_bucket(moto.endpoint, bucket, expected(2000))["complete"]


def test_a_bad_archive_uri_stops_the_agent_at_start_with_a_clear_error(dirs: Path) -> None:
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "dashcar.agent", "--runtime-dir", str(dirs / "rt"), "--state-dir", str(dirs / "state"),
         "--archive-uri", "gs://bucket/prefix"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "DASHCAR_AUTOSPAWN": "0"},
    )
    assert res.returncode == STARTUP_FAILURE, res.stderr
    assert "archive_uri 'gs://bucket/prefix': use s3://bucket/prefix or file:///path" in res.stderr


# ----------------------------------------------------------------------------- files
FILES_RUN = "lab/fleet/files-1"
FILES_PRODUCER = """
    import json, os, random, sys, dashcar
    root, work, big = sys.argv[1], sys.argv[2], int(sys.argv[3])
    exp = dashcar.Experiment(prefix={run!r}, dash_root=root, echo_logs=False).start()
    def blob(n, seed):
        return random.Random(seed).randbytes(n)
    ckpt = os.path.join(work, "model.pt")
    with open(ckpt, "wb") as f:
        f.write(blob(big, 1))
    m = exp.files("models").upload(ckpt, description="ckpt", tags=["best"], metadata={{"epoch": 3}})
    cfg = exp.files("configs").save_json({{"lr": 0.1}}, to="config.json")
    exp.files("notes").save_text("hello", to="readme.txt")
    exp.files("data").save_blob(blob(200_000, 2), to="data.bin")
    exp.files("data").save_blob(b"tiny", to="tiny.bin")
    exp.files().duplicate(m, to="models/latest.pt")
    exp.files(file_id=cfg["id"], description="config v2", tags=["cfg"]).update()
    exp.files("notes/readme.txt").delete()
    gone = os.path.join(work, "gone.bin")
    with open(gone, "wb") as f:
        f.write(blob(100_000, 3))
    first = exp.files("tmp").upload(gone)
    assert exp.flush(60)
    with open(gone, "wb") as f:
        f.write(blob(100_000, 4))
    exp.files("tmp").upload(gone)
    assert exp.flush(60), "the overwrite removed the first file's local copy"
    os.unlink(gone)
    exp.complete()
    print(first["id"], flush=True)
"""


def local_index(run: Path) -> list[tuple[Any, ...]]:
    """The run's local file index (the JSONL sink's), shaped like the archive query's rows."""
    doc = json.loads((run / "files" / ".files_metadata.json").read_text())
    return sorted((FILES_RUN, e["id"], e["path"], e["filename"], e["sizeBytes"], e["checksum"], e["contentType"],
                   e["description"], e["tags"], e["metadata"], e["deletedAt"] is not None) for e in doc["files"])


def archive_index(con: Any, root: str) -> tuple[list[tuple[Any, ...]], dict[str, str]]:
    """The run's file index from the ``file_events`` table (the query of docs/remote.md), with its object keys."""
    from tests.agent.test_archive import INDEX

    rows = con.sql(INDEX.format(root=root)).fetchall()
    return sorted((r[0], r[1], r[2], r[3], r[5], r[6], r[7], r[8], r[9], None if r[10] is None else json.loads(r[10]), r[11])
                  for r in rows), {r[1]: r[4] for r in rows}


def check_files(con: Any, root: str, read: Any, run: Path) -> dict[str, str]:
    """The archive's index is the local one, every object holds its file's bytes, and every event is one row."""
    index, keys = archive_index(con, root)
    assert index == local_index(run), "the table over the objects gives the run's file index"
    for entry in index:
        data = read(keys[entry[1]])
        assert len(data) == entry[4] and hashlib.sha256(data).hexdigest() == entry[5], keys[entry[1]]
        if not entry[10]:
            local = next((run / "files").glob(f"**/{entry[1]}/{entry[3]}")).read_bytes()
            assert data == local, "the object holds the stored bytes"
    dups = con.sql(f"SELECT id, op, count(*) FROM read_parquet('{root}/file_events/**/*.parquet') GROUP BY ALL"
                   " HAVING count(*) > 1").fetchall()
    assert dups == [], "each file operation is one row"
    return keys


@pytest.mark.parametrize("store", ["s3", "file"])
def test_files_ship_with_their_index_and_a_vanished_source_is_counted_lost(
    store: str, agent_factory: Any, producers: Any, moto: Moto, dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = "files"
    big = 12 * 1024 * 1024 if store == "s3" else 300_000  # past one part on S3: a multipart upload
    if store == "s3":
        client(moto.endpoint).create_bucket(Bucket=bucket)
        agent = archive_agent(agent_factory, monkeypatch, moto.endpoint, bucket)
        root = f"s3://{bucket}/fleet"
        con = duck(moto.endpoint)

        def read(key: str) -> bytes:
            return bytes(client(moto.endpoint).get_object(Bucket=bucket, Key=f"fleet/{key}")["Body"].read())
    else:
        archive = dirs / "archive"
        agent = agent_factory("--merge-window-s", "0.05", "--archive-uri", f"file://{archive}")
        root = str(archive)
        con = duckdb.connect()

        def read(key: str) -> bytes:
            return (archive / key).read_bytes()
    # Held until the run ends: the first upload is overwritten and its source removed before the archive reads it.
    agent.extra_args += ["--archive-roll-s", "600"]
    agent.start()
    work = dirs / "work"
    work.mkdir()
    proc = producers(f"import sys; sys.argv = ['p', {str(agent.data_dir)!r}, {str(work)!r}, '{big}']\n"
                     + textwrap.dedent(FILES_PRODUCER.format(run=FILES_RUN)), agent.env())
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    first = out.split()[0]
    assert remote_flush(agent, 60), f"archive caught up:\n{agent.log()[-3000:]}"
    keys = check_files(con, root, read, agent.data_dir / FILES_RUN)
    assert len(keys) == 7 and first not in keys
    lost = con.sql(f"SELECT id, lost FROM read_parquet('{root}/file_events/**/*.parquet') WHERE lost IS NOT NULL").fetchall()
    assert lost == [(first, "vanished")], "the first upload: its local copy was replaced and its source removed"
    st = agent.status()["sinks"]["archive"]
    assert st["files_lost_by_reason"] == {"vanished": 1} and st["files_shipped"] == 7 and st["file_bytes"] >= 2 * big
    assert st["files_lost_by_run"] == {str(agent.data_dir / FILES_RUN): 1}
    if store == "s3":
        assert not client(moto.endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads"), "no multipart upload left"


KILL_PRODUCER = """
    import os, random, sys, dashcar
    root, work = sys.argv[1], sys.argv[2]
    exp = dashcar.Experiment(prefix={run!r}, dash_root=root, echo_logs=False).start()
    last = None
    for phase in range(3):
        for i in range(phase * 12, phase * 12 + 12):
            kind = i % 4
            if kind == 0:
                p = os.path.join(work, f"big{{i}}.bin")
                with open(p, "wb") as f:
                    f.write(random.Random(i).randbytes(150_000))
                exp.files("a").upload(p)
            elif kind == 1:
                last = exp.files("spool").save_blob(random.Random(i).randbytes(90_000), to=f"s{{i}}.bin")
            elif kind == 2:
                exp.files("ckpt").save_text(f"epoch {{i}}", to="latest.txt")
            else:
                exp.files().duplicate(last, to=f"dup/d{{i}}.bin")
        if phase == 2:
            exp.files(file_id=last["id"], description="last").update()
            exp.files("a/big0.bin").delete()
        assert exp.flush(60)
        print("phase", phase, flush=True)
        sys.stdin.readline()
    exp.complete()
    print("done", flush=True)
"""


def test_agent_sigkills_while_files_ship_leave_every_object_and_one_row_per_operation(
    agent_factory: Any, producers: Any, moto: Moto, proxy: Proxy, dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = "fkill"
    client(moto.endpoint).create_bucket(Bucket=bucket)
    agent = archive_agent(agent_factory, monkeypatch, proxy.endpoint, bucket)
    proxy.set_mode("stall")
    agent.start()
    work = dirs / "work"
    work.mkdir()
    proc = producers(f"import sys; sys.argv = ['p', {str(agent.data_dir)!r}, {str(work)!r}]\n"
                     + textwrap.dedent(KILL_PRODUCER.format(run=FILES_RUN)), agent.env())
    kill_mid_upload(agent, proc, proxy, moto, bucket, ["phase 0", "phase 1"], ["halfopen", "pass"], "/files/")
    next_phase(proc, "phase 2")
    go(proc)
    next_phase(proc, "done")
    assert remote_flush(agent, 60), f"archive caught up:\n{agent.log()[-3000:]}"

    def read(key: str) -> bytes:
        return bytes(client(moto.endpoint).get_object(Bucket=bucket, Key=f"fleet/{key}")["Body"].read())

    keys = check_files(duck(moto.endpoint), f"s3://{bucket}/fleet", read, agent.data_dir / FILES_RUN)
    stored = {k for k in objects(moto.endpoint, bucket) if k.startswith("fleet/files/")}
    assert {f"fleet/{k}" for k in keys.values()} <= stored
    st = agent.status()["sinks"]["archive"]
    assert st["files_lost"] == 0 and st["planned_objects"] == 0 and st["replayed"] > 0
    assert not client(moto.endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads"), "no multipart upload left"


def test_the_s3_store_streams_copies_past_the_copy_limit_and_leaves_nothing_of_a_failed_upload(
    moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dashcar.agent.sinks import archive

    bucket = "store"
    client(moto.endpoint).create_bucket(Bucket=bucket)
    for k, v in s3_env(moto.endpoint).items():
        monkeypatch.setenv(k, v)
    store = archive.S3Store(archive.parse_uri(f"s3://{bucket}/p", moto.endpoint), 10.0)
    data = os.urandom(3 << 20)
    assert store.put_stream("p/a", lambda write: [write(data[i:i + (1 << 20)]) for i in range(0, len(data), 1 << 20)])
    store.copy("p/a", "p/b", len(data))
    monkeypatch.setattr(archive, "COPY_OBJECT_MAX", 1)
    store.copy("p/a", "p/c", len(data))
    for key in ("p/b", "p/c"):
        assert client(moto.endpoint).get_object(Bucket=bucket, Key=key)["Body"].read() == data
    for size in (1, 5 << 30):
        monkeypatch.setattr(archive, "COPY_OBJECT_MAX", 2 if size == 1 else 5 << 30)
        with pytest.raises(FileNotFoundError):
            store.copy("p/missing", "p/d", size)

    def torn(write: Any) -> None:
        write(b"half of it")
        raise OSError("read failed")

    with pytest.raises(OSError, match="read failed"):
        store.put_stream("p/e", torn)
    left = {k for k in objects(moto.endpoint, bucket) if not k.endswith("/")}  # pyarrow's directory marker is no object
    assert left == {"p/a", "p/b", "p/c"}, "a failed upload leaves no object"
