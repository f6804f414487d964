"""``dashcar doctor``: check the installation and the agent, and say what to fix.

Each check ends ``ok``, ``warn`` (works, but look) or ``fail`` (something is broken), with the
fix in the same line. Exit 0 with no failure, ``UNHEALTHY`` (4) with any.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Final, Literal

from rich.table import Table
from rich.text import Text

import dashcar
from dashcar import _agent
from dashcar.proto import PROTOCOL_MINOR, PROTOCOL_VERSION

from ._common import OK, UNHEALTHY, agent_dir, human_bytes, out, try_ask
from ._service import UNIT, systemd_running, unit_path

Level = Literal["ok", "warn", "fail"]
STYLE: Final = {"ok": "green", "warn": "yellow", "fail": "red bold"}
MIN_FREE_BYTES: Final = 1 << 30


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _runtime(path: Path) -> tuple[Level, str]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "warn", f"{path} does not exist yet; the agent (or the SDK's auto-start) creates it"
    if not stat.S_ISDIR(st.st_mode):
        return "fail", f"{path} is not a directory; remove it or set DASHCAR_RUNTIME_DIR"
    mode = stat.S_IMODE(st.st_mode)
    who = f"owner {_owner(st.st_uid)}, mode {mode:04o}"
    if st.st_uid != os.getuid():
        if os.access(path, os.R_OK | os.X_OK) and mode & 0o050 == 0o050 and not mode & 0o007:
            return "ok", f"{path}: {who}, shared with your group (a system agent)"
        return "fail", f"{path}: {who}, not yours and not shared with you; set DASHCAR_RUNTIME_DIR to a directory of yours"
    if mode & 0o077 and not mode & 0o007:
        return "ok", f"{path}: {who} (shared with its group)"
    if mode & 0o007:
        return "fail", f"{path}: {who}, open to every user; chmod 700 {path}"
    return "ok", f"{path}: {who}"


def checks(args: argparse.Namespace) -> list[tuple[str, Level, str]]:
    """Every check as ``(name, level, what it found and what to do)``."""
    from dashcar.agent import config

    rows: list[tuple[str, Level, str]] = []
    rt = agent_dir(args)
    rows.append(("python", "ok", f"{sys.version.split()[0]} at {sys.executable}, dashcar {dashcar.__version__}"))
    rows.append(("runtime dir", *_runtime(rt)))
    st: dict[str, Any] | None = None
    if _agent.agent_running(rt):
        st = try_ask(args, {"op": "status"}, 5.0)
        if st is None:
            rows.append(("agent", "fail", f"an agent holds {rt}/agent.lock but does not answer in 5 s; look at its log "
                                          "(journalctl --user -u dashcar-agent, or agent.log in its state dir), or restart it"))
    else:
        rows.append(("agent", "warn", f"no agent runs at {rt}; the SDK starts one on first use, or run "
                                      "`dashcar agent` / `dashcar service install --user`"))
    if st is not None:
        rows.append(("agent", "ok", f"pid {st['pid']}, up {st['uptime_s']:.0f} s, dashcar {st['version']['agent']}"))
        ap = st["version"]["protocol"]
        level: Level = "ok" if ap[0] == PROTOCOL_VERSION else "fail"
        fix = "" if level == "ok" else "; install one dashcar version for the SDK and the agent, then `dashcar stop`"
        note = "" if st["version"]["agent"] == dashcar.__version__ else f" (this install is dashcar {dashcar.__version__})"
        rows.append(("protocol", level, f"SDK {PROTOCOL_VERSION}.{PROTOCOL_MINOR}, agent {ap[0]}.{ap[1]}{note}{fix}"))
        wal = st["wal"]
        used = wal["bytes"] / max(1, wal["cap_bytes"])
        wlevel: Level = "fail" if wal["error"] or wal["full"] else ("warn" if used > 0.5 else "ok")
        wtext = (f"{human_bytes(wal['bytes'])} of its {human_bytes(wal['cap_bytes'])} cap, backlog {wal['backlog']} records"
                 + (f"; error: {wal['error']}" if wal["error"] else "") + ("; FULL: a sink lags, see `dashcar status`"
                                                                          if wal["full"] else ""))
        rows.append(("WAL", wlevel, wtext))
        free = wal.get("free_bytes", 0)
        flevel: Level = "fail" if free < MIN_FREE_BYTES else ("warn" if free < wal["cap_bytes"] else "ok")
        rows.append(("state dir", flevel, f"{st['state_dir']}: {human_bytes(free)} free"
                     + ("; the WAL may fill the disk before its cap: free space or lower wal_max_bytes"
                        if flevel != "ok" else "")))
        for name, s in sorted(st["sinks"].items()):
            slevel: Level = "fail" if s["error"] else "ok"
            rows.append((f"sink {name}", slevel, f"lag {s['lag']['frames']} frames"
                         + (f"; failing: {s['error']} (data waits in the WAL; fix the cause, it retries)" if s["error"] else "")))
        health = st.get("health", {})
        if health.get("losing_data"):
            rows.append(("losses", "fail", "; ".join(health.get("problems", [])) + "; `dashcar status` has the detail"))
        roots = st.get("data_roots") or []
        if roots:
            cwd_root = os.path.abspath(".dash")
            inside = any(cwd_root == r or cwd_root.startswith(r.rstrip("/") + "/") for r in roots)
            rows.append(("data roots", "ok" if inside else "warn",
                         f"the agent writes only under {', '.join(roots)}" + ("" if inside else
                         "; ./.dash is not among them: pass dash_root= under one of them")))
    else:
        try:
            cfg = config.load(os.environ, path=config.config_path(os.environ))
            state = cfg.state_dir
            free = shutil.disk_usage(state if state.exists() else state.parent if state.parent.exists() else Path("/")).free
            wal = state / "wal" / "data.mdb"
            size = wal.stat().st_size if wal.exists() else 0
            rows.append(("state dir", "ok" if free >= MIN_FREE_BYTES else "fail",
                         f"{state}: {human_bytes(free)} free; WAL file {human_bytes(size)}"
                         + (" (replayed by the next agent)" if size else "")))
        except Exception as exc:
            rows.append(("config", "fail", f"{exc}; fix the setting (`dashcar config show`)"))
    rows.append(_unit())
    for mod, why in (("pyarrow", "parquet export and read(format='parquet')"), ("mcap", "export --format mcap"),
                     ("matplotlib", "dashcar plot (pip install 'dashcar[plot]')")):
        found = importlib.util.find_spec(mod) is not None
        rows.append((mod, "ok" if found else ("warn" if mod == "matplotlib" else "fail"),
                     ("installed" if found else "missing") + f": {why}"))
    return rows


def _unit() -> tuple[str, Level, str]:
    if not systemd_running():
        return "systemd", "ok", "not running here: no unit to check (the SDK starts an agent when needed)"
    found = []
    for system in (False, True):
        path = unit_path(system)
        if not path.exists():
            continue
        argv = ["systemctl", *([] if system else ["--user"]), "is-active", UNIT]
        try:
            state = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            state = str(exc)
        found.append(f"{'system' if system else 'user'} unit {state}")
        if state not in ("active", "activating", "reloading"):
            ctl = "systemctl" + ("" if system else " --user")
            return ("systemd", "warn",
                    f"{path}: {state}; see `{ctl} status dashcar-agent`, start it with `{ctl} start dashcar-agent`")
    if not found:
        return "systemd", "ok", "no dashcar unit installed (`dashcar service install --user` adds one)"
    return "systemd", "ok", ", ".join(found)


def run(args: argparse.Namespace) -> int:
    """Print the checks; exit 4 if any failed."""
    rows = checks(args)
    if args.json:
        print(json.dumps([{"check": n, "level": lv, "detail": d} for n, lv, d in rows], indent=2))
    else:
        table = Table(show_header=False, box=None, padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        table.add_column()
        for name, level, detail in rows:
            table.add_row(name, Text(level, style=STYLE[level]), detail)
        out().print(table)
        fails = sum(1 for _, lv, _ in rows if lv == "fail")
        warns = sum(1 for _, lv, _ in rows if lv == "warn")
        out().print(f"{fails} problem(s), {warns} warning(s)")
    return UNHEALTHY if any(lv == "fail" for _, lv, _ in rows) else OK
