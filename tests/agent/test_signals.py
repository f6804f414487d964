"""The agent's own signals: one table behind status and Prometheus, and one-line, journald-aware logs."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import dashcar
from dashcar.agent import logs, signals
from dashcar.agent.config import parse_address
from dashcar.agent.main import STARTUP_FAILURE
from tests.conftest import AgentHandle, wait_until


def test_table_names_and_places() -> None:
    names = [s.name for s in signals.TABLE]
    assert len(names) == len(set(names))
    for sig in signals.TABLE:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", sig.name) and sig.help.endswith((".", ")"))
        assert sig.exposed_name.endswith("_total") == (sig.kind == "counter")
        for label in sig.labels:
            assert "{" + label + "}" in sig.path
    doc = signals.place([("frames_received", {}, 5), ("frames_rejected", {"reason": "version"}, 2),
                         ("sink_lag_frames", {"sink": "my.sink"}, 7), ("frames_in_per_second", {}, 1.5)])
    assert doc == {"frames": {"received": 5, "rejected_by": {"version": 2}}, "sinks": {"my.sink": {"lag": {"frames": 7}}},
                   "rates": {"in_fps": 1.5}}


def test_operations_doc_lists_every_signal() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    for sig in signals.TABLE:
        assert f"| `{sig.exposed_name}` | {sig.kind} |" in doc, f"docs/operations.md misses {sig.exposed_name}"


def test_metrics_address_parsing() -> None:
    assert parse_address("9464") == ("127.0.0.1", 9464)
    assert parse_address(":9464") == ("127.0.0.1", 9464)
    assert parse_address("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    with pytest.raises(ValueError, match=r"is not host:port; write e\.g\. 127\.0\.0\.1:9464"):
        parse_address("localhost:http")
    assert signals.is_loopback("127.0.0.1") and signals.is_loopback("::1") and not signals.is_loopback("0.0.0.0")


def _scrape(address: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_prometheus_endpoint_serves_the_table(agent_factory: Any) -> None:
    agent: AgentHandle = agent_factory("--merge-window-s", "0.1", "--metrics-address", "127.0.0.1:0").start()
    address = agent.status()["metrics_address"]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", address) and not address.endswith(":0")
    exp = dashcar.Experiment(prefix="lab/prom/run", dash_root=agent.data_dir, echo_logs=False)
    with exp.run:
        for i in range(30):
            exp.tracks("t").append(i=i, _ts=float(i))
    st = wait_until(lambda: (s := agent.status())["frames"]["received"] == 33 and s, 10, "open, 30 rows, close, flush")
    families = _scrape(address)
    for sig in signals.TABLE:
        # the parser strips _total from a counter family's name
        fam = families[signals.PREFIX + sig.name]
        assert fam.type == sig.kind and fam.documentation == sig.help, sig.name
        if not sig.labels or sig.labels == ("sink",):
            assert fam.samples, f"{sig.name} has a value"
        for sample in fam.samples:
            assert set(sample.labels) == set(sig.labels)
    received = next(s for s in families["dashcar_frames_received"].samples if s.name == "dashcar_frames_received_total")
    assert received.value == st["frames"]["received"] == 33
    lag = families["dashcar_sink_lag_frames"].samples
    assert sorted((s.labels["sink"], s.value) for s in lag) == [("dash", 0.0), ("jsonl", 0.0)]
    assert "dashcar_process_resident_memory_bytes" in families or "dashcar_process_cpu_seconds" in families


def test_prometheus_is_off_by_default_and_a_bad_address_stops_the_start(agent: AgentHandle, dirs: Path) -> None:
    assert agent.status()["metrics_address"] is None
    base = [sys.executable, "-m", "dashcar.agent", "--runtime-dir", str(dirs / "rt2"), "--state-dir", str(dirs / "st2")]
    res = subprocess.run([*base, "--metrics-address", "here"], capture_output=True, text=True, timeout=60)
    assert res.returncode == STARTUP_FAILURE
    assert res.stderr == "dashcar agent: metrics_address 'here' is not host:port; write e.g. 127.0.0.1:9464\n"
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run([*base, "--metrics-address", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert res.returncode == STARTUP_FAILURE
    assert f"cannot serve metrics on '127.0.0.1:{port}'" in res.stderr and "pick a free port" in res.stderr


LINE = re.compile(r"^<[2-7]>(DEBUG|INFO|WARNING|ERROR|CRITICAL) dashcar\.\S+ \S")


def test_logs_are_one_line_per_event_without_timestamps_on_the_journal(agent_factory: Any, dirs: Path) -> None:
    """stderr is the journal's stream (``$JOURNAL_STREAM`` = its device:inode): priorities, no timestamps,
    nothing per frame; the same agent logging to a plain file keeps its timestamps."""
    h: AgentHandle = agent_factory("--merge-window-s", "0.1")
    log_path = dirs / "journal.log"
    with open(log_path, "wb") as log:
        st = os.fstat(log.fileno())
        env = dict(h.env(), JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        proc = subprocess.Popen([sys.executable, "-m", "dashcar.agent", "--runtime-dir", str(h.runtime_dir), "--state-dir",
                                 str(h.state_dir), "--merge-window-s", "0.1"], env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log)
    h.proc = proc
    h.log_path = log_path
    wait_until(lambda: "agent ready" in log_path.read_text(), 30, "agent ready")
    exp = dashcar.Experiment(prefix="lab/logs/run", dash_root=h.data_dir, echo_logs=False)
    with exp.run:
        for i in range(5000):
            exp.tracks("t").append(i=i, _ts=float(i))
    from tests.cli.test_cli import _send_bad_frames

    _send_bad_frames(h, 500)
    wait_until(lambda: h.status()["frames"]["rejected"] == 500, 10, "bad frames counted")
    assert h.stop() == 0
    lines = log_path.read_text().splitlines()
    assert all(LINE.match(line) for line in lines), "\n".join(lines)
    assert any(line.startswith("<6>INFO dashcar.agent.service agent ready ") for line in lines)
    assert any(line.startswith("<4>WARNING dashcar.agent.ingest message refused reason=version") for line in lines)
    assert len(lines) < 20, f"nothing per frame above DEBUG: 5500 frames made {len(lines)} lines"
    plain = logging.getLogger("test.plain")
    with open(dirs / "plain.log", "w") as f:
        handler = logging.StreamHandler(f)
        handler.setFormatter(logs.OneLine(logs.to_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})))
        plain.addHandler(handler)
        try:
            raise ValueError("two\nlines")
        except ValueError:
            plain.exception("failed here")
        plain.removeHandler(handler)
    (text,) = (dirs / "plain.log").read_text().splitlines()
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ERROR test\.plain failed here\\nTraceback", text)
    assert "ValueError: two\\nlines" in text
