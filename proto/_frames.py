"""Frames: the unit the SDK sends and the agent stores, and their encoding.

The frame and payload types are named tuples: immutable, and an order of magnitude cheaper
to define than dataclasses, which matters because ``import dashcar`` loads this module.

A frame is one ZeroMQ message holding one msgpack array::

    [version, kind, sid, pid, root, prefix, seq, payload]

- ``version`` is ``PROTOCOL_VERSION``; it is checked before anything else.
- ``sid`` is a random 63-bit producer id, one per (process, thread) socket, renewed after
  ``fork()``; ``seq`` starts at 1 and rises by one per frame the producer handed to ZeroMQ,
  so a gap seen by the agent is a frame lost after it left the producer.
- ``pid`` is the producing process, watched by the agent to close runs of dead producers.
- ``root`` and ``prefix`` name the run (its directory is ``root/prefix``), so every frame is
  self-describing: a forked child or a producer whose ``RUN_OPEN`` was lost still lands.
- ``payload`` depends on ``kind`` (see the classes below).

File frames (``FILE_PUT``, ``FILE_COPY``, ``FILE_UPDATE``, ``FILE_DELETE``) carry ids the SDK
made, logical paths and names that follow the layout's naming rules (``file_dir_parts``,
``check_file_name``), and for ``FILE_PUT`` where the bytes are: inline (msgpack ``bin``, at most
``FILE_INLINE_MAX_BYTES``: the only place ``bin`` is admitted, and only in a frame of that kind
sent alone), a spool file named by a single name inside the run's spool directory, or the
caller's absolute path with its ``stat`` at the call (the agent only reads it). No field can
name a place outside the run directory.

The first seven elements of a producer's frames for one run and kind never change, so the
SDK packs them once (``frame_head``) and per call packs only ``seq`` and the payload.
``decode`` never trusts its input: sizes are bounded, binary and extension types are refused
but for numpy arrays (see ``_ndarray``; they decode to lists), so every value is a JSON value,
and any failure surfaces as a ``ProtocolError``.
"""

from __future__ import annotations

import enum
import math
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeAlias

import msgpack

from ._constants import FILE_INLINE_MAX_BYTES, MAX_CONTAINER_LEN, MAX_FRAME_BYTES, PROTOCOL_VERSION
from ._errors import DecodeError, FrameTooLarge, InvalidName, ProtocolError, UnsupportedVersion
from ._names import check_file_id, check_file_name, check_prefix, check_root, file_dir_parts, metric_dir_parts, track_dir_name
from ._ndarray import check_ext, ext_to_list

if TYPE_CHECKING:
    from typing import TypedDict

    class _Limits(TypedDict):
        max_bin_len: int
        max_ext_len: int
        max_array_len: int
        max_map_len: int


class Kind(enum.IntEnum):
    """Frame kinds of protocol v1; values from ``FIRST_INTERNAL_KIND`` never cross the wire."""

    RUN_OPEN = 1
    PARAMS = 2
    METRIC = 3
    TRACK = 4
    LOG = 5
    FLUSH = 6
    RUN_CLOSE = 7
    META = 8
    FILE_PUT = 9
    FILE_COPY = 10
    FILE_UPDATE = 11
    FILE_DELETE = 12
    PRODUCER_GONE = 64


FIRST_INTERNAL_KIND = 64


RUN_STATUSES = ("completed", "failed", "cancelled", "crashed")
SERIES_FOLDERS = ("metrics", "tracks")
"""Where index-based series live: ML-Dash metrics, or DreamLake session tracks."""
META_TARGETS = ("metric", "series", "track")
"""What a ``Meta`` frame describes: a metric, a DreamLake series, or a timestamped track topic."""


class RunOpen(NamedTuple):
    """A producer starts (or re-attaches to) a run; ``info`` lands in ``experiment.json``."""

    info: dict[str, Any]


class Params(NamedTuple):
    """Parameters to merge into ``parameters.json`` (nested dicts, flattened by the agent)."""

    data: dict[str, Any]


class Metric(NamedTuple):
    """Points of one index-based series (``name`` None is the unnamed metric) under ``folder``."""

    name: str | None
    points: list[dict[str, Any]]
    folder: str = "metrics"


class Meta(NamedTuple):
    """Description, tags and metadata of a metric, series or track, kept in its ``metadata.json``."""

    target: str
    name: str | None
    info: dict[str, Any]


class Track(NamedTuple):
    """One track entry; entries of a topic with an equal ``ts`` merge into one row."""

    topic: str
    ts: float
    fields: dict[str, Any]


class Log(NamedTuple):
    """One log line; ``time`` is the producer's wall clock in seconds."""

    message: str
    level: str
    time: float
    metadata: dict[str, Any] | None


class Flush(NamedTuple):
    """Barrier: settle and write everything this producer sent before it, then acknowledge."""

    dropped: int


class RunClose(NamedTuple):
    """The producer is done with the run; ``dropped`` is its count of frames it could not send."""

    status: str
    reason: str | None
    dropped: int


class ProducerGone(NamedTuple):
    """Written by the agent itself: the producer process ended.

    ``last_sent``, ``dropped`` and ``pending`` are the producer's own counters as it last wrote
    them to its counter file, so frames that died in its send queue or coalescing buffer are
    counted too (0 if unknown).
    """

    last_sent: int
    dropped: int
    pending: int = 0


FILE_SOURCES = ("inline", "spool", "path")
"""Where a ``FilePut``'s bytes are: in the frame, in the run's spool dir, or at the caller's path."""
FILE_META_KEYS = ("description", "tags", "bindrs", "metadata", "content_type", "size", "time")
FILE_UPDATE_KEYS = ("description", "tags", "metadata")


class FilePut(NamedTuple):
    """Store a file as ``path``/``filename`` under the new id ``id``.

    ``source``: ``["inline", bytes]``, ``["spool", name]`` (a file the SDK wrote into the run's
    spool dir) or ``["path", abspath, size, mtime_ns, ino, dev]`` (the caller's file and its
    ``stat`` at the call). ``meta``: ``time`` (the call, epoch s) and optional ``description``,
    ``tags``, ``bindrs``, ``metadata``, ``content_type``, ``size``.
    """

    id: str
    path: str
    filename: str
    source: list[Any]
    meta: dict[str, Any]


class FileCopy(NamedTuple):
    """``duplicate``: store the bytes of file ``source_id`` as ``path``/``filename`` under ``id``."""

    id: str
    source_id: str
    path: str
    filename: str
    meta: dict[str, Any]


class FileUpdate(NamedTuple):
    """Replace the ``description``, ``tags`` or ``metadata`` given in ``fields`` of file ``id``."""

    id: str
    fields: dict[str, Any]
    time: float


class FileDelete(NamedTuple):
    """Soft-delete file ``id`` (its bytes stay; the index marks it deleted at ``time``)."""

    id: str
    time: float


Payload: TypeAlias = (
    RunOpen | Params | Metric | Track | Log | Flush | RunClose | Meta | FilePut | FileCopy | FileUpdate | FileDelete
    | ProducerGone
)


class Frame(NamedTuple):
    """A decoded, validated frame."""

    kind: Kind
    sid: int
    pid: int
    root: str
    prefix: str
    seq: int
    payload: Payload


def frame_head(kind: int, sid: int, pid: int, root: str, prefix: str) -> bytes:
    """The packed, constant first part of every frame with these identities."""
    pack = msgpack.packb
    return b"\x98" + pack(PROTOCOL_VERSION) + pack(kind) + pack(sid) + pack(pid) + pack(root) + pack(prefix)


def _wire_payload(payload: Payload) -> object:
    if isinstance(payload, RunOpen):
        return payload.info
    if isinstance(payload, Params):
        return payload.data
    if isinstance(payload, Metric):
        return [payload.name, payload.points, payload.folder]
    if isinstance(payload, Meta):
        return [payload.target, payload.name, payload.info]
    if isinstance(payload, Track):
        return [payload.topic, payload.ts, payload.fields]
    if isinstance(payload, Log):
        return [payload.message, payload.level, payload.time, payload.metadata]
    if isinstance(payload, Flush):
        return [payload.dropped]
    if isinstance(payload, RunClose):
        return [payload.status, payload.reason, payload.dropped]
    if isinstance(payload, (FilePut, FileCopy, FileUpdate, FileDelete)):
        return list(payload)
    return [payload.last_sent, payload.dropped, payload.pending]


def encode(frame: Frame) -> bytes:
    """Encode a frame exactly as the SDK's hot path does."""
    head = frame_head(frame.kind, frame.sid, frame.pid, frame.root, frame.prefix)
    return head + msgpack.packb(frame.seq) + msgpack.packb(_wire_payload(frame.payload))


_unpackb = msgpack.unpackb
_isfinite = math.isfinite
"""Strings need no limit of their own: none can be longer than the (bounded) frame."""


def _int(value: object, what: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise DecodeError(f"{what} must be an int in [{lo}, {hi}]")
    return value


def _str(value: object, what: str) -> str:
    if type(value) is not str:
        raise DecodeError(f"{what} must be a str")
    return value


def _map(value: object, what: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise DecodeError(f"{what} must be a map")
    return value


def _number(value: object, what: str) -> float:
    if type(value) is float and math.isfinite(value):
        return value
    if type(value) is int:
        return float(value)
    raise DecodeError(f"{what} must be a finite number")


def _list(value: object, n: int, what: str) -> list[Any]:
    if type(value) is not list or len(value) != n:
        raise DecodeError(f"{what} must be an array of {n}")
    return value


def _payload(kind: Kind, raw: object, build: bool) -> Payload | None:
    """Check a payload; build its object only when ``build`` (ingest only validates)."""
    if kind is Kind.TRACK:
        if type(raw) is not list or len(raw) != 3:
            raise DecodeError("track payload must be an array of 3")
        topic, ts, fields = raw
        if type(topic) is not str:
            raise DecodeError("track topic must be a str")
        _check_name(topic, "track topic")
        if type(ts) is not float or not math.isfinite(ts):
            ts = _number(ts, "track _ts")
        if type(fields) is not dict:
            raise DecodeError("track fields must be a map")
        return Track(topic, ts, fields) if build else None
    if kind is Kind.METRIC:
        name, points, folder = _list(raw, 3, "metric payload")
        metric_dir_parts(name)
        if type(points) is not list or not all(type(p) is dict for p in points):
            raise DecodeError("metric points must be an array of maps")
        if folder not in SERIES_FOLDERS:
            raise DecodeError(f"series folder must be one of {SERIES_FOLDERS}")
        return Metric(name, points, folder) if build else None
    if kind is Kind.META:
        target, name, info = _list(raw, 3, "meta payload")
        if target not in META_TARGETS:
            raise DecodeError(f"meta target must be one of {META_TARGETS}")
        if target == "track":
            track_dir_name(name)
        else:
            metric_dir_parts(name)
        return Meta(target, name, _map(info, "meta info")) if build else None
    if kind is Kind.LOG:
        message, level, time, metadata = _list(raw, 4, "log payload")
        if metadata is not None:
            _map(metadata, "log metadata")
        log = Log(_str(message, "log message"), _str(level, "log level"), _number(time, "log time"), metadata)
        return log if build else None
    if kind is Kind.PARAMS:
        return Params(_map(raw, "params")) if build else None
    if kind is Kind.RUN_OPEN:
        return RunOpen(_map(raw, "run info")) if build else None
    if kind is Kind.FLUSH:
        (dropped,) = _list(raw, 1, "flush payload")
        return Flush(_int(dropped, "dropped")) if build else None
    if kind is Kind.RUN_CLOSE:
        status, reason, dropped = _list(raw, 3, "close payload")
        if status not in RUN_STATUSES:
            raise DecodeError(f"run status must be one of {RUN_STATUSES}")
        if reason is not None:
            _str(reason, "close reason")
        return RunClose(status, reason, _int(dropped, "dropped")) if build else None
    if kind >= Kind.FILE_PUT and kind < FIRST_INTERNAL_KIND:
        return _file_payload(kind, raw, build)
    if type(raw) is list and len(raw) == 2:
        raw = [*raw, 0]
    last_sent, dropped, pending = _list(raw, 3, "producer-gone payload")
    gone = ProducerGone(_int(last_sent, "last_sent"), _int(dropped, "dropped"), _int(pending, "pending"))
    return gone if build else None


def _no_bin(value: object, what: str, depth: int = 0) -> None:
    """Refuse ``bin`` anywhere in ``value``: in a file frame only the inline content may be bytes."""
    t = type(value)
    if t is bytes:
        raise DecodeError(f"{what} holds binary data; only a FILE_PUT's inline content may")
    if depth > 64:
        raise DecodeError(f"{what} nests deeper than 64 levels")
    if t is dict:
        for k, v in value.items():  # type: ignore[attr-defined]
            if type(k) is not str:
                raise DecodeError(f"{what} keys must be str")
            _no_bin(v, what, depth + 1)
    elif t is list:
        for v in value:  # type: ignore[attr-defined]
            _no_bin(v, what, depth + 1)


def _str_list(value: object, what: str) -> None:
    if type(value) is not list or not all(type(v) is str for v in value):
        raise DecodeError(f"{what} must be an array of str")


def _file_fields(info: dict[str, Any], what: str) -> None:
    """The optional ML-Dash fields of a file: description, tags, bindrs, metadata."""
    if "description" in info and info["description"] is not None:
        _str(info["description"], f"{what} description")
    for key in ("tags", "bindrs"):
        if key in info:
            _str_list(info[key], f"{what} {key}")
    metadata = info.get("metadata")
    if metadata is not None:
        _map(metadata, f"{what} metadata")
    _no_bin(info, what)


def _file_meta(raw: object, what: str) -> dict[str, Any]:
    meta = _map(raw, what)
    _number(meta.get("time"), f"{what} time")
    _file_fields(meta, what)
    if "content_type" in meta:
        _str(meta["content_type"], f"{what} content_type")
    if "size" in meta:
        _int(meta["size"], f"{what} size")
    return meta


def _file_payload(kind: Kind, raw: object, build: bool) -> Payload | None:
    """Check a file frame's payload (see ``FilePut`` and the module docstring)."""
    if kind is Kind.FILE_DELETE:
        file_id, time = _list(raw, 2, "file delete payload")
        check_file_id(file_id)
        return FileDelete(file_id, _number(time, "file delete time")) if build else None
    if kind is Kind.FILE_UPDATE:
        file_id, fields, time = _list(raw, 3, "file update payload")
        check_file_id(file_id)
        fields = _map(fields, "file update fields")
        if not set(fields) <= set(FILE_UPDATE_KEYS):
            raise DecodeError(f"file update fields must be among {FILE_UPDATE_KEYS}")
        _file_fields(fields, "file update")
        return FileUpdate(file_id, fields, _number(time, "file update time")) if build else None
    if kind is Kind.FILE_COPY:
        file_id, source_id, path, filename, meta = _list(raw, 5, "file copy payload")
        check_file_id(file_id)
        check_file_id(source_id)
        file_dir_parts(path)
        check_file_name(filename)
        meta = _file_meta(meta, "file copy meta")
        return FileCopy(file_id, source_id, path, filename, meta) if build else None
    file_id, path, filename, source, meta = _list(raw, 5, "file put payload")
    check_file_id(file_id)
    file_dir_parts(path)
    check_file_name(filename)
    meta = _file_meta(meta, "file put meta")
    if type(source) is not list or not source or source[0] not in FILE_SOURCES:
        raise DecodeError(f"file source must be an array starting with one of {FILE_SOURCES}")
    if source[0] == "inline":
        (_, data) = _list(source, 2, "inline file source")
        if type(data) is not bytes or len(data) > FILE_INLINE_MAX_BYTES:
            raise DecodeError(f"inline file content must be binary of at most {FILE_INLINE_MAX_BYTES} bytes")
    elif source[0] == "spool":
        (_, name) = _list(source, 2, "spool file source")
        check_file_name(name, "spool name")
    else:
        (_, abspath, size, mtime_ns, ino, dev) = _list(source, 6, "path file source")
        if type(abspath) is not str or "\x00" in abspath or not abspath.startswith("/") or len(abspath) > 4096:
            raise InvalidName("a file source path must be an absolute path without NUL, at most 4096 characters")
        _int(size, "file size")
        _int(mtime_ns, "file mtime_ns", -(2**63), 2**63 - 1)
        _int(ino, "file inode")
        _int(dev, "file device")
    return FilePut(file_id, path, filename, source, meta) if build else None


_checked_names: set[str] = set()


def _check_name(name: str, what: str) -> None:
    """Validate a topic once; valid names are remembered (bounded), invalid ones raise every time."""
    if name not in _checked_names:
        track_dir_name(name)
        if len(_checked_names) < 65536:
            _checked_names.add(name)


_KINDS = {k.value: k for k in Kind}
_valid_runs: set[tuple[str, str]] = set()
"""(root, prefix) pairs already found valid (bounded): the names of a run are checked once."""


_LIMITS: Final[_Limits] = {
    "max_bin_len": 0,
    "max_ext_len": MAX_FRAME_BYTES,
    "max_array_len": MAX_CONTAINER_LEN,
    "max_map_len": MAX_CONTAINER_LEN,
}
_PUT_LIMITS: Final[_Limits] = {**_LIMITS, "max_bin_len": FILE_INLINE_MAX_BYTES}
"""A lone ``FILE_PUT`` frame may hold one ``bin`` (its inline content; ``_file_payload`` refuses any other)."""
_PUT_HEAD: Final = bytes((0x98, PROTOCOL_VERSION, Kind.FILE_PUT))


def _unpack(data: bytes, ext_hook: Any, *, coalesced: bool = False) -> Any:
    """One bounded msgpack value; with ``coalesced``, frames packed back to back raise ``ExtraData``."""
    if len(data) > MAX_FRAME_BYTES:
        raise FrameTooLarge(f"message of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        return _unpackb(data, ext_hook=ext_hook, **(_PUT_LIMITS if data[:3] == _PUT_HEAD else _LIMITS))
    except ProtocolError:
        raise
    except msgpack.ExtraData:
        if coalesced:
            raise
        raise DecodeError("not a msgpack frame: data after the frame") from None
    except Exception as exc:
        raise DecodeError(f"not a msgpack frame: {exc}") from exc


def _parse(data: bytes, internal: bool, build: bool) -> Frame | None:
    return _check(_unpack(data, ext_to_list if build else check_ext), internal, build)


def _check(raw: object, internal: bool, build: bool) -> Frame | None:
    if type(raw) is not list or not raw:
        raise DecodeError("frame must be a non-empty msgpack array")
    if raw[0] != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"frame version {raw[0]!r}, this side speaks {PROTOCOL_VERSION}")
    if len(raw) != 8:
        raise DecodeError("frame must have 8 elements")
    _, kind_raw, sid, pid, root, prefix, seq, payload = raw
    kind = _KINDS.get(kind_raw) if type(kind_raw) is int else None
    if kind is None:
        raise DecodeError(f"unknown frame kind {kind_raw!r}")
    if kind >= FIRST_INTERNAL_KIND and not internal:
        raise DecodeError(f"frame kind {kind_raw!r} is reserved for the agent")
    if type(root) is not str or type(prefix) is not str or (root, prefix) not in _valid_runs:
        check_root(root)
        check_prefix(prefix)
        if len(_valid_runs) < 65536:
            _valid_runs.add((root, prefix))
    if type(sid) is not int or not 1 <= sid < 2**64:
        raise DecodeError("sid must be an int in [1, 2**64)")
    if type(pid) is not int or not 1 <= pid <= 2**31:
        raise DecodeError("pid must be an int in [1, 2**31]")
    if type(seq) is not int or not 1 <= seq < 2**64:
        raise DecodeError("seq must be an int in [1, 2**64)")
    body = _payload(kind, payload, build)
    if body is None:  # only when not building
        return None
    return Frame(kind, sid, pid, root, prefix, seq, body)


def decode(data: bytes, *, internal: bool = False) -> Frame:
    """Decode and validate one frame; raises only ``ProtocolError`` subclasses.

    :param internal: also accept the agent's own record kinds (read back from its WAL).
    """
    frame = _parse(data, internal, True)
    assert frame is not None
    return frame


def unpack_stored(record: bytes) -> list[Any]:
    """Unpack a frame the agent already validated (a WAL record), arrays as lists, without checks."""
    values: list[Any] = _unpackb(record, ext_hook=ext_to_list)
    return values


def frame_from(values: object, *, internal: bool = False) -> Frame:
    """Validate and build a frame from its unpacked values (``unpack_stored``), as ``decode`` does."""
    frame = _check(values, internal, True)
    assert frame is not None
    return frame


def validate(data: bytes) -> None:
    """Check one wire frame exactly as ``decode`` does, without building it."""
    _parse(data, False, False)


INTERNAL_MARK: Final = b"\xc1"
"""First byte of a WAL record the agent made itself. msgpack never uses 0xc1, so no wire
message can pass for an internal record."""

_FIXARRAY_8: Final = 0x98
"""A v1 frame is an array of 8 elements; its second byte is the version."""


def frame_count(message: bytes) -> int:
    """Frames a wire message holds, read from its first bytes; 0 if it is no v1 message.

    A message is one frame (``[version, kind, ...]``) or, from a coalescing producer, an array
    of frames (``[[version, ...], [version, ...]]``); the two differ in their second byte. This
    is what ingest checks before storing; everything else is checked by ``check_record`` before
    the frames can touch a file.
    """
    if len(message) < 2:
        return 0
    b0, b1 = message[0], message[1]
    if b0 == _FIXARRAY_8:
        return 1 if b1 == PROTOCOL_VERSION else (8 if b1 == _FIXARRAY_8 else 0)
    if 0x91 <= b0 <= 0x9F and b1 == _FIXARRAY_8:
        return b0 & 0x0F
    if b0 == 0xDC and len(message) > 3 and message[3] == _FIXARRAY_8:
        return int.from_bytes(message[1:3], "big")
    return 0


_SEQ_AT: dict[bytes, list[bytes]] = {}
"""The constant head of frames, per (kind, sid) bytes: the seq follows it (bounded)."""
_UINT_SIZE: Final = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def message_ids(message: bytes) -> tuple[int, int, int] | None:
    """``(sid, first seq, last seq)`` of a wire message, read without decoding it (None if unreadable).

    Ingest acknowledges stored messages per producer with these. The head of a frame (version,
    kind, sid, pid, root, prefix) is constant for a producer, run and kind, so it is parsed once
    and remembered; a coalesced message's frames come from one producer with consecutive seqs.
    """
    n = frame_count(message)
    if n == 0:
        return None
    start = 0 if n == 1 and message[1] == PROTOCOL_VERSION else (3 if message[0] == 0xDC else 1)
    key = message[start + 2:start + 12]
    for head in _SEQ_AT.get(key, ()):
        if message.startswith(head, start):
            break
    else:
        head = _learn_head(message, start, key)
        if not head:
            return None
    at = start + len(head)
    marker = message[at]
    if marker < 0x80:
        first = marker
    else:
        size = _UINT_SIZE.get(marker)
        if size is None:
            return None
        first = int.from_bytes(message[at + 1:at + 1 + size], "big")
    sid = int.from_bytes(message[start + 4:start + 12], "big") if message[start + 3] == 0xCF else _sid(message, start)
    return sid, first, first + n - 1


def _sid(message: bytes, start: int) -> int:
    values = msgpack.Unpacker(max_buffer_size=len(message))
    values.feed(message[start:])
    values.read_array_header()
    values.skip()
    values.skip()
    return int(values.unpack())


def _learn_head(message: bytes, start: int, key: bytes) -> bytes:
    """Find where the seq of the frame at ``start`` begins; remember the head before it."""
    try:
        values = msgpack.Unpacker(max_buffer_size=len(message), max_bin_len=0, max_ext_len=0)
        values.feed(message[start:])
        if values.read_array_header() != 8:
            return b""
        for _ in range(6):
            values.skip()
        head = message[start:start + values.tell()]
    except Exception:
        return b""
    if len(_SEQ_AT) < 65_536:
        _SEQ_AT.setdefault(key, []).append(head)
    return head


def refusal_reason(message: bytes) -> str:
    """Why ``frame_count`` refused a message: another protocol version, or not a frame at all."""
    if len(message) >= 2 and message[0] == _FIXARRAY_8 and message[1] not in (PROTOCOL_VERSION, _FIXARRAY_8):
        return UnsupportedVersion.reason
    return DecodeError.reason


def coalesce(frames: list[bytes]) -> bytes:
    """One wire message holding several packed frames (an msgpack array of them)."""
    n = len(frames)
    head = bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
    return head + b"".join(frames)


_valid_heads: set[tuple[object, ...]] = set()
"""``(kind, sid, pid, root, prefix)`` of wire frames already found valid (bounded): the part of a
frame that never changes for a producer, run and kind is checked once."""
_SEQ_END: Final = 2**64
_TRACK_KIND: Final = int(Kind.TRACK)


def _check_fast(values: object) -> None:
    """``_check`` without building, for a wire frame; a known head skips to the seq and payload."""
    if type(values) is list and len(values) == 8 and values[0] == PROTOCOL_VERSION:
        head = (values[1], values[2], values[3], values[4], values[5])
        if head in _valid_heads:
            seq = values[6]
            if type(seq) is not int or not 0 < seq < _SEQ_END:
                raise DecodeError("seq must be an int in [1, 2**64)")
            p = values[7]
            if head[0] == _TRACK_KIND and type(p) is list and len(p) == 3:
                topic, ts, fields = p
                if (
                    type(topic) is str and topic in _checked_names and type(ts) is float and _isfinite(ts)
                    and type(fields) is dict
                ):
                    return
            _payload(_KINDS[head[0]], p, False)
            return
        _check(values, False, False)
        if len(_valid_heads) < 65536:
            _valid_heads.add(head)
        return
    _check(values, False, False)


def check_record(record: bytes) -> list[list[Any]]:
    """The frames of a stored record, validated exactly as ``decode`` does, as value lists.

    Numpy arrays come back as lists. A coalesced message with any invalid frame is refused
    whole with a ``ProtocolError``; internal kinds pass only in records the agent made.
    """
    if record[:1] == INTERNAL_MARK:
        raw = _unpack(record[1:], ext_to_list)
        _check(raw, True, False)
        return [raw]
    raw = _unpack(record, ext_to_list)
    if type(raw) is list and raw and type(raw[0]) is list:
        for values in raw:
            _check_fast(values)
        return raw
    _check_fast(raw)
    return [raw]


def decode_message(message: bytes) -> list[Frame]:
    """Every frame of a wire message, decoded and validated (one or a coalesced group)."""
    if message[:1] == INTERNAL_MARK:
        raise DecodeError("an internal record is not a wire message")
    return [frame_from(values) for values in check_record(message)]


def internal_record(frame: Frame) -> bytes:
    """The WAL record of a frame the agent made itself."""
    return INTERNAL_MARK + encode(frame)
