"""SCALE module OperatingSystem: processes and services."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, MethodError, method
from ..spec import ParamSpec as P
from ._common import iso, read_text

_PROC_ATTRS = ["pid", "ppid", "name", "exe", "cmdline", "username", "create_time", "status", "memory_info", "num_threads"]


@method(
    "OperatingSystem", "GetProcesses", "Running processes.",
    columns=(
        C("ProcessId", "integer"), C("ParentProcessId", "integer"), C("Name", "string"),
        C("Executable", "string", "full path of the executable (the name when the path is not readable)"),
        C("CommandLine", "string"), C("UserName", "string"), C("StartTime", "datetime"),
        C("Status", "string"), C("MemoryBytes", "integer", "resident set size"), C("ThreadCount", "integer"),
    ),
)
def get_processes(env: MethodEnv, args: dict[str, object]):
    rows = []
    for p in psutil.process_iter(_PROC_ATTRS, ad_value=None):
        info = p.info
        cmd = info.get("cmdline")
        mem = info.get("memory_info")
        rows.append([
            info["pid"], info.get("ppid"), info.get("name"), info.get("exe") or info.get("name"),
            " ".join(cmd) if cmd else None, info.get("username"), iso(info.get("create_time")),
            info.get("status"), mem.rss if mem else None, info.get("num_threads"),
        ])
        if len(rows) % 256 == 0:
            env.check_time()
    return rows


@method(
    "OperatingSystem", "KillProcess", "Terminate a process (SIGKILL on POSIX). ProcessId must be a string.",
    params=(P("ProcessId", "string", required=True, description="the process id, as a string"),),
    columns=(C("ProcessId", "integer"), C("Killed", "boolean")),
    is_action=True,
)
def kill_process(env: MethodEnv, args: dict[str, object]):
    raw = str(args["ProcessId"]).strip()
    if not raw.isdigit():
        raise MethodError(f"ProcessId '{raw}' is not a process id")
    pid = int(raw)
    if pid in (0, 1) or pid == os.getpid():
        raise MethodError(f"Refusing to kill process {pid}")
    try:
        proc = psutil.Process(pid)
        proc.kill()
        try:
            proc.wait(timeout=max(0.1, min(5.0, env.remaining())))
        except psutil.TimeoutExpired:
            return [[pid, False]]
        return [[pid, True]]
    except psutil.NoSuchProcess:
        return [[pid, False]]
    except psutil.AccessDenied:
        raise MethodError(f"Access denied killing process {pid}") from None


# -- services ---------------------------------------------------------------------------------
SERVICE_COLUMNS = (
    C("Name", "string"), C("DisplayName", "string"), C("State", "string", "running, stopped, ..."),
    C("StartMode", "string", "enabled, disabled, static, ... (auto/manual/disabled on Windows)"),
    C("ProcessId", "integer"), C("Source", "string"),
)
# Unit-file directories read when systemd is not running (for example inside a container).
SYSTEMD_UNIT_DIRS = [Path("/etc/systemd/system"), Path("/run/systemd/system"), Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")]


def _unit_description(path: Path) -> str | None:
    for line in (read_text(path) or "").splitlines():
        if line.startswith("Description="):
            return line.split("=", 1)[1].strip()
    return None


def _services_from_unit_files(env: MethodEnv) -> list[list[object]]:
    seen: dict[str, list[object]] = {}
    enabled: set[str] = set()
    for d in SYSTEMD_UNIT_DIRS:
        for wants in d.glob("*.target.wants/*.service") if d.is_dir() else []:
            enabled.add(wants.name)
    for d in SYSTEMD_UNIT_DIRS:
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.service")):
            env.check_time()
            if path.name in seen:
                continue
            name = path.name[: -len(".service")]
            try:
                masked = path.is_symlink() and os.readlink(path) == "/dev/null"
            except OSError:
                masked = False
            mode = "masked" if masked else ("enabled" if path.name in enabled else ("static" if name.endswith("@") else "disabled"))
            seen[path.name] = [name, None if masked else _unit_description(path), "unknown", mode, None, str(path)]
    return list(seen.values())


def _services_systemctl(env: MethodEnv) -> list[list[object]] | None:
    exe = shutil.which("systemctl")
    if not exe or not Path("/run/systemd/system").is_dir():
        return None
    try:
        out = subprocess.run(
            [exe, "show", "--type=service", "--all", "--no-pager", "--property=Id,Description,ActiveState,SubState,UnitFileState,MainPID", "*"],
            capture_output=True, text=True, timeout=max(1.0, min(30.0, env.remaining())),
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    rows = []
    for block in out.stdout.split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        unit = props.get("Id", "")
        if not unit.endswith(".service"):
            continue
        pid = int(props.get("MainPID") or 0) or None
        state = "running" if props.get("SubState") == "running" else props.get("ActiveState", "unknown")
        rows.append([unit[: -len(".service")], props.get("Description"), state, props.get("UnitFileState") or None, pid, "systemd"])
    return rows


def _services_windows(env: MethodEnv) -> list[list[object]]:
    rows = []
    for s in psutil.win_service_iter():  # type: ignore[attr-defined]
        try:
            d = s.as_dict()
        except Exception:
            continue
        rows.append([d.get("name"), d.get("display_name"), d.get("status"), d.get("start_type"), d.get("pid"), "scm"])
    return rows


def _services_macos(env: MethodEnv) -> list[list[object]]:
    try:
        out = subprocess.run(["launchctl", "list"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MethodError(f"launchctl failed: {e}") from None
    rows = []
    for line in out.stdout.splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) == 3:
            pid = int(parts[0]) if parts[0].isdigit() else None
            rows.append([parts[2], None, "running" if pid else "stopped", None, pid, "launchd"])
    return rows


@method(
    "OperatingSystem", "GetServices",
    "Services: systemd units on Linux (unit files when systemd is not running), launchd jobs on macOS, the SCM on Windows.",
    columns=SERVICE_COLUMNS,
)
def get_services(env: MethodEnv, args: dict[str, object]):
    if sys.platform.startswith("win"):
        return _services_windows(env)
    if sys.platform == "darwin":
        return _services_macos(env)
    rows = _services_systemctl(env)
    if rows is None:
        rows = _services_from_unit_files(env)
    return rows


