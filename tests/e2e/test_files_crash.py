"""Files land exactly once across agent SIGKILLs: every file once, with its bytes; overwrites keep the
last; no torn, duplicated or orphaned file; spool files released; nothing counted as lost.

The producer stores inline, spool and path files, overwrites one name and duplicates files
while the agent is killed and restarted at random moments (it re-sends what the dead agent
had not stored)."""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

from tests.conftest import AgentHandle, read_json, wait_until
from tests.sdk.test_files import check_index, live, stored

N = 75
KILL_EVERY = 15
PRODUCER = """
import os, random, sys, time, dashcar
root, work = sys.argv[1], sys.argv[2]
exp = dashcar.Experiment(prefix="crash/files/run", dash_root=root, echo_logs=False).start()
last = None
for i in range(__N__):
    kind = i % 5
    if kind == 0:
        p = os.path.join(work, f"small{i}.txt")
        with open(p, "w") as f:
            f.write(f"small {i}")
        exp.files("a").upload(p)
    elif kind == 1:
        p = os.path.join(work, f"big{i}.bin")
        with open(p, "wb") as f:
            f.write(random.Random(i).randbytes(100_000))
        exp.files("a").upload(p)
    elif kind == 2:
        last = exp.files("spool").save_blob(random.Random(i).randbytes(90_000), to=f"s{i}.bin")
    elif kind == 3:
        exp.files("ckpt").save_text(f"epoch {i}", to="latest.txt")
    else:
        exp.files().duplicate(last, to=f"dup/d{i}.bin")
    if i % __EVERY__ == __EVERY__ - 1 and i < __N__ - 1:
        print("at", i, flush=True)
    time.sleep(0.01)
assert exp.flush(60), "the barrier was confirmed"
exp.files("a/small0.txt").delete()
exp.complete()
print("done", flush=True)
"""


def test_files_land_exactly_once_across_agent_kills(agent_factory: Any, producers: Any, tmp_path: Path) -> None:
    rng = random.Random(11)
    agent: AgentHandle = agent_factory("--merge-window-s", "0.05").start()
    code = PRODUCER.replace("__N__", str(N)).replace("__EVERY__", str(KILL_EVERY))
    proc = producers(f"import sys; sys.argv = ['p', {str(agent.data_dir)!r}, {str(tmp_path)!r}]\n" + code, agent.env())
    assert proc.stdout is not None
    kills = 0
    while proc.stdout.readline().startswith("at "):
        time.sleep(rng.uniform(0.0, 0.05))
        agent.kill()
        kills += 1
        agent.start()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert kills == N // KILL_EVERY - 1, "the agent was killed while files landed"
    run = agent.data_dir / "crash" / "files" / "run"
    wait_until(lambda: (read_json(run / "experiment.json") or {}).get("status") == "completed", 60, "run closed")
    entries = check_index(run)
    files = live(run)
    expected: dict[str, bytes] = {}
    spooled: dict[int, bytes] = {}
    for i in range(N):
        kind = i % 5
        if kind == 0 and i != 0:
            expected[f"a/small{i}.txt"] = f"small {i}".encode()
        elif kind == 1:
            expected[f"a/big{i}.bin"] = random.Random(i).randbytes(100_000)
        elif kind == 2:
            spooled[i] = expected[f"spool/s{i}.bin"] = random.Random(i).randbytes(90_000)
        elif kind == 4:
            expected[f"dup/d{i}.bin"] = spooled[i - 2]
    expected["ckpt/latest.txt"] = f"epoch {N - 2}".encode()
    counters = read_json(run / "experiment.json")["dashcar"]["counters"]
    assert sorted(files) == sorted(expected), f"every file once, the overwritten name once {counters}"
    for name, data in expected.items():
        assert stored(run, files[name]).read_bytes() == data, name
        assert files[name]["checksum"] == hashlib.sha256(data).hexdigest()
    deleted = [e for e in entries if e["deletedAt"] is not None]
    assert [e["filename"] for e in deleted] == ["small0.txt"]
    assert len(entries) == len(expected) + 1, "overwritten entries replaced in place, not kept"
    counters = read_json(run / "experiment.json")["dashcar"]["counters"]
    assert counters.get("files_lost", 0) == 0 and counters.get("missing", 0) == 0
    assert counters["files_stored"] == N, json.dumps(counters)
