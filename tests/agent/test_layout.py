"""JSON lines: orjson writes them, meaning exactly what ML-Dash's ``json.dumps`` lines mean."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dashcar.agent import layout

leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.integers(min_value=2**64, max_value=2**200)
    | st.integers(min_value=-(2**200), max_value=-(2**63) - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                      max_leaves=20)
rows = st.dictionaries(st.text(max_size=6).filter(lambda k: k != "timestamp"), values, max_size=6)


def same(a: Any, b: Any) -> bool:
    """Equal as parsed JSON, NaN equal to NaN, and of the same JSON type (1 is not 1.0)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@settings(max_examples=300, deadline=None)
@given(row=rows, ts=st.floats(allow_nan=False, allow_infinity=False))
def test_a_line_parses_to_what_json_dumps_gives(row: dict[str, Any], ts: float) -> None:
    ours = layout.track_line(ts, row)
    theirs = json.dumps({"timestamp": ts, **row}) + "\n"
    assert ours.endswith(b"\n") and ours.count(b"\n") == 1, "one line"
    assert same(json.loads(ours), json.loads(theirs))


@settings(max_examples=100, deadline=None)
@given(batch=st.lists(st.tuples(st.floats(allow_nan=False, allow_infinity=False), rows), max_size=12))
def test_many_lines_at_once_are_the_lines_one_by_one(batch: list[tuple[float, dict[str, Any]]]) -> None:
    stamps, fields = [ts for ts, _ in batch], [f for _, f in batch]
    together = layout.track_lines(stamps, fields)
    alone = b"".join(layout.track_line(ts, f) for ts, f in batch)
    assert together.count(b"\n") == len(batch)
    assert all(same(json.loads(a), json.loads(b)) for a, b in zip(together.splitlines(), alone.splitlines(), strict=True))


def test_nan_infinity_and_big_integers_are_written_as_ml_dash_writes_them() -> None:
    line = layout.track_line(1.0, {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "big": 2**70, "u64": 2**64 - 1})
    assert b"NaN" in line and b"-Infinity" in line and str(2**70).encode() in line
    assert json.loads(line)["big"] == 2**70 and json.loads(line)["u64"] == 2**64 - 1
    nested = layout.track_lines([1.0, 2.0], [{"x": [{"timestamp": 5}]}, {"y": 1}])
    expected = [{"timestamp": 1.0, "x": [{"timestamp": 5}]}, {"timestamp": 2.0, "y": 1}]
    assert [json.loads(x) for x in nested.splitlines()] == expected
