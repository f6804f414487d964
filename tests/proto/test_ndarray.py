"""numpy arrays travel as raw bytes and land as exactly the lists ``tolist()`` gives; a forged
array extension is refused like any malformed frame."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dashcar import proto
from dashcar._transport import _default
from dashcar.proto import DecodeError, Frame, Kind, Track, decode, encode
from dashcar.proto._ndarray import NDARRAY_EXT

ROOT, PREFIX = "/data/.dash", "alice/robotics/run1"
DTYPES = ["f8", "f4", "i8", "i4", "i2", "i1", "u8", "u4", "u2", "u1", "?"]


def fields_of(data: bytes) -> dict[str, object]:
    """The fields of a decoded track frame."""
    payload = decode(data).payload
    assert isinstance(payload, Track)
    return payload.fields


def frame_with(value: object) -> bytes:
    head = proto.frame_head(Kind.TRACK, 5, 6, ROOT, PREFIX)
    packer = msgpack.Packer(default=_default)
    return head + packer.pack(1) + packer.pack(["t", 1.0, {"v": value}])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(40,), (8, 5), (2, 4, 6), (0, 40), (40, 0)])
def test_arrays_decode_to_what_tolist_gives(dtype: str, shape: tuple[int, ...]) -> None:
    array = (np.arange(int(np.prod(shape))) * 7 - 3).astype(dtype).reshape(shape)
    data = frame_with(array)
    if array.size >= proto.NDARRAY_MIN_SIZE:
        assert len(data) < 200 + array.nbytes, "sent as bytes, not as a list"
    assert proto.check_record(data)[0][7][2]["v"] == array.tolist()
    assert fields_of(data)["v"] == array.tolist()


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(width=32), min_size=proto.NDARRAY_MIN_SIZE, max_size=200))
def test_float_arrays_keep_every_value_including_nan_and_infinity(values: list[float]) -> None:
    array = np.array(values, dtype="f4")
    got = fields_of(frame_with(array))["v"]
    assert np.array_equal(np.array(got, dtype="f4"), array, equal_nan=True)


def test_non_contiguous_and_small_arrays_and_other_dtypes_still_land() -> None:
    strided = np.arange(200.0)[::3]
    small = np.arange(3.0)
    half = np.arange(40, dtype="f2")
    for array in (strided, small, half):
        assert fields_of(frame_with(array))["v"] == array.tolist()


def forged(value: object) -> bytes:
    """A valid track frame whose fields are ``{"v": value}``."""
    empty = encode(Frame(Kind.TRACK, 5, 6, ROOT, PREFIX, 1, Track("t", 1.0, {})))
    return empty[:-1] + msgpack.packb({"v": value})


def test_a_real_array_passes_where_the_forgeries_fail() -> None:
    ext = proto.ndarray_ext(np.arange(40.0))
    assert proto.check_record(forged(ext))[0][7][2]["v"] == np.arange(40.0).tolist()
    assert fields_of(forged(ext))["v"] == np.arange(40.0).tolist()


@pytest.mark.parametrize(
    "ext",
    [
        msgpack.ExtType(NDARRAY_EXT, b""),
        msgpack.ExtType(NDARRAY_EXT, struct.pack("<BB", ord("x"), 1) + struct.pack("<I", 1) + b"\0" * 8),
        msgpack.ExtType(NDARRAY_EXT, struct.pack("<BB", ord("d"), 0)),
        msgpack.ExtType(NDARRAY_EXT, struct.pack("<BB", ord("d"), 40) + b"\0" * 8),
        msgpack.ExtType(NDARRAY_EXT, struct.pack("<BB", ord("d"), 1) + struct.pack("<I", 2) + b"\0" * 8),
        msgpack.ExtType(
            NDARRAY_EXT, struct.pack("<BB", ord("d"), 2) + struct.pack("<2I", 2**31, 2**31) + b"\0" * 8
        ),
        msgpack.ExtType(2, b"\0" * 16),
    ],
)
def test_forged_array_extensions_are_refused(ext: msgpack.ExtType) -> None:
    data = forged(ext)
    with pytest.raises(DecodeError):
        proto.check_record(data)
    with pytest.raises(DecodeError):
        decode(data)
