"""Merge properties: every field survives, one row per ts, last writer wins, idempotent."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dashcar.agent.merge import OpenRows, flatten, merge_rows

keys = st.sampled_from(["q", "qd", "tau", "g", "x"])
leaf = st.integers(0, 3) | st.floats(allow_nan=False, allow_infinity=False, width=32)
entries = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0]),
        st.dictionaries(keys, leaf | st.dictionaries(keys, leaf, max_size=2), max_size=3),
    ),
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
    expected_clashes = 0
    for ts, fields in rows:
        expected: dict[str, Any] = {}
        for ets, f in flat:
            if ets == ts:
                expected_clashes += sum(1 for k, v in f.items() if k in expected and expected[k] != v)
                expected.update(f)
        assert fields == expected, "every field present, last writer wins"
    assert clashes == expected_clashes, "each replaced differing value is one clash"
    again, clashes2 = merge_rows([*rows, *rows])
    assert again == rows and clashes2 == 0, "merging merged rows again changes nothing"


def test_rows_settle_after_the_window_and_take_smaller_stamps_with_them() -> None:
    rows = OpenRows(window_s=1.0, max_rows=100)
    rows.add(("r", "t"), [(2.0, {"a": 1}, 10), (1.0, {"a": 2}, 11)], now=0.0)
    rows.add(("r", "t"), [(3.0, {"a": 3}, 12), (2.0, {"b": 4}, 13)], now=0.5)
    assert rows.due(0.9, set(), False) == []
    assert rows.due(1.2, set(), False) == [(("r", "t"), 2.0)], "the oldest rows are due, up to their largest stamp"
    stamps, fields, refs = rows.settle(("r", "t"), 2.0)
    assert stamps == [1.0, 2.0] and fields == [{"a": 2}, {"a": 1, "b": 4}] and refs == [[11], [10, 13]]
    assert rows.count == 1 and rows.refs(("r", "t")) == [[3.0], [[12]]] and rows.min_wseq() == 12


def test_a_run_settles_at_once_and_everything_settles_past_the_cap() -> None:
    rows = OpenRows(window_s=10.0, max_rows=3)
    rows.add(("r1", "t"), [(1.0, {}, 1), (2.0, {}, 2)], now=0.0)
    rows.add(("r2", "t"), [(1.0, {}, 3)], now=0.0)
    assert rows.due(0.0, {"r1"}, False) == [(("r1", "t"), math.inf)]
    assert rows.has_run("r2") and not rows.has_run("r3")
    rows.add(("r2", "t"), [(5.0, {}, 4)], now=0.0)
    assert {k for k, _ in rows.due(0.0, set(), False)} == {("r1", "t"), ("r2", "t")}, "past the cap all settle"
    for key, upto in rows.due(0.0, set(), True):
        rows.settle(key, upto)
    assert rows.count == 0 and rows.topics == {} and rows.min_wseq() is None


def test_a_restored_row_keeps_every_record_it_was_merged_from() -> None:
    rows = OpenRows(window_s=1.0, max_rows=10)
    rows.restore(("r", "t"), 1.0, {"a": 1}, [4, 9], now=0.0)
    assert rows.count == 1 and rows.refs(("r", "t")) == [[1.0], [[4, 9]]]
    assert rows.add(("r", "t"), [(1.0, {"a": 2}, 12)], now=0.0) == 1, "a differing value is a clash"
    assert rows.settle(("r", "t"), math.inf) == ([1.0], [{"a": 2}], [[4, 9, 12]])
