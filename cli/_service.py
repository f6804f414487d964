"""``dashcar service install|uninstall``: the agent as a systemd unit, per user or for the machine.

The units are written from ``render`` (the files in the repository's ``systemd/`` are its
output for the defaults, checked by a test), with this installation's Python in ``ExecStart``.

- User unit (``--user``): ``~/.config/systemd/user/dashcar-agent.service``; runtime dir
  ``$XDG_RUNTIME_DIR/dashcar`` (where the SDK looks by default), state ``~/.local/state/dashcar``.
  Sandboxing that needs no user namespace (a user manager may not have them); with
  ``--data-root`` also ``ProtectSystem=strict`` with those roots writable, and the roots become
  the agent's allow-list.
- System unit: ``/etc/systemd/system/dashcar-agent.service``, one agent shared by the members
  of a group (``--group``, default ``dashcar``), running as ``--run-as`` (default ``dashcar``):
  runtime dir ``/run/dashcar`` (0750, sockets 0660, for the group), state ``/var/lib/dashcar``,
  ``ProtectSystem=strict`` with the data roots as the only writable paths, and those roots as
  the agent's allow-list (``data_roots``), so a producer asking for another root is refused.

Both: ``Type=notify`` (READY=1 once the sockets are bound and the WAL recovered, STATUS= with
live rates, STOPPING=1 on drain), ``WatchdogSec=30`` (the event loop pings every 15 s),
``Restart=on-failure`` but not after a startup failure or a second agent (exit 6, 7), and
``TimeoutStopSec`` five seconds above the drain deadline (``shutdown_timeout_s``).
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Final

from ._common import FAILED, OK, CliError, err, out

UNIT: Final = "dashcar-agent.service"
SYSTEM_UNIT_DIR: Final = Path("/etc/systemd/system")
STOP_MARGIN_S: Final = 5.0
"""TimeoutStopSec is the drain deadline plus this: systemd never kills a drain that keeps its deadline."""
WATCHDOG_S: Final = 30

USER_SANDBOX: Final = """\
NoNewPrivileges=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
SystemCallArchitectures=native"""

SYSTEM_SANDBOX: Final = """\
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallArchitectures=native
SystemCallFilter=@system-service
CapabilityBoundingSet="""


def _quote(path: str) -> str:
    """A path for a unit file line (spaces quoted, ``%`` escaped)."""
    p = path.replace("%", "%%")
    return f'"{p}"' if " " in p else p


def render(*, system: bool, python: str, data_roots: list[str], drain_s: float, user: str = "dashcar",
           group: str = "dashcar") -> str:
    """The unit file text (see the module docstring)."""
    stop_s = int(drain_s + STOP_MARGIN_S + 0.999)
    roots = [os.path.normpath(os.path.abspath(r)) for r in data_roots]
    kind = "system service shared by the members of a group." if system else "user service."
    lines = ["# dashcar agent as a systemd " + kind]
    lines += [
        "# Written by `dashcar service install" + ("" if system else " --user") + "`; see docs/operations.md.",
        "[Unit]",
        "Description=dashcar agent: durable local logging sidecar" + (f" (shared with group {group})" if system else ""),
        "Documentation=https://pypi.org/project/dashcar/",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
    ]
    if system:
        lines += [f"User={user}", f"Group={group}", "UMask=0007"]
    lines.append(f"ExecStart={python} -m dashcar.agent")
    if system:
        lines += [
            "Environment=DASHCAR_RUNTIME_DIR=/run/dashcar",
            "Environment=DASHCAR_STATE_DIR=/var/lib/dashcar",
            f"Environment=DASHCAR_SOCKET_GROUP={group}",
            "RuntimeDirectory=dashcar",
            "RuntimeDirectoryMode=0750",
        ]
    else:
        lines += [
            "# The SDK finds the agent through $XDG_RUNTIME_DIR/dashcar, the default for user sessions.",
            "Environment=DASHCAR_RUNTIME_DIR=%t/dashcar",
            "Environment=DASHCAR_STATE_DIR=%S/dashcar",
            "RuntimeDirectory=dashcar",
            "RuntimeDirectoryMode=0700",
        ]
    if roots:
        lines.append("Environment=" + _quote("DASHCAR_DATA_ROOTS=" + ",".join(roots)))
    lines += [
        "RuntimeDirectoryPreserve=yes",
        "StateDirectory=dashcar",
        "StateDirectoryMode=0700",
        f"WatchdogSec={WATCHDOG_S}",
        "Restart=on-failure",
        "RestartSec=1",
        "# 6: could not start (a setting, the WAL); 7: another agent serves the runtime dir.",
        "RestartPreventExitStatus=6 7",
        f"# The drain deadline (shutdown_timeout_s = {drain_s:g} s) plus {STOP_MARGIN_S:g} s.",
        f"TimeoutStopSec={stop_s}",
        "KillSignal=SIGTERM",
        "# Sandboxing: the agent needs its own directories and the data roots, nothing else.",
    ]
    if system:
        lines.append(SYSTEM_SANDBOX)
    else:
        lines.append(USER_SANDBOX)
        if roots:
            lines.append("ProtectSystem=strict")
    for r in roots:
        lines.append(f"ReadWritePaths={_quote(r)}")
    lines += ["", "[Install]", "WantedBy=" + ("multi-user.target" if system else "default.target"), ""]
    return "\n".join(lines)


def unit_path(system: bool, environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    """Where the unit goes: ``/etc/systemd/system`` or ``$XDG_CONFIG_HOME/systemd/user``."""
    if system:
        return SYSTEM_UNIT_DIR / UNIT
    config = environ.get("XDG_CONFIG_HOME") or os.path.join(environ.get("HOME", os.path.expanduser("~")), ".config")
    return Path(config) / "systemd" / "user" / UNIT


def systemd_running() -> bool:
    """True when systemd manages this machine (systemctl can talk to it)."""
    return shutil.which("systemctl") is not None and os.path.isdir("/run/systemd/system")


def _systemctl(system: bool, *args: str) -> tuple[int, str]:
    argv = ["systemctl", *([] if system else ["--user"]), *args]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return res.returncode, (res.stderr or res.stdout).strip()


def _drain_s() -> float:
    from dashcar.agent import config

    try:
        return config.load(os.environ, path=config.config_path(os.environ)).shutdown_timeout_s
    except Exception:
        return 10.0


def install(args: argparse.Namespace) -> int:
    """Write the unit, reload systemd, enable and start it (``--dry-run``: print it and the commands)."""
    system = not args.user
    text = render(system=system, python=sys.executable, data_roots=args.data_root or [], drain_s=_drain_s(),
                  user=args.run_as, group=args.group)
    path = unit_path(system)
    ctl = "systemctl" + ("" if system else " --user")
    steps = [["daemon-reload"], ["enable", "--now", "dashcar-agent"]]
    commands = [f"{ctl} {' '.join(step)}" for step in steps]
    notes = _notes(system, args)
    if args.dry_run:
        out().print(text, markup=False, end="")
        err().print(f"# would write {path}, then run: {' && '.join(commands)}", markup=False)
        for n in notes:
            err().print("# " + n, markup=False)
        return OK
    if system:
        _check_accounts(args.run_as, args.group)
        for r in args.data_root or []:
            if not os.path.isdir(r):
                raise CliError(f"data root {r} does not exist; create it: sudo install -d -o {args.run_as} -g {args.group} "
                               f"-m 2775 {r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        hint = " (a system unit needs root: sudo dashcar service install ...)" if system else ""
        raise CliError(f"cannot write {path}: {exc.strerror}{hint}") from exc
    err().print(f"wrote {path}", markup=False)
    for n in notes:
        err().print(n, markup=False)
    if args.no_start:
        err().print(f"not started (--no-start); start it with: {' && '.join(commands)}", markup=False)
        return OK
    if not systemd_running():
        raise CliError(f"systemd does not run here, so {path} is written but not enabled; on a machine with systemd run: "
                       + " && ".join(commands))
    for step, cmd in zip(steps, commands, strict=True):
        code, text_out = _systemctl(system, *step)
        if code != 0:
            raise CliError(f"`{cmd}` failed: {text_out}; fix that, then run it again")
        err().print(f"ran {cmd}", markup=False)
    return OK


def _notes(system: bool, args: argparse.Namespace) -> list[str]:
    if not system:
        user = os.environ.get("USER") or "$USER"
        return [f"note: a user service stops when you log out unless lingering is on: loginctl enable-linger {user}"]
    roots = ",".join(args.data_root or []) or "(any)"
    return [f"note: members of group {args.group} log through it: export DASHCAR_RUNTIME_DIR=/run/dashcar "
            f"DASHCAR_AUTOSPAWN=0, and write under the data roots {roots}"]


def _check_accounts(user: str, group: str) -> None:
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise CliError(f"user {user} does not exist; create it: sudo useradd --system --user-group --no-create-home {user}, "
                       "or pass --run-as") from None
    try:
        grp.getgrnam(group)
    except KeyError:
        raise CliError(f"group {group} does not exist; create it: sudo groupadd {group}, or pass --group") from None


def uninstall(args: argparse.Namespace) -> int:
    """Stop and disable the unit, remove its file, reload systemd."""
    system = not args.user
    path = unit_path(system)
    ctl = "systemctl" + ("" if system else " --user")
    if args.dry_run:
        err().print(f"# would run {ctl} disable --now dashcar-agent, remove {path}, run {ctl} daemon-reload", markup=False)
        return OK
    running = systemd_running()
    if running:
        code, text = _systemctl(system, "disable", "--now", "dashcar-agent")
        if code != 0 and path.exists():
            err().print(f"{ctl} disable --now dashcar-agent: {text}", markup=False)
        else:
            err().print(f"ran {ctl} disable --now dashcar-agent", markup=False)
    if path.exists():
        try:
            path.unlink()
        except OSError as exc:
            raise CliError(f"cannot remove {path}: {exc.strerror}" + (" (sudo?)" if system else "")) from exc
        err().print(f"removed {path}", markup=False)
    else:
        err().print(f"no unit at {path}; nothing to remove", markup=False)
    if running:
        code, text = _systemctl(system, "daemon-reload")
        if code != 0:
            raise CliError(f"{ctl} daemon-reload failed: {text}", FAILED)
    err().print("the agent's state dir is kept (its WAL may hold data); remove it yourself once it is empty", markup=False)
    return OK
