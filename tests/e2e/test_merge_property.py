"""Property: any interleaving of appends from several processes gives one sorted row per timestamp,
every field present, and the last writer winning a clash (including rows already written)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import AgentHandle, read_jsonl

WORKER = r"""
import json, sys, dashcar
exps = {}
for line in sys.stdin:
    cmd = json.loads(line)
    exp = exps.get(cmd["prefix"])
    if exp is None:
        exp = exps[cmd["prefix"]] = dashcar.Experiment(prefix=cmd["prefix"], dash_root=sys.argv[1]).start()
    if cmd["op"] == "append":
        exp.tracks("t").append(**{cmd["key"]: cmd["value"]}, _ts=cmd["ts"])
    ok = exp.flush(10)
    print(json.dumps(ok), flush=True)
"""

N_WORKERS = 3


@pytest.fixture
def workers(agent: AgentHandle) -> Iterator[list[subprocess.Popen[str]]]:
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(agent.data_dir)], env=agent.env(), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(N_WORKERS)
    ]
    yield procs
    for p in procs:
        p.communicate(timeout=30)


steps = st.lists(
    st.tuples(
        st.integers(0, N_WORKERS - 1),
        st.sampled_from([0.0, 0.25, 1.0, 2.5, -1.5]),
        st.sampled_from(["a", "b", "c", "n.x"]),
        st.integers(0, 9),
    ),
    min_size=1,
    max_size=25,
)

_counter = iter(range(10**9))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=steps)
def test_interleaved_appends_from_processes_merge_like_a_dict(
    agent: AgentHandle, workers: list[subprocess.Popen[str]], plan: list[tuple[int, float, str, int]]
) -> None:
    prefix = f"prop/merge/case{next(_counter)}"
    expected: dict[float, dict[str, Any]] = {}
    for worker, ts, key, value in plan:
        p = workers[worker]
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(json.dumps({"op": "append", "prefix": prefix, "ts": ts, "key": key, "value": value}) + "\n")
        p.stdin.flush()
        assert json.loads(p.stdout.readline()) is True, "flush barrier confirmed"
        expected.setdefault(ts, {})[key] = value
    path = agent.data_dir / "prop" / "merge" / prefix.rsplit("/", 1)[1] / "tracks" / "t" / "data.jsonl"
    rows = read_jsonl(path)
    assert [r["timestamp"] for r in rows] == sorted(expected), "one row per timestamp, sorted"
    for row in rows:
        ts = row.pop("timestamp")
        assert row == expected[ts], "every field present, the last writer wins"
