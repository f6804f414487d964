"""Merge properties: every field survives, one row per ts, last writer wins, idempotent."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dashcar.agent.merge import flatten, merge_rows

keys = st.sampled_from(["q", "qd", "tau", "g", "x"])
leaf = st.integers(0, 3) | st.floats(allow_nan=False, allow_infinity=False, width=32)
entries = st.lists(
    st.tuples(st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0]), st.dictionaries(keys, leaf | st.dictionaries(keys, leaf, max_size=2), max_size=3)),
    max_size=30,
)


def test_flatten_matches_ml_dash_dot_notation() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": 3}) == {"a.b": 1, "a.c.d": [1, 2], "e": 3}


def test_nested_merge_is_deep() -> None:
    rows, clashes = merge_rows([(1.0, flatten({"g": {"pos": 1}})), (1.0, flatten({"g": {"force": 2}}))])
    assert rows == [(1.0, {"g.pos": 1, "g.force": 2})] and clashes == 0


@settings(max_examples=300, deadline=None)
@given(entries)
def test_merge_properties(items: list[tuple[float, dict[str, Any]]]) -> None:
    flat = [(ts, flatten(f)) for ts, f in items]
    rows, clashes = merge_rows(flat)
    stamps = [ts for ts, _ in rows]
    assert stamps == sorted(set(stamps)), "one row per timestamp, sorted"
    assert set(stamps) == {ts for ts, _ in flat}
    for ts, fields in rows:
        expected: dict[str, Any] = {}
        for ets, f in flat:
            if ets == ts:
                expected.update(f)
        assert fields == expected, "every field present, last writer wins"
    again, clashes2 = merge_rows([*rows, *rows])
    assert again == rows and clashes2 == 0, "merging merged rows again changes nothing"
    assert clashes >= 0
