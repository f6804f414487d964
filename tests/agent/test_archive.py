"""The archive sink in process, on a real directory store: layout, schema policy, replays, rolling."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from dashcar.agent import config
from dashcar.agent.core import Core
from dashcar.agent.errors import SinkRetryable
from dashcar.agent.sinks import archive, load
from dashcar.agent.sinks.archive import MAX_OBJECT_BYTES, ArchiveSink, Uploads, parse_uri, run_key, series_key
from dashcar.agent.sinks.runner import Runner
from dashcar.agent.wal import Wal
from dashcar.proto import (
    ConfigError,
    FileCopy,
    FileDelete,
    FilePut,
    FileUpdate,
    Frame,
    Kind,
    Log,
    Meta,
    Metric,
    Params,
    RunClose,
    RunOpen,
    Track,
    encode,
    spool_dir,
)

MERGED = """
    SELECT run, name, timestamp, arg_max(COLUMNS(* EXCLUDE (run, name, timestamp, _seq, run_dir, name_dir)), _seq)
    FROM read_parquet('{root}/tracks/**/*.parquet', hive_partitioning = true, union_by_name = true)
    GROUP BY run, name, timestamp ORDER BY run, name, timestamp
"""


class Setup:
    """A WAL, a core and the archive sink behind its runner, all in ``tmp``."""

    def __init__(self, tmp: Path, **settings: Any) -> None:
        self.tmp = tmp
        self.archive = tmp / "archive"
        self.cfg = config.load({}, {"runtime_dir": tmp / "rt", "state_dir": tmp / "st", "archive_uri": f"file://{self.archive}",
                                    "archive_roll_s": 3600.0, **settings})
        self.wal = Wal(tmp / "wal", 1 << 30)
        self.root = str(tmp / "data")
        self.seq = 0
        self.core = Core(self.wal, merge_window_s=0.0, sinks_passed=lambda: self.runner.durable)
        self.core.recover()
        self.sink = ArchiveSink(self.cfg)
        self.runner = Runner(self.sink, self.core, self.wal, tmp)

    def put(self, *payloads: tuple[Kind, Any], prefix: str = "alice/robotics/pick-place") -> None:
        """Store one WAL record per payload and let the core settle them (one stream batch)."""
        out = []
        for kind, payload in payloads:
            self.seq += 1
            out.append(encode(Frame(kind, 9, os.getpid(), self.root, prefix, self.seq, payload)))
        self.wal.append(out, {})
        while self.core.step(settle_all=True) is not None:
            pass

    def tracks(self, topic: str, stamps: range, **fields: Any) -> None:
        self.put(*[(Kind.TRACK, Track(topic, float(t), {"i": t, **fields})) for t in stamps])

    def drain(self) -> None:
        """Deliver everything the core made (the runner's own loop, minus the thread)."""
        self.runner.stopping.set()
        while self.runner.step():
            pass
        assert self.runner.error is None, self.runner.error

    def objects(self) -> list[str]:
        out = []
        for d, _, files in os.walk(self.archive):
            if ".tmp" in Path(d).parts:
                continue
            out += [os.path.relpath(os.path.join(d, f), self.archive) for f in files]
        return sorted(out)

    def sql(self, query: str) -> list[tuple[Any, ...]]:
        return duckdb.sql(query.format(root=self.archive)).fetchall()


def test_every_kind_lands_in_its_hive_partition_with_true_names_in_the_rows(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.put((Kind.RUN_OPEN, RunOpen({"description": "d"})), (Kind.PARAMS, Params({"lr": 0.1, "run": "clash", "net": {"depth": 4}})))
    s.tracks("robot/state", range(5), q=[1.0, 2.0, 3.0])
    s.tracks("50%=odd name", range(3), v=1.5)
    s.put((Kind.METRIC, Metric("train/loss", [{"loss": 0.5, "_ts": 1.0}, {"loss": 0.25, "_ts": 2.0}])),
          (Kind.METRIC, Metric(None, [{"epoch": 1}])),
          (Kind.META, Meta("track", "robot/state", {"description": "joint state"})),
          (Kind.LOG, Log("hello", "info", 1700000000.5, {"k": [1, 2]})), (Kind.LOG, Log("bye", "warn", 1700000001.0, None)))
    s.put((Kind.RUN_CLOSE, RunClose("completed", None, 0)))
    s.drain()
    keys = s.objects()
    assert not any("%" in k or "=" in k.replace("run_dir=", "").replace("name_dir=", "") for k in keys), keys
    kinds = {k.split("/")[0] for k in keys}
    assert kinds == {"tracks", "metrics", "logs", "params", "runs"}, keys
    assert "tracks/run_dir=alice_robotics_pick-place/name_dir=robot_state" in {os.path.dirname(k) for k in keys}
    assert {r[0] for r in s.sql("SELECT DISTINCT name FROM read_parquet('{root}/tracks/**/*.parquet', hive_partitioning=1)")} \
        == {"robot/state", "50%=odd name"}
    rows = s.sql("SELECT run, name, timestamp, q FROM read_parquet('{root}/tracks/**/*.parquet', union_by_name = true)"
                 " WHERE name = 'robot/state' ORDER BY timestamp")
    assert rows == [("alice/robotics/pick-place", "robot/state", float(t), [1.0, 2.0, 3.0]) for t in range(5)]
    metrics = s.sql("SELECT name, index, loss, epoch, _ts FROM read_parquet('{root}/metrics/**/*.parquet', hive_partitioning=1,"
                    " union_by_name=1) ORDER BY name NULLS LAST, index")
    assert metrics == [("train/loss", 0, 0.5, None, 1.0), ("train/loss", 1, 0.25, None, 2.0), (None, 0, None, 1.0, None)]
    logs = s.sql("SELECT sequence, epoch(timestamp), level, message, metadata FROM read_parquet('{root}/logs/**/*.parquet')"
                 " ORDER BY sequence")
    assert logs == [(0, 1700000000.5, "info", "hello", '{"k":[1,2]}'), (1, 1700000001.0, "warn", "bye", None)]
    params = s.sql('SELECT run, version, lr, "net.depth", run_ FROM read_parquet(\'{root}/params/**/*.parquet\')')
    assert params == [("alice/robotics/pick-place", 1, 0.1, 4.0, "clash")], "a field named like a reserved column gets a _"
    manifest = [k for k in keys if k.startswith("runs/")]
    assert len(manifest) == 1 and manifest[0].endswith(".json")
    doc = json.loads((s.archive / manifest[0]).read_text())
    assert doc["run"] == "alice/robotics/pick-place" and doc["complete"] and doc["status"] == "completed"
    assert doc["tracks"]["robot/state"]["rows"] == 5 and doc["tracks"]["robot/state"]["description"] == "joint state"
    assert doc["metrics"]["train/loss"]["rows"] == 2 and doc["logs"]["rows"] == 2


def test_types_that_differ_between_rows_and_objects_read_together_in_duckdb_pandas_and_pyarrow(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.put(*[(Kind.TRACK, Track("t", float(i), {"x": 1, "mode": "a", "q": [1.0], "blob": [[1, 2]]})) for i in range(3)])
    s.drain()
    s.put((Kind.TRACK, Track("t", 3.0, {"x": 2.5, "mode": 7, "q": [1, 2, None], "flag": True})),
          (Kind.TRACK, Track("t", 4.0, {"x": "text", "mode": None, "q": "oops", "big": 1 << 60})),
          (Kind.TRACK, Track("t", 5.0, {"x": [1.0], "q": [[1.0]], "flag": 3})))
    s.drain()
    assert len([k for k in s.objects() if k.startswith("tracks/")]) == 2
    got = s.sql('SELECT timestamp, x, "x:json", mode, "mode:json", q, "q:json", flag, "flag:json", big, "big:json" '
                "FROM read_parquet('{root}/tracks/**/*.parquet', union_by_name = true) ORDER BY timestamp")
    assert got == [
        (0.0, 1.0, None, "a", None, [1.0], None, None, None, None, None),
        (1.0, 1.0, None, "a", None, [1.0], None, None, None, None, None),
        (2.0, 1.0, None, "a", None, [1.0], None, None, None, None, None),
        (3.0, 2.5, None, None, "7", [1.0, 2.0, None], None, True, None, None, None),
        (4.0, None, '"text"', None, None, None, '"oops"', None, None, None, "1152921504606846976"),
        (5.0, None, "[1.0]", None, None, None, "[[1.0]]", None, "3", None, None),
    ], "a value that does not fit its field's type is kept as JSON in <field>:json"
    assert s.sql("SELECT DISTINCT blob FROM read_parquet('{root}/tracks/**/*.parquet', union_by_name=1)"
                 " WHERE blob IS NOT NULL") == [("[[1,2]]",)]
    files = sorted(str(p) for p in s.archive.glob("tracks/**/*.parquet"))
    schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
    table = ds.dataset(files, schema=schema, format="parquet").to_table()
    assert table.num_rows == 6 and table.schema.field("x").type == pa.float64()
    frame = pd_read(files, schema)
    assert list(frame.sort_values("timestamp")["x"].fillna(-1)) == [1.0, 1.0, 1.0, 2.5, -1, -1]


def pd_read(files: list[str], schema: pa.Schema) -> Any:
    """pandas reads through pyarrow; the unified schema is the one to pass when types grew columns."""
    import pandas as pd  # type: ignore[import-untyped]

    return pd.read_parquet(files, schema=schema)


def test_late_corrections_land_as_later_rows_and_the_merged_query_gives_one_row_per_timestamp(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.put((Kind.TRACK, Track("t", 1.0, {"a": 1, "b": 1})), (Kind.TRACK, Track("t", 2.0, {"a": 2})))
    s.drain()
    s.put((Kind.TRACK, Track("t", 1.0, {"b": 10, "c": "late"})), (Kind.TRACK, Track("t", 3.0, {"a": 3})))
    s.drain()
    plain = s.sql("SELECT timestamp, a, b, c FROM read_parquet('{root}/tracks/**/*.parquet', union_by_name=1)"
                  " ORDER BY _seq, timestamp")
    assert plain == [(1.0, 1.0, 1.0, None), (2.0, 2.0, None, None), (1.0, None, 10.0, "late"), (3.0, 3.0, None, None)]
    merged = [r[2:] for r in s.sql(MERGED)]
    assert merged == [(1.0, 1.0, 10.0, "late"), (2.0, 2.0, None, None), (3.0, 3.0, None, None)]


def test_a_replay_after_a_crash_writes_the_same_keys_and_bytes_whatever_the_grouping(tmp_path: Path) -> None:
    s = Setup(tmp_path, archive_roll_rows=1_000_000)
    s.tracks("t", range(0, 10))
    s.tracks("t", range(10, 20))
    state = s.runner.state
    sink = s.sink
    sink.open(state)
    first = s.core.batches(0, 10)
    sink.send(first, state)
    state.discard()
    before = {k: (s.archive / k).read_bytes() for k in s.objects()}
    assert state.get(b"plan"), "the plan is committed before uploading"
    s.tracks("t", range(20, 30))
    again = ArchiveSink(s.cfg)
    s.runner.sink = again
    s.runner._opened = False
    s.drain()
    after = {k: (s.archive / k).read_bytes() for k in s.objects()}
    data = {k: v for k, v in before.items() if k.endswith(".parquet")}
    assert all(after[k] == v for k, v in data.items()), "the planned objects were written again, byte for byte"
    assert again.counters["replayed"] == len(data) and state.get(b"plan") is None
    assert s.sql("SELECT count(*), count(DISTINCT timestamp) FROM read_parquet('{root}/tracks/**/*.parquet')") == [(30, 30)]


def test_a_planned_range_the_cursor_skipped_into_is_deleted_before_anything_else(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.tracks("t", range(0, 5))
    s.tracks("t", range(5, 10))
    state = s.runner.state
    s.sink.open(state)
    s.sink.send(s.core.batches(0, 10), state)
    state.discard()
    planned = [k for k in s.objects() if k.endswith(".parquet")]
    assert planned
    s.runner.skip_to(1)
    s.runner._skip()
    s.drain()
    assert s.sink.counters["deleted"] == len(planned) and not any((s.archive / k).exists() for k in planned)
    assert s.sql("SELECT min(timestamp), count(*) FROM read_parquet('{root}/tracks/**/*.parquet')") == [(5.0, 5)]


def test_objects_roll_by_rows_and_bytes_and_stay_under_the_single_put_limit(tmp_path: Path) -> None:
    s = Setup(tmp_path, archive_roll_rows=400, archive_roll_bytes=64 * 1024)
    s.put(*[(Kind.TRACK, Track("t", float(i), {"s": os.urandom(200).hex(), "v": i * 0.5})) for i in range(900)])
    s.put(*[(Kind.TRACK, Track("t", float(i), {"v": i * 0.5})) for i in range(900, 1000)])
    s.drain()
    objs = [s.archive / k for k in s.objects() if k.endswith(".parquet")]
    sizes = [p.stat().st_size for p in objs]
    rows = [pq.read_metadata(p).num_rows for p in objs]
    assert max(rows) <= 400 and sum(rows) == 1000, rows
    assert len(objs) >= 900 * 400 // (64 * 1024) and max(sizes) <= 64 * 1024 < MAX_OBJECT_BYTES, sizes


def test_remote_only_runs_are_archived_too(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.put((Kind.RUN_OPEN, RunOpen({"local": False})), (Kind.TRACK, Track("t", 1.0, {"a": 1})), prefix="team/p/remote")
    s.put((Kind.RUN_CLOSE, RunClose("completed", None, 0)), prefix="team/p/remote")
    s.drain()
    assert s.sql("SELECT run, a FROM read_parquet('{root}/tracks/**/*.parquet')") == [("team/p/remote", 1.0)]
    assert not (tmp_path / "data" / "team").exists()


def test_a_directory_store_leaves_no_temp_files_and_cleans_those_a_crash_left(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.tracks("t", range(3))
    s.drain()
    tmp_dir = s.archive / ".tmp" / s.sink.writer
    assert list(tmp_dir.iterdir()) == []
    (tmp_dir / "123-torn.parquet.tmp").write_bytes(b"half")
    ArchiveSink(s.cfg).open(s.runner.state)
    assert list(tmp_dir.iterdir()) == []


def test_an_upload_past_its_deadline_is_abandoned_and_its_key_is_guarded_until_it_ends() -> None:
    up = Uploads(0.2)
    release = threading.Event()
    with pytest.raises(SinkRetryable, match=r"took more than 0\.2s"):
        up.run([("k", b"1", lambda: _wait(release))], "upload")
    assert up.busy("k") and up.busy("k", b"2") and not up.busy("k", b"1")
    with pytest.raises(SinkRetryable, match="still runs"):
        up.run([("k", b"2", lambda: None)], "manifest")
    release.set()
    up.abandoned["k"][0].join(5)
    up.run([("k", b"2", lambda: None)], "manifest")
    with pytest.raises(SinkRetryable, match="upload failed: boom"):
        up.run([("x", b"", _boom)], "upload")


def _wait(event: threading.Event) -> None:
    event.wait(10)


def _boom() -> None:
    raise OSError("boom")


def test_names_become_safe_key_segments() -> None:
    assert run_key("alice/robotics/pick-place") == "alice_robotics_pick-place"
    assert series_key("tracks", "robot/state") == "robot_state"
    assert series_key("metrics", "train/loss") == "train_loss" and series_key("metrics", None) == "None"
    odd = series_key("tracks", "50% = ünïcode/x y")
    assert odd == "50_____n_code_x_y" and "%" not in odd and "=" not in odd
    long = run_key("/".join(["p" * 200] * 3))
    assert len(long) <= 100 and long != run_key("/".join(["p" * 200] * 2))


def test_the_archive_is_configured_from_its_uri_and_endpoint() -> None:
    cfg = config.load({"DASHCAR_ARCHIVE_URI": "s3://bkt/fleet/a", "DASHCAR_ARCHIVE_ENDPOINT": "http://127.0.0.1:9000"})
    assert cfg.sink_specs() == ["jsonl", "dash", "archive"]
    sink = load("archive", cfg)
    assert isinstance(sink, ArchiveSink) and sink.target.endpoint == "http://127.0.0.1:9000"
    assert sink.status()["uri"] == "s3://bkt/fleet/a"
    assert parse_uri("s3://bkt", "", {"AWS_ENDPOINT_URL": "http://minio:9000"}).endpoint == "http://minio:9000"
    assert parse_uri("file:///srv/archive").prefix == "/srv/archive"
    for bad in ("gs://b/p", "file://rel/path", "s3://bkt/a%20b", "s3://bkt/x=1", "s3://bkt/a/../b"):
        with pytest.raises(ConfigError):
            parse_uri(bad)
    with pytest.raises(ConfigError, match="archive_roll_bytes"):
        ArchiveSink(config.load({"DASHCAR_ARCHIVE_URI": "file:///x", "DASHCAR_ARCHIVE_ROLL_BYTES": str(20 << 20)}))


def test_rows_no_object_can_hold_are_dead_lettered_and_the_rest_is_archived(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archive, "MAX_OBJECT_BYTES", 256 * 1024)
    s = Setup(tmp_path, archive_roll_bytes=128 * 1024)
    blob = base64.b64encode(os.urandom(400_000)).decode()
    s.put((Kind.TRACK, Track("big", 1.0, {"blob": blob})), (Kind.TRACK, Track("small", 1.0, {"v": 1})))
    s.drain()
    assert s.sql("SELECT name, v FROM read_parquet('{root}/tracks/**/*.parquet')") == [("small", 1.0)]
    lines = [json.loads(x) for x in (tmp_path / "deadletter" / "archive.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and "cannot be archived" in lines[0]["reason"] and lines[0]["item"]["topic"] == "big"
    assert s.runner.status()["dead_letters_by_run"] == {str(tmp_path / "data" / "alice" / "robotics" / "pick-place"): 1}


def test_a_remote_flush_sends_what_the_archive_holds_at_once(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.tracks("t", range(10))
    assert not s.runner.step() and s.objects() == [], "held: 10 frames, the oldest younger than archive_roll_s"
    thread = threading.Thread(target=s.runner.run)
    thread.start()
    try:
        assert s.runner.wait_passed(s.core.out_seq, 20), "a flush waiting for the archive releases the hold"
        assert s.sql("SELECT count(*) FROM read_parquet('{root}/tracks/**/*.parquet')") == [(10,)]
    finally:
        s.runner.stop()
        thread.join(20)


# ----------------------------------------------------------------------------- files
RUN = "alice/robotics/pick-place"
INDEX = """
    WITH ev AS (SELECT * FROM read_parquet('{root}/file_events/**/*.parquet', hive_partitioning = true)),
    f AS (SELECT * FROM ev WHERE op IN ('put', 'copy') AND lost IS NULL AND NOT coalesce(superseded, false)
          AND id NOT IN (SELECT replaces FROM ev WHERE replaces IS NOT NULL)),
    u AS (SELECT id, last(description ORDER BY _seq, _index) FILTER (list_contains(updated, 'description')) AS description,
                 last(tags ORDER BY _seq, _index) FILTER (list_contains(updated, 'tags')) AS tags,
                 last(metadata ORDER BY _seq, _index) FILTER (list_contains(updated, 'metadata')) AS metadata,
                 bool_or(list_contains(updated, 'description')) AS d, bool_or(list_contains(updated, 'tags')) AS t,
                 bool_or(list_contains(updated, 'metadata')) AS m
          FROM ev WHERE op = 'update' GROUP BY id),
    d AS (SELECT id, min(time) AS deleted_at FROM ev WHERE op = 'delete' GROUP BY id)
    SELECT f.run, f.id, f.path, f.filename, f.object_key, f.size, f.sha256, f.content_type,
           CASE WHEN u.d THEN u.description ELSE f.description END,
           CASE WHEN u.t THEN u.tags ELSE f.tags END,
           CASE WHEN u.m THEN u.metadata ELSE f.metadata END,
           d.deleted_at IS NOT NULL
    FROM f LEFT JOIN u USING (id) LEFT JOIN d USING (id) ORDER BY f.path, f.filename, f.id
"""
"""The run's file index, as the JSONL sink keeps it, from the ``file_events`` table (docs/remote.md has it)."""


def _put(fid: str, path: str, name: str, source: list[Any], t: float, **meta: Any) -> tuple[Kind, Any]:
    return Kind.FILE_PUT, FilePut(fid, path, name, source, {"time": t, **meta})


def _path_source(p: Path) -> list[Any]:
    st = p.stat()
    return ["path", str(p), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def _spool(s: Setup, name: str, data: bytes) -> list[Any]:
    d = Path(spool_dir(s.root + "/" + RUN))
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)
    return ["spool", name]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_files_ship_as_objects_and_the_file_events_table_gives_the_run_s_index(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    model = os.urandom(300_000)
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(model)
    big = os.urandom(200_000)
    gone = tmp_path / "gone.bin"
    gone.write_bytes(b"soon gone")
    s.put((Kind.RUN_OPEN, RunOpen({})))
    s.put(_put("101", "/models", "model.pt", _path_source(ckpt), 10.0, tags=["best"], metadata={"epoch": 3},
               content_type="application/x-torch"),
          _put("102", "/configs", "config.json", ["inline", b'{"lr": 0.1}'], 11.0, description="cfg"),
          _put("103", "/data", "big.bin", _spool(s, "103", big), 12.0, size=len(big)),
          _put("104", "/", "gone.bin", _path_source(gone), 13.0))
    gone.unlink()
    s.put((Kind.FILE_COPY, FileCopy("105", "101", "/models", "latest.pt", {"time": 14.0})),
          (Kind.FILE_UPDATE, FileUpdate("102", {"description": "config", "tags": ["a", "b"]}, 15.0)),
          (Kind.FILE_DELETE, FileDelete("103", 16.0)),
          _put("106", "/configs", "config.json", ["inline", b'{"lr": 0.2}'], 17.0),
          (Kind.FILE_COPY, FileCopy("107", "999", "/", "orphan.bin", {"time": 18.0})),
          (Kind.FILE_UPDATE, FileUpdate("888", {"description": "x"}, 19.0)))
    s.put((Kind.RUN_CLOSE, RunClose("completed", None, 0)))
    s.drain()
    key = "files/run_dir=alice_robotics_pick-place"
    stored = {k: (s.archive / k).read_bytes() for k in s.objects() if k.startswith("files/")}
    assert stored == {f"{key}/101/model.pt": model, f"{key}/102/config.json": b'{"lr": 0.1}', f"{key}/103/big.bin": big,
                      f"{key}/105/latest.pt": model, f"{key}/106/config.json": b'{"lr": 0.2}'}
    assert os.stat(s.archive / key / "101/model.pt").st_ino == os.stat(s.archive / key / "105/latest.pt").st_ino, \
        "a copy in a directory store is a hard link (a server-side copy on S3)"
    index = s.sql(INDEX)
    assert index == [
        (RUN, "106", "/configs", "config.json", f"{key}/106/config.json", 11, _sha(b'{"lr": 0.2}'), "application/octet-stream",
         None, [], None, False),
        (RUN, "103", "/data", "big.bin", f"{key}/103/big.bin", len(big), _sha(big), "application/octet-stream", None, [], None,
         True),
        (RUN, "105", "/models", "latest.pt", f"{key}/105/latest.pt", len(model), _sha(model), "application/octet-stream",
         None, [], None, False),
        (RUN, "101", "/models", "model.pt", f"{key}/101/model.pt", len(model), _sha(model), "application/x-torch", None,
         ["best"], '{"epoch":3}', False),
    ], "102 was overwritten by 106 (same path and name); 103 is deleted; 104 and 107 were lost"
    lost = s.sql("SELECT id, op, lost, object_key FROM read_parquet('{root}/file_events/**/*.parquet') WHERE lost IS NOT NULL"
                 " ORDER BY id")
    assert lost == [("104", "put", "vanished", None), ("107", "copy", "no_source", None)]
    assert s.sql("SELECT id, replaces FROM read_parquet('{root}/file_events/**/*.parquet') WHERE replaces IS NOT NULL") \
        == [("106", "102")]
    upd = s.sql("SELECT id, updated, description, tags FROM read_parquet('{root}/file_events/**/*.parquet') WHERE op = 'update'")
    assert upd == [("102", ["description", "tags"], "config", ["a", "b"])]
    times = s.sql("SELECT id, epoch(time) FROM read_parquet('{root}/file_events/**/*.parquet') ORDER BY _seq, _index")
    assert [t for _, t in times] == [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0, 18.0], "the calls' times, in call order"
    st = s.sink.status()
    assert (st["files_shipped"], st["file_bytes"], st["files_lost"]) == (5, 2 * len(model) + len(big) + 22, 2)
    assert st["files_lost_by_reason"] == {"vanished": 1, "no_source": 1}
    assert st["files_lost_by_run"] == {s.root + "/" + RUN: 2}
    assert st["file_ops_no_target"] == 1
    manifest = next(k for k in s.objects() if k.startswith("runs/"))
    doc = json.loads((s.archive / manifest).read_text())
    assert doc["files"]["files_shipped"] == 5 and doc["files"]["files_lost_vanished"] == 1 and doc["files"]["live"] == 3
    assert doc["file_events"]["rows"] == 9 and doc["file_events"]["objects"] >= 1


def test_a_copy_whose_source_comes_later_waits_for_it(tmp_path: Path) -> None:
    """A frame re-sent after an agent restart lands after later ones: a duplicate waits for its source."""
    s = Setup(tmp_path)
    s.put((Kind.FILE_COPY, FileCopy("2", "1", "/", "b.txt", {"time": 2.0})))
    s.drain()
    assert not [k for k in s.objects() if k.startswith("files/")]
    s.put(_put("1", "/", "a.txt", ["inline", b"hello"], 1.0))
    s.drain()
    got = s.sql("SELECT id, op, source_id, sha256 FROM read_parquet('{root}/file_events/**/*.parquet') ORDER BY time")
    assert got == [("1", "put", None, _sha(b"hello")), ("2", "copy", "1", _sha(b"hello"))]
    assert (s.archive / "files/run_dir=alice_robotics_pick-place/2/b.txt").read_bytes() == b"hello"


def test_a_replay_after_a_crash_ships_files_to_the_same_keys_and_rows_once(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    data = os.urandom(100_000)
    s.put(_put("1", "/m", "a.bin", _spool(s, "1", data), 1.0, size=len(data)),
          _put("2", "/m", "b.txt", ["inline", b"b"], 2.0))
    s.put((Kind.FILE_COPY, FileCopy("3", "1", "/m", "c.bin", {"time": 3.0})), (Kind.FILE_DELETE, FileDelete("2", 4.0)))
    state = s.runner.state
    s.sink.open(state)
    s.sink.send(s.core.batches(0, 10), state)
    state.discard()  # the agent died before its commit: every object is stored, the cursor did not move
    before = {k: (s.archive / k).read_bytes() for k in s.objects()}
    assert state.get(b"plan"), "the plan was committed before anything was uploaded"
    assert {k for k in before if k.startswith("files/")} == {f"files/run_dir=alice_robotics_pick-place/{k}"
                                                               for k in ("1/a.bin", "2/b.txt", "3/c.bin")}
    again = ArchiveSink(s.cfg)
    s.runner.sink = again
    s.runner._opened = False
    s.drain()
    after = {k: (s.archive / k).read_bytes() for k in s.objects()}
    assert {k: v for k, v in after.items() if not k.startswith("runs/")} == \
        {k: v for k, v in before.items() if not k.startswith("runs/")}, "the same keys, byte for byte"
    rows = s.sql("SELECT id, op, count(*) FROM read_parquet('{root}/file_events/**/*.parquet') GROUP BY ALL ORDER BY id, op")
    assert rows == [("1", "put", 1), ("2", "delete", 1), ("2", "put", 1), ("3", "copy", 1)]
    assert again.status()["files_shipped"] == 3 and state.get(b"plan") is None


def test_a_range_the_cursor_skipped_into_loses_its_file_objects_too(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.put(_put("1", "/", "a.txt", ["inline", b"a"], 1.0))
    s.put(_put("2", "/", "b.txt", ["inline", b"b"], 2.0))
    state = s.runner.state
    s.sink.open(state)
    s.sink.send(s.core.batches(0, 10), state)
    state.discard()
    assert len([k for k in s.objects() if k.startswith("files/")]) == 2
    s.runner.skip_to(1)
    s.runner._skip()
    s.drain()
    assert [k for k in s.objects() if k.startswith("files/")] == ["files/run_dir=alice_robotics_pick-place/2/b.txt"]
    assert s.sql("SELECT id FROM read_parquet('{root}/file_events/**/*.parquet')") == [("2",)]


def test_a_large_file_is_streamed_never_held_whole_in_memory(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(48):
            f.write(os.urandom(1 << 20))
    h = hashlib.sha256(big.read_bytes()).hexdigest()
    s.put(_put("1", "/", "big.bin", _path_source(big), 1.0))
    tracemalloc.start()
    try:
        s.drain()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 << 20, f"peak {peak} bytes for a 48 MiB file"
    assert s.sql("SELECT size, sha256 FROM read_parquet('{root}/file_events/**/*.parquet')") == [(48 << 20, h)]
    assert (s.archive / "files/run_dir=alice_robotics_pick-place/1/big.bin").stat().st_size == 48 << 20


def test_a_file_changed_after_the_call_ships_what_was_read_and_is_counted(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    p = tmp_path / "ckpt.pt"
    p.write_bytes(b"epoch 1")
    src = _path_source(p)
    p.write_bytes(b"epoch 2, longer")
    s.put(_put("1", "/", "ckpt.pt", src, 1.0))
    s.drain()
    assert s.sql("SELECT sha256, changed_after_call FROM read_parquet('{root}/file_events/**/*.parquet')") == \
        [(_sha(b"epoch 2, longer"), True)]
    assert s.sink.status()["files_changed_after_call"] == 1
