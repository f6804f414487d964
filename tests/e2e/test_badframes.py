"""Hostile input is rejected with a reason and counted; the agent keeps serving everyone else.

Ingest refuses what is no v1 message; the core refuses the rest before it touches anything.
A forged array extension is malformed; a coalesced message with one bad frame is refused whole."""

from __future__ import annotations

from pathlib import Path

import msgpack
import zmq

import dashcar
from dashcar.proto import INGEST_SOCKET, MAX_FRAME_BYTES, PROTOCOL_VERSION, Kind, coalesce
from tests.conftest import AgentHandle, read_jsonl, wait_until


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
