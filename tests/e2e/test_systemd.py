"""systemd: the units, ``dashcar service``, and the agent's sd_notify against a stand-in for systemd.

The stand-in is a real datagram socket passed as ``$NOTIFY_SOCKET``, read by a thread of the
test, which plays systemd's part: it records READY=1, STATUS=, WATCHDOG=1 and STOPPING=1, and
when no WATCHDOG=1 has come for ``$WATCHDOG_USEC`` it "fires" as systemd does (SIGABRT), after
which the agent is started again as ``Restart=on-failure`` would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import dashcar
from dashcar import _agent
from dashcar.cli._service import render
from tests.conftest import AgentHandle, read_jsonl, wait_until

REPO = Path(__file__).resolve().parents[2]
DASHCAR = str(Path(sys.executable).with_name("dashcar"))
ANALYZE = shutil.which("systemd-analyze")


def verify(path: Path) -> str:
    """``systemd-analyze verify``'s complaints about ``path`` (it exits 0 on warnings, so they are read)."""
    if ANALYZE is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing; .ci/run installs Debian's systemd package")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    res = subprocess.run([ANALYZE, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return "\n".join(line for line in res.stderr.splitlines() if path.name in line)


def test_shipped_units_are_what_service_install_writes() -> None:
    assert (REPO / "systemd" / "dashcar-agent.service").read_text() == render(
        system=False, python="/usr/bin/env python3", data_roots=[], drain_s=10.0)
    assert (REPO / "systemd" / "dashcar-agent-system.service").read_text() == render(
        system=True, python="/usr/bin/env python3", data_roots=["/srv/dash"], drain_s=10.0)


def test_every_unit_passes_systemd_analyze_verify(dirs: Path) -> None:
    units = sorted((REPO / "systemd").glob("*.service"))
    assert len(units) == 2
    variants = {
        "user-roots": render(system=False, python=sys.executable, data_roots=[str(dirs / "a b"), "/srv/x%y"], drain_s=30),
        "system-two-roots": render(system=True, python=sys.executable, data_roots=["/srv/dash", "/data/robots"], drain_s=5,
                                   user="labagent", group="lab"),
    }
    for name, text in variants.items():
        path = dirs / f"{name}.service"
        path.write_text(text)
        units.append(path)
    for unit in units:
        assert verify(unit) == "", f"{unit.name}: {verify(unit)}"
    text = (REPO / "systemd" / "dashcar-agent-system.service").read_text()
    assert "ProtectSystem=strict" in text and "ReadWritePaths=/srv/dash" in text and "DASHCAR_DATA_ROOTS=/srv/dash" in text
    assert "TimeoutStopSec=15" in text and "Type=notify" in text and "WatchdogSec=30" in text
    assert "TimeoutStopSec=35" in variants["user-roots"], "the stop timeout follows the drain deadline"


def test_service_install_and_uninstall_a_user_unit(dirs: Path) -> None:
    env = dict(os.environ, XDG_CONFIG_HOME=str(dirs / "config"), DASHCAR_SHUTDOWN_TIMEOUT_S="20")
    unit = dirs / "config" / "systemd" / "user" / "dashcar-agent.service"
    dry = subprocess.run([DASHCAR, "service", "install", "--user", "--dry-run"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert dry.returncode == 0 and dry.stdout.startswith("# dashcar agent as a systemd user service.")
    assert f"would write {unit}" in dry.stderr and "loginctl enable-linger" in dry.stderr and not unit.exists()
    assert "TimeoutStopSec=25" in dry.stdout, "the drain deadline of the effective config, plus 5 s"
    data = dirs / "data"
    data.mkdir()
    res = subprocess.run([DASHCAR, "service", "install", "--user", "--no-start", "--data-root", str(data)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    text = unit.read_text()
    assert f"ReadWritePaths={data}" in text and f"Environment=DASHCAR_DATA_ROOTS={data}" in text
    assert "ProtectSystem=strict" in text and " -m dashcar.agent" in text
    assert verify(unit) == ""
    if not os.path.isdir("/run/systemd/system"):
        res = subprocess.run([DASHCAR, "service", "install", "--user"], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 1 and res.stderr.splitlines()[-1].startswith("dashcar: systemd does not run here, so ")
    res = subprocess.run([DASHCAR, "service", "uninstall", "--user"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and f"removed {unit}" in res.stderr and not unit.exists()
    system = subprocess.run([DASHCAR, "service", "install", "--dry-run", "--data-root", "/srv/dash"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert system.returncode == 0 and "User=dashcar" in system.stdout and "DASHCAR_SOCKET_GROUP=dashcar" in system.stdout
    path = dirs / "system.service"
    path.write_text(system.stdout)
    assert verify(path) == ""


class FakeSystemd:
    """A datagram socket standing in for ``$NOTIFY_SOCKET``; records what the agent tells it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            for line in data.decode().splitlines():
                self.messages.append((now, line))

    def seen(self, prefix: str) -> list[tuple[float, str]]:
        return [(t, m) for t, m in list(self.messages) if m.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def fake_systemd(dirs: Path) -> Iterator[FakeSystemd]:
    fs = FakeSystemd(dirs / "notify.sock")
    yield fs
    fs.close()


FREEZABLE_AGENT = textwrap.dedent("""
    import resource, signal, sys, time
    from dashcar.agent.main import main
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the stand-in's SIGABRT leaves no core file behind
    # A Python signal handler runs on the main thread, which runs the agent's event loop:
    # SIGUSR1 wedges the loop (the threads and the ingest process go on), as a stuck task would.
    signal.signal(signal.SIGUSR1, lambda *_: time.sleep(3600))
    sys.exit(main(sys.argv[1:]))
""")


def test_watchdog_fires_when_the_event_loop_is_wedged_and_a_restart_keeps_the_data(
    agent_factory: object, fake_systemd: FakeSystemd, dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h: AgentHandle = agent_factory("--merge-window-s", "0.1")  # type: ignore[operator]
    watchdog_s = 3.0
    env = dict(h.env(), NOTIFY_SOCKET=str(fake_systemd.path), WATCHDOG_USEC=str(int(watchdog_s * 1e6)))
    with open(dirs / "agent.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-c", FREEZABLE_AGENT, "--runtime-dir", str(h.runtime_dir),
                                 "--state-dir", str(h.state_dir), "--merge-window-s", "0.1"],
                                env=env, cwd=dirs, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        wait_until(lambda: fake_systemd.seen("READY=1"), 30, "READY=1")
        assert _agent.request(h.runtime_dir, {"op": "ping"}, 5), "ready means the control socket answers"
        exp = dashcar.Experiment(prefix="lab/watchdog/run", dash_root=h.data_dir, echo_logs=False)
        with exp.run:
            for i in range(100):
                exp.tracks("t").append(i=i, _ts=float(i))
        wait_until(lambda: len(fake_systemd.seen("WATCHDOG=1")) >= 2, 20, "watchdog pings")
        status = wait_until(lambda: fake_systemd.seen("STATUS="), 20, "a STATUS= line")
        assert status[-1][1].startswith("STATUS=in ") and "fps" in status[-1][1] and "WAL" in status[-1][1]

        proc.send_signal(signal.SIGUSR1)
        frozen_at = time.monotonic()
        # systemd's part: no WATCHDOG=1 for WatchdogSec, then SIGABRT.
        deadline = frozen_at + 60
        while True:
            last = max(t for t, _ in fake_systemd.seen("WATCHDOG=1"))
            if time.monotonic() - max(last, frozen_at) > watchdog_s:
                break
            assert time.monotonic() < deadline, "the pings never stopped: the watchdog would not fire"
            time.sleep(0.1)
        assert _agent.request(h.runtime_dir, {"op": "ping"}, 0.5) is None, "the wedged loop answers nothing"
        assert proc.poll() is None
        proc.send_signal(signal.SIGABRT)
        assert proc.wait(20) == -signal.SIGABRT
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # Restart=on-failure: a new agent recovers, and what was written stays written once.
    fake_systemd.messages.clear()
    h.extra_args = ["--merge-window-s", "0.1"]
    monkeypatch.setenv("NOTIFY_SOCKET", str(fake_systemd.path))
    h.start()
    wait_until(lambda: fake_systemd.seen("READY=1"), 30, "READY=1 after the restart")
    assert [r["i"] for r in read_jsonl(exp.run_dir / "tracks" / "t" / "data.jsonl")] == list(range(100))
    assert h.stop() == 0
    stopping = fake_systemd.seen("STOPPING=1")
    assert stopping, "STOPPING=1 on drain"
    assert fake_systemd.seen("STATUS=draining, deadline 10 s")
