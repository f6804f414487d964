"""Hostile input is rejected with a reason and counted; the agent keeps serving everyone else.

Ingest refuses what is no v1 message; the core refuses the rest before it touches anything.
A forged array extension is malformed; a coalesced message with one bad frame is refused whole."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import zmq

import dashcar
from dashcar.proto import FILE_INLINE_MAX_BYTES, INGEST_SOCKET, MAX_FRAME_BYTES, PROTOCOL_VERSION, Kind, coalesce
from tests.conftest import AgentHandle, read_json, read_jsonl, wait_until


def test_bad_frames_are_rejected_counted_and_contained(agent: AgentHandle, dirs: Path) -> None:
    root = str(agent.data_dir)
    v = PROTOCOL_VERSION
    bad = [
        (b"\xff\x00garbage", "malformed"),
        (b"", "malformed"),
        (msgpack.packb([v + 1, Kind.FLUSH, 1, 2, root, "a/b", 1, [0]]), "version"),
        (b"\x98" + b"x" * (MAX_FRAME_BYTES + 1), "oversized"),
        (msgpack.packb([v, Kind.TRACK, 1, 2, root, "../../etc", 1, ["t", 1.0, {}]]), "name"),
        (msgpack.packb([v, Kind.TRACK, 1, 2, root, "a/b", 1, ["../../x", 1.0, {}]]), "name"),
        (msgpack.packb([v, Kind.METRIC, 1, 2, root, "a/b", 1, ["m/../../../x", [{}], "metrics"]]), "name"),
        (msgpack.packb([v, Kind.METRIC, 1, 2, root, "a/b", 1, ["m", [{}], "../etc"]]), "malformed"),
        (msgpack.packb([v, Kind.TRACK, 1, 2, "relative", "a/b", 1, ["t", 1.0, {}]]), "name"),
        (msgpack.packb([v, Kind.PRODUCER_GONE, 1, 2, root, "a/b", 1, [0, 0]]), "malformed"),
        (msgpack.packb([v, Kind.TRACK, 1, 2, root, "a/b", 1, ["t", float("nan"), {}]]), "malformed"),
        (msgpack.packb([v, Kind.TRACK, 1, 2, root, "a/b", 1,
                        ["t", 1.0, {"v": msgpack.ExtType(1, b"d\x01\x05\x00\x00\x00" + bytes(8))}]]),
         "malformed"),
        (coalesce([msgpack.packb([v, Kind.TRACK, 1, 2, root, "a/b", 1, ["t", 1.0, {}]]),
                   msgpack.packb([v, Kind.TRACK, 1, 2, root, "../x", 2, ["t", 1.0, {}]])]), "name"),
        (msgpack.packb([v, Kind.TRACK, 1, 2, root, "a/b", 1, ["t", 1.0, {}]])
         + msgpack.packb([v, Kind.TRACK, 1, 2, root, "a/b", 2, ["t", 2.0, {}]]), "malformed"),
    ]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(f"ipc://{agent.runtime_dir / INGEST_SOCKET}")
    for raw, _ in bad:
        sock.send(raw)
    sock.close()
    ctx.term()
    expected: dict[str, int] = {}
    for _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    expected["name"] += 1  # the coalesced message's two frames are refused together
    st = wait_until(lambda: (f := agent.status()["frames"])["rejected"] >= len(bad) + 1 and f, 10, "bad frames rejected")
    assert st["rejected_by"] == expected and st["rejected"] == len(bad) + 1 and st["written"] == 0
    exp = dashcar.Experiment(prefix="ok/after/bad", dash_root=agent.data_dir)
    with exp.run:
        exp.tracks("t").append(x=1, _ts=1.0)
    assert read_jsonl(exp.run_dir / "tracks" / "t" / "data.jsonl") == [{"timestamp": 1.0, "x": 1}]
    written = {p for p in dirs.rglob("*") if p.is_file()}
    assert all(agent.data_dir in p.parents or p.is_relative_to(agent.state_dir) or p.is_relative_to(agent.runtime_dir)
               or p.name == "agent.log" for p in written)
    assert not (dirs / "etc").exists() and not (dirs / "x").exists()


def test_hostile_file_frames_are_refused_or_contained(agent: AgentHandle, dirs: Path) -> None:
    """File frames can neither leave the run nor make the agent read, link or delete what they point at
    through a planted symlink; what they name and cannot have is a counted loss, never a crash."""
    root = str(agent.data_dir)
    v, pid = PROTOCOL_VERSION, os.getpid()
    victim_dir = dirs / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "secret"
    victim.write_bytes(b"keep me")
    (victim_dir / "x").write_bytes(b"keep me too")
    link_run = agent.data_dir / "evil" / "link"
    (link_run / "files" / ".incoming").mkdir(parents=True)
    os.symlink(victim, link_run / "files" / ".incoming" / "evil")
    dir_run = agent.data_dir / "evil" / "dir"
    (dir_run / "files").mkdir(parents=True)
    os.symlink(victim_dir, dir_run / "files" / ".incoming")
    fifo = dirs / "fifo"
    os.mkfifo(fifo)
    other = agent.data_dir / "evil" / "other"
    (other / "files").mkdir(parents=True)
    other_index = '{"files": [{"id": "42", "path": "/", "filename": "o.txt", "deletedAt": null}]}'
    (other / "files" / ".files_metadata.json").write_text(other_index)

    def frame(sid: int, prefix: str, seq: int, kind: int, payload: object) -> bytes:
        return msgpack.packb([v, kind, sid, pid, root, prefix, seq, payload])

    refused = [
        (frame(1, "evil/a", 1, Kind.FILE_PUT, ["1", "/../../../x", "f", ["inline", b"x"], {"time": 1}]), "name"),
        (frame(1, "evil/a", 2, Kind.FILE_PUT, ["1", "/a", "../f", ["inline", b"x"], {"time": 1}]), "name"),
        (frame(1, "evil/a", 3, Kind.FILE_PUT, ["1", "/a", "f", ["spool", "../../../../victim/secret"], {"time": 1}]), "name"),
        (frame(1, "evil/a", 4, Kind.FILE_PUT, ["../../x", "/a", "f", ["inline", b"x"], {"time": 1}]), "name"),
        (frame(1, "evil/a", 5, Kind.FILE_DELETE, ["../42", 1.0]), "name"),
        (frame(1, "evil/a", 6, Kind.TRACK, ["t", 1.0, {"b": b"bytes"}]), "malformed"),
        (frame(1, "evil/a", 7, Kind.FILE_PUT, ["1", "/a", "f", ["inline", b"x"], {"time": 1, "metadata": {"b": b"x"}}]),
         "malformed"),
        (frame(1, "evil/a", 8, Kind.FILE_PUT, ["1", "/a", "f", ["inline", bytes(FILE_INLINE_MAX_BYTES + 1)], {"time": 1}]),
         "malformed"),
        (coalesce([frame(1, "evil/a", 9, Kind.FILE_PUT, ["1", "/a", "f", ["inline", b"x"], {"time": 1}])]), "malformed"),
    ]
    contained = [
        frame(2, "evil/link", 1, Kind.FILE_PUT, ["10", "/", "f", ["spool", "evil"], {"time": 1}]),
        frame(2, "evil/link", 2, Kind.FILE_COPY, ["11", "42", "/", "stolen.txt", {"time": 1}]),
        frame(2, "evil/link", 3, Kind.FILE_DELETE, ["42", 1.0]),
        frame(2, "evil/link", 4, Kind.RUN_CLOSE, ["completed", None, 0]),
        frame(3, "evil/dir", 1, Kind.FILE_PUT, ["20", "/", "f", ["spool", "x"], {"time": 1}]),
        frame(3, "evil/dir", 2, Kind.FILE_PUT, ["21", "/", "p", ["path", str(fifo), 0, 0, 0, 0], {"time": 1}]),
        frame(3, "evil/dir", 3, Kind.FILE_PUT, ["22", "/", "q", ["path", str(dirs / "nothing"), 0, 0, 0, 0], {"time": 1}]),
        frame(3, "evil/dir", 4, Kind.RUN_CLOSE, ["completed", None, 0]),
    ]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(f"ipc://{agent.runtime_dir / INGEST_SOCKET}")
    for raw in [r for r, _ in refused] + contained:
        sock.send(raw)
    sock.close()
    ctx.term()
    expected: dict[str, int] = {}
    for _, reason in refused:
        expected[reason] = expected.get(reason, 0) + 1
    st = wait_until(lambda: (f := agent.status()["frames"])["rejected"] >= len(refused) and f, 10, "bad file frames rejected")
    assert st["rejected_by"] == expected
    for run in (link_run, dir_run):
        wait_until(lambda run=run: (read_json(run / "experiment.json") or {}).get("status") == "completed", 20, f"{run} closed")
    link_counters = read_json(link_run / "experiment.json")["dashcar"]["counters"]
    assert link_counters["files_lost_not_regular"] == 1 and link_counters["files_lost_no_source"] == 1
    assert link_counters["file_ops_no_target"] == 1, "a delete of another run's file touches nothing"
    dir_counters = read_json(dir_run / "experiment.json")["dashcar"]["counters"]
    assert dir_counters["files_lost_not_regular"] == 2 and dir_counters["files_lost_vanished"] == 1
    assert (other / "files" / ".files_metadata.json").read_text() == other_index
    wait_until(lambda: not (link_run / "files" / ".incoming" / "evil").is_symlink(), 20, "the planted link released")
    assert victim.read_bytes() == b"keep me" and (victim_dir / "x").read_bytes() == b"keep me too"
    assert (dir_run / "files" / ".incoming").is_symlink(), "a symlinked spool dir is never followed"
    assert not list((link_run / "files").rglob("f")) and not list((dir_run / "files").glob("2*"))
    exp = dashcar.Experiment(prefix="ok/after/files", dash_root=agent.data_dir, echo_logs=False)
    with exp.run:
        exp.files.save_text("fine", to="ok.txt")
    assert exp.files("ok.txt").read_text() == "fine"
    outside = {p for p in dirs.rglob("*") if p.is_file() and not (
        agent.data_dir in p.parents or p.is_relative_to(agent.state_dir) or p.is_relative_to(agent.runtime_dir))}
    assert outside == {victim, victim_dir / "x", dirs / "agent.log"}
