"""The wire contract: every kind round-trips; arbitrary bytes fail only with ProtocolError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dashcar import proto
from dashcar.proto import (
    DecodeError,
    Flush,
    Frame,
    FrameTooLarge,
    InvalidName,
    Kind,
    Log,
    Meta,
    Metric,
    Params,
    ProducerGone,
    ProtocolError,
    RunClose,
    RunOpen,
    Track,
    UnsupportedVersion,
    decode,
    encode,
)
from dashcar.proto._frames import Payload

ROOT, PREFIX = "/data/.dash", "alice/robotics/run1"

PAYLOADS: list[tuple[Kind, Payload]] = [
    (Kind.RUN_OPEN, RunOpen({"name": "run1", "host": "h", "argv": ["train.py"], "started_at": 1.5})),
    (Kind.PARAMS, Params({"lr": 0.001, "model": {"depth": 50}})),
    (Kind.METRIC, Metric("train", [{"loss": 0.5, "_ts": 1.0}, {"loss": 0.4, "_ts": 2.0}])),
    (Kind.METRIC, Metric(None, [{"epoch": 1, "_ts": 1.0}])),
    (Kind.METRIC, Metric("train_loss", [{"value": 0.5}], "tracks")),
    (Kind.META, Meta("track", "robot/state", {"description": "arm", "tags": ["a"], "metadata": {"fps": 9}})),
    (Kind.META, Meta("metric", None, {"description": "unnamed"})),
    (Kind.TRACK, Track("robot/state", 1.25, {"q": [0.1, 0.2], "g": {"pos": 0.04}})),
    (Kind.LOG, Log("hello", "info", 123.5, {"k": 1})),
    (Kind.LOG, Log("bare", "warn", 1.0, None)),
    (Kind.FLUSH, Flush(3)),
    (Kind.RUN_CLOSE, RunClose("failed", "ValueError: x", 0)),
]
PAYLOAD_IDS = [f"{k.name}-{i}" for i, (k, _) in enumerate(PAYLOADS)]


@pytest.mark.parametrize(("kind", "payload"), PAYLOADS, ids=PAYLOAD_IDS)
def test_every_kind_round_trips(kind: Kind, payload: Payload) -> None:
    frame = Frame(kind, 0x1234, 4321, ROOT, PREFIX, 7, payload)
    assert decode(encode(frame)) == frame


def test_internal_kinds_are_refused_from_the_wire() -> None:
    frame = Frame(Kind.PRODUCER_GONE, 1, 2, ROOT, PREFIX, 1, ProducerGone(10, 2))
    with pytest.raises(DecodeError):
        decode(encode(frame))
    assert decode(encode(frame), internal=True) == frame


def test_wrong_version_is_unsupported() -> None:
    raw = msgpack.packb([99, Kind.FLUSH, 1, 2, ROOT, PREFIX, 1, [0]])
    with pytest.raises(UnsupportedVersion):
        decode(raw)


def test_oversized_frame_is_refused() -> None:
    frame = Frame(Kind.LOG, 1, 2, ROOT, PREFIX, 1, Log("x" * proto.MAX_FRAME_BYTES, "info", 1.0, None))
    with pytest.raises(FrameTooLarge):
        decode(encode(frame))


@pytest.mark.parametrize(
    ("root", "prefix"),
    [("relative/root", PREFIX), ("/a/../b", PREFIX), ("/ok", "../escape"), ("/ok", "/abs"), ("/ok", "a//b"),
     ("/ok", "a/\x00/b"), ("/ok", "")],
)
def test_hostile_run_names_are_refused(root: str, prefix: str) -> None:
    raw = msgpack.packb([proto.PROTOCOL_VERSION, Kind.FLUSH, 1, 2, root, prefix, 1, [0]])
    with pytest.raises(ProtocolError):
        decode(raw)


@pytest.mark.parametrize("topic", ["..", "a/../../b", "", "a//b", "x\x00y", "/abs"])
def test_hostile_topics_are_refused(topic: str) -> None:
    raw = msgpack.packb([proto.PROTOCOL_VERSION, Kind.TRACK, 1, 2, ROOT, PREFIX, 1, [topic, 1.0, {}]])
    with pytest.raises(InvalidName):
        decode(raw)


def test_a_metric_named_none_is_refused_since_it_would_share_the_unnamed_metrics_folder() -> None:
    raw = msgpack.packb([proto.PROTOCOL_VERSION, Kind.METRIC, 1, 2, ROOT, PREFIX, 1, ["None", [{"x": 1}], "metrics"]])
    with pytest.raises(InvalidName, match="unnamed metric"):
        decode(raw)
    unnamed = msgpack.packb([proto.PROTOCOL_VERSION, Kind.METRIC, 1, 2, ROOT, PREFIX, 1, [None, [{"x": 1}], "metrics"]])
    assert decode(unnamed).payload == Metric(None, [{"x": 1}])


@pytest.mark.parametrize("ts", [float("nan"), float("inf"), "1.0", None, True])
def test_non_numeric_track_ts_is_refused(ts: object) -> None:
    raw = msgpack.packb([proto.PROTOCOL_VERSION, Kind.TRACK, 1, 2, ROOT, PREFIX, 1, ["t", ts, {}]])
    with pytest.raises(DecodeError):
        decode(raw)


def test_binary_and_unknown_extension_values_are_refused() -> None:
    for value in (b"raw-bytes", msgpack.ExtType(5, b"x")):
        frame = [proto.PROTOCOL_VERSION, Kind.TRACK, 1, 2, ROOT, PREFIX, 1, ["t", 1.0, {"v": value}]]
        raw = msgpack.packb(frame, use_bin_type=True)
        with pytest.raises(DecodeError):
            decode(raw)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_decode_of_arbitrary_bytes_raises_only_protocol_error(data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError:
        pass


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    frame_bytes=st.lists(
        st.one_of(st.integers(-5, 2**64 - 1), st.text(max_size=10), json_values), min_size=0, max_size=9
    )
)
def test_decode_of_arbitrary_msgpack_arrays_raises_only_protocol_error(frame_bytes: list[object]) -> None:
    try:
        decode(msgpack.packb([proto.PROTOCOL_VERSION, *frame_bytes]))
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    fields=st.dictionaries(st.text(min_size=1, max_size=8), json_values, max_size=5),
    ts=st.floats(allow_nan=False, allow_infinity=False),
)
def test_track_frames_round_trip(fields: dict[str, object], ts: float) -> None:
    frame = Frame(Kind.TRACK, 5, 6, ROOT, PREFIX, 1, Track("a/b", ts, fields))
    assert decode(encode(frame)) == frame


@settings(max_examples=300, deadline=None)
@given(
    elements=st.lists(
        st.one_of(st.integers(-5, 2**64 - 1), st.text(max_size=10), json_values), min_size=7, max_size=7
    )
)
def test_validate_accepts_exactly_what_decode_accepts(elements: list[object]) -> None:
    data = msgpack.packb([proto.PROTOCOL_VERSION, *elements])
    outcomes: list[type[ProtocolError] | None] = []
    for check in (proto.validate, decode):
        try:
            check(data)
            outcomes.append(None)
        except ProtocolError as exc:
            outcomes.append(type(exc))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize(("kind", "payload"), PAYLOADS, ids=PAYLOAD_IDS)
def test_validate_accepts_every_valid_frame(kind: Kind, payload: Payload) -> None:
    proto.validate(encode(Frame(kind, 0x1234, 4321, ROOT, PREFIX, 7, payload)))


def _wire(i: int, kind: Kind = Kind.TRACK, payload: Payload | None = None) -> bytes:
    return encode(Frame(kind, 0x1234, 4321, ROOT, PREFIX, i, payload or Track("a/b", float(i), {"i": i})))


def test_a_coalesced_message_holds_its_frames() -> None:
    frames = [_wire(i) for i in range(1, 18)]
    for n in (1, 2, 8, 15, 16, 17):
        message = proto.coalesce(frames[:n])
        assert proto.frame_count(message) == n
        assert proto.decode_message(message) == [decode(f) for f in frames[:n]]
    assert proto.frame_count(frames[0]) == 1
    assert proto.decode_message(frames[0]) == [decode(frames[0])]


def test_a_coalesced_message_with_one_bad_part_is_refused_whole() -> None:
    good = [_wire(1), _wire(2)]
    with pytest.raises(DecodeError):
        proto.check_record(proto.coalesce(good)[:-3])
    with pytest.raises(DecodeError, match="after the frame"):
        proto.check_record(b"".join(good))
    with pytest.raises(InvalidName):
        escape = Frame(Kind.TRACK, 1, 2, ROOT, "../escape", 3, Track("t", 1.0, {}))
        proto.check_record(proto.coalesce([good[0], encode(escape)]))
    with pytest.raises(DecodeError, match="reserved"):
        internal = Frame(Kind.PRODUCER_GONE, 1, 2, ROOT, PREFIX, 3, ProducerGone(1, 2))
        proto.check_record(proto.coalesce([good[0], encode(internal)]))


def test_only_the_agent_makes_internal_records() -> None:
    gone = Frame(Kind.PRODUCER_GONE, 1, 2, ROOT, PREFIX, 3, ProducerGone(1, 2))
    assert proto.check_record(proto.internal_record(gone))[0][1] == Kind.PRODUCER_GONE
    assert proto.frame_count(proto.internal_record(gone)) == 0, "ingest refuses a wire message that looks internal"
    with pytest.raises(DecodeError, match="reserved"):
        proto.check_record(encode(gone))


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.binary(max_size=64), max_size=4), cut=st.integers(0, 400))
def test_checking_arbitrary_bytes_raises_only_protocol_error(parts: list[bytes], cut: int) -> None:
    data = proto.coalesce([_wire(1)] * len(parts)) + b"".join(parts)
    for message in (data, data[:cut], b"\xc1" + data[:cut]):
        try:
            frames = proto.check_record(message)
        except ProtocolError:
            continue
        assert frames and all(f[0] == proto.PROTOCOL_VERSION for f in frames)


def test_producer_gone_records_of_the_older_two_field_form_still_decode() -> None:
    """WAL records written before the pending count existed decode with pending = 0."""
    new_payload = msgpack.packb([5, 6, 0])
    record = encode(Frame(Kind.PRODUCER_GONE, 1, 2, ROOT, PREFIX, 1, ProducerGone(5, 6)))
    assert record.endswith(new_payload)
    legacy = record[: -len(new_payload)] + msgpack.packb([5, 6])
    assert decode(legacy, internal=True).payload == ProducerGone(5, 6, 0)


@pytest.mark.parametrize(("kind", "payload"), PAYLOADS, ids=PAYLOAD_IDS)
def test_a_stored_record_builds_the_same_frame_as_decode(kind: Kind, payload: Payload) -> None:
    raw = encode(Frame(kind, 0x1234, 4321, ROOT, PREFIX, 7, payload))
    assert proto.frame_from(proto.unpack_stored(raw)) == decode(raw)
