"""File frames: each round-trips; names never leave the run; binary only as a bounded inline content."""

from __future__ import annotations

import msgpack
import pytest

from dashcar import proto
from dashcar.proto import (
    FILE_INLINE_MAX_BYTES,
    PROTOCOL_VERSION,
    DecodeError,
    FileCopy,
    FileDelete,
    FilePut,
    FileUpdate,
    Frame,
    InvalidName,
    Kind,
    ProtocolError,
    check_record,
    coalesce,
    decode,
    encode,
)
from dashcar.proto._frames import Payload

ROOT, PREFIX = "/data/.dash", "alice/robotics/run1"
META = {"time": 1.5, "description": "best", "tags": ["a"], "bindrs": [], "metadata": {"epoch": 3}, "content_type": "x/y",
        "size": 3}

GOOD: list[tuple[Kind, Payload]] = [
    (Kind.FILE_PUT, FilePut("123", "/models", "model.pt", ["inline", b"abc"], META)),
    (Kind.FILE_PUT, FilePut("124", "/", "a.bin", ["inline", bytes(FILE_INLINE_MAX_BYTES)], {"time": 1})),
    (Kind.FILE_PUT, FilePut("125", "/a/b", "c.pt", ["spool", "125"], {"time": 2.0})),
    (Kind.FILE_PUT, FilePut("126", "/a", "c.pt", ["path", "/home/u/c.pt", 10, 1_700_000_000_000_000_000, 5, 66], {"time": 2.0})),
    (Kind.FILE_COPY, FileCopy("127", "123", "/models", "latest.pt", {"time": 3.0, "tags": []})),
    (Kind.FILE_UPDATE, FileUpdate("123", {"description": "d", "tags": ["t"], "metadata": None}, 4.0)),
    (Kind.FILE_DELETE, FileDelete("123", 5.0)),
]


def _frame(kind: int, payload: object, seq: int = 1) -> bytes:
    return msgpack.packb([PROTOCOL_VERSION, kind, 1, 2, ROOT, PREFIX, seq, payload])


@pytest.mark.parametrize(("kind", "payload"), GOOD, ids=[f"{k.name}-{i}" for i, (k, _) in enumerate(GOOD)])
def test_file_frames_round_trip_and_pass_the_cores_check(kind: Kind, payload: Payload) -> None:
    frame = Frame(kind, 1, 2, ROOT, PREFIX, 7, payload)
    data = encode(frame)
    assert decode(data) == frame
    assert check_record(data)[0][7] == list(payload)


BAD: list[tuple[str, int, object, type[ProtocolError]]] = [
    ("dotdot path", Kind.FILE_PUT, ["1", "/a/../../x", "f", ["inline", b""], {"time": 1}], InvalidName),
    ("absolute name", Kind.FILE_PUT, ["1", "/a", "/etc/passwd", ["inline", b""], {"time": 1}], InvalidName),
    ("name with slash", Kind.FILE_PUT, ["1", "/a", "b/c", ["inline", b""], {"time": 1}], InvalidName),
    ("nul in name", Kind.FILE_PUT, ["1", "/a", "b\x00", ["inline", b""], {"time": 1}], InvalidName),
    ("id escapes", Kind.FILE_PUT, ["..", "/a", "f", ["inline", b""], {"time": 1}], InvalidName),
    ("id with slash", Kind.FILE_DELETE, ["1/../../x", 1.0], InvalidName),
    ("spool path, not a name", Kind.FILE_PUT, ["1", "/a", "f", ["spool", "/etc/passwd"], {"time": 1}], InvalidName),
    ("spool dotdot", Kind.FILE_PUT, ["1", "/a", "f", ["spool", ".."], {"time": 1}], InvalidName),
    ("relative source path", Kind.FILE_PUT, ["1", "/a", "f", ["path", "x/y", 1, 1, 1, 1], {"time": 1}], InvalidName),
    ("the spool dir as a path", Kind.FILE_PUT, ["1", "/.incoming", "f", ["inline", b""], {"time": 1}], InvalidName),
    ("unknown source", Kind.FILE_PUT, ["1", "/a", "f", ["url", "http://x"], {"time": 1}], DecodeError),
    ("inline too large", Kind.FILE_PUT, ["1", "/a", "f", ["inline", bytes(FILE_INLINE_MAX_BYTES + 1)], {"time": 1}],
     DecodeError),
    ("inline as str", Kind.FILE_PUT, ["1", "/a", "f", ["inline", "text"], {"time": 1}], DecodeError),
    ("bytes in metadata", Kind.FILE_PUT, ["1", "/a", "f", ["inline", b""], {"time": 1, "metadata": {"k": [b"x"]}}],
     DecodeError),
    ("bytes as description", Kind.FILE_PUT, ["1", "/a", "f", ["inline", b""], {"time": 1, "description": b"x"}], DecodeError),
    ("bytes as the id", Kind.FILE_PUT, [b"1", "/a", "f", ["inline", b""], {"time": 1}], InvalidName),
    ("no time", Kind.FILE_PUT, ["1", "/a", "f", ["inline", b""], {}], DecodeError),
    ("bytes in a copy", Kind.FILE_COPY, ["2", "1", "/a", "f", {"time": 1, "metadata": {"b": b"x"}}], DecodeError),
    ("unknown update field", Kind.FILE_UPDATE, ["1", {"path": "/x"}, 1.0], DecodeError),
    ("tags not str", Kind.FILE_UPDATE, ["1", {"tags": [1]}, 1.0], DecodeError),
    ("bytes in a track", Kind.TRACK, ["t", 1.0, {"b": b"x"}], DecodeError),
]


@pytest.mark.parametrize(("why", "kind", "payload", "error"), BAD, ids=[b[0] for b in BAD])
def test_hostile_file_frames_are_refused(why: str, kind: int, payload: object, error: type[ProtocolError]) -> None:
    data = _frame(kind, payload)
    with pytest.raises(error):
        decode(data)
    with pytest.raises(error):
        check_record(data)


def test_binary_is_refused_in_a_coalesced_message_even_in_a_file_put() -> None:
    put = _frame(Kind.FILE_PUT, ["1", "/a", "f", ["inline", b"abc"], {"time": 1}])
    track = _frame(Kind.TRACK, ["t", 1.0, {}], 2)
    with pytest.raises(DecodeError):
        check_record(coalesce([track, put]))


def test_file_paths_map_inside_the_runs_files_dir() -> None:
    assert proto.file_dir("models/") == "/models" and proto.file_dir("/") == "/" and proto.file_dir("") == "/"
    assert proto.stored_file_path("/d/a/b", "/models", "12", "m.pt") == "/d/a/b/files/models/12/m.pt"
    assert proto.stored_file_path("/d/a/b", "/", "12", "m.pt") == "/d/a/b/files/12/m.pt"
    assert proto.spool_dir("/d/a/b") == "/d/a/b/files/.incoming"
