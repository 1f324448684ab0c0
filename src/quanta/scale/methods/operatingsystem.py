"""SCALE module OperatingSystem: processes and services."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, MethodError, method
from ..spec import ParamSpec as P
from ._common import iso, read_capped, read_text

_PROC_ATTRS = ["pid", "ppid", "name", "exe", "cmdline", "username", "create_time", "status", "memory_info", "num_threads"]


@method(
    "OperatingSystem", "GetProcesses", "Running processes.",
    columns=(
        C("ProcessId", "integer"), C("ParentProcessId", "integer"), C("Name", "string"),
        C("Executable", "string", "full path of the executable (the name when the path is not readable)"),
        C("CommandLine", "string"), C("UserName", "string"),
        C("AccountName", "string", "the account the process runs as (DOMAIN\\user on Windows), as the model names it"),
        C("StartTime", "datetime"),
        C("Status", "string"), C("MemoryBytes", "integer", "resident set size"), C("ThreadCount", "integer"),
    ),
)
def get_processes(env: MethodEnv, args: dict[str, object]):
    rows = []
    for p in psutil.process_iter(_PROC_ATTRS, ad_value=None):
        info = p.info
        cmd = info.get("cmdline")
        mem = info.get("memory_info")
        rows.append(env.take([
            info["pid"], info.get("ppid"), info.get("name"), info.get("exe") or info.get("name"),
            " ".join(cmd) if cmd else None, info.get("username"), info.get("username"), iso(info.get("create_time")),
            info.get("status"), mem.rss if mem else None, info.get("num_threads"),
        ]))
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




# -- service details --------------------------------------------------------------------------
SERVICE_INFO_COLUMNS = (
    C("Name", "string"), C("DisplayName", "string"), C("State", "string", "running, stopped, ..."),
    C("SubState", "string", "the unit's sub-state (systemd), else empty"),
    C("StartMode", "string", "enabled, disabled, static, masked, ... (auto/manual/disabled on Windows)"),
    C("ProcessId", "integer"), C("ExecutablePath", "string", "the program the service starts"),
    C("UserName", "string", "the account it runs as (empty: the service manager's default)"),
    C("UnitFile", "string", "the unit file or registry path"), C("Source", "string", "systemd, unit-files, launchd or scm"),
)
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.@\\][A-Za-z0-9:_.@\\-]{0,254}$")  # never an option ("-...")
MAX_SERVICE_OUTPUT = 8 * 1024 * 1024  # bytes of systemctl output read at most
MAX_UNIT_FILE = 256 * 1024
_SHOW_PROPS = "Id,LoadState,Description,ActiveState,SubState,UnitFileState,MainPID,ExecStart,User,FragmentPath"


def _run_bounded(cmd: list[str], env: MethodEnv, max_bytes: int = MAX_SERVICE_OUTPUT) -> str | None:
    """Standard output of ``cmd`` (None when it fails, times out or prints more than ``max_bytes``)."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    except OSError:
        return None
    try:
        assert proc.stdout is not None
        data = read_capped(proc.stdout, max_bytes, env)
        if len(data) > max_bytes:
            return None
        proc.wait(timeout=max(0.1, min(30.0, env.remaining())))
    except subprocess.TimeoutExpired:
        return None
    except MethodError:
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    return data.decode("utf-8", errors="replace") if proc.returncode == 0 else None


def _exec_path(exec_start: str) -> str | None:
    """The program of a systemd ExecStart= value (``{ path=/usr/sbin/sshd ; argv[]=... }`` or a command line)."""
    m = re.search(r"path=([^ ;]+)", exec_start)
    if m:
        return m.group(1)
    first = exec_start.strip().split(" ", 1)[0].lstrip("@-:+!")
    return first or None


def _service_info_systemctl(env: MethodEnv, name: str | None) -> list[list[object]] | None:
    exe = shutil.which("systemctl")
    if not exe or not Path("/run/systemd/system").is_dir():
        return None
    pattern = name if name is None or name.endswith(".service") else f"{name}.service"
    cmd = [exe, "show", "--type=service", "--all", "--no-pager", f"--property={_SHOW_PROPS}", "--", pattern or "*"]
    out = _run_bounded(cmd, env)
    if out is None:
        return None
    return parse_systemctl_show(out, env, only_loaded=name is not None)


def parse_systemctl_show(out: str, env: MethodEnv, only_loaded: bool = False) -> list[list[object]]:
    """Rows of SERVICE_INFO_COLUMNS from ``systemctl show`` output (blocks of Key=Value lines)."""
    rows = []
    for block in out.split("\n\n"):
        env.check_time()
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        unit = props.get("Id", "")
        if not unit.endswith(".service"):
            continue
        if only_loaded and props.get("LoadState") == "not-found":
            continue
        main_pid = props.get("MainPID") or "0"
        pid = int(main_pid) if main_pid.isdigit() and len(main_pid) < 10 else 0
        state = "running" if props.get("SubState") == "running" else props.get("ActiveState", "unknown")
        rows.append(env.take([
            unit[: -len(".service")], props.get("Description") or "", state, props.get("SubState") or "",
            props.get("UnitFileState") or "", pid or None, _exec_path(props.get("ExecStart") or "") or "",
            props.get("User") or "", props.get("FragmentPath") or "", "systemd",
        ]))
    return rows


def _unit_service_section(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    section = ""
    for line in (read_text(path, MAX_UNIT_FILE) or "").splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif "=" in line and not line.startswith(("#", ";")):
            k, v = line.split("=", 1)
            key = f"{section}.{k.strip()}"
            out.setdefault(key, v.strip())  # the first ExecStart= is the program
    return out


def _service_info_unit_files(env: MethodEnv, name: str | None) -> list[list[object]]:
    rows = []
    for base in _services_from_unit_files(env):
        if name is not None and base[0] != name.removesuffix(".service"):
            continue
        env.check_time()
        path = Path(str(base[5]))
        props = {} if base[3] == "masked" else _unit_service_section(path)
        rows.append(env.take([
            base[0], base[1] or "", "unknown", "", base[3] or "", None,
            _exec_path(props.get("Service.ExecStart", "")) or "", props.get("Service.User", ""), str(path), "unit-files",
        ]))
    return rows


@method(
    "OperatingSystem", "GetServiceInfo",
    "Details of services (one by Name, or all): state, start mode, process, program, account and unit file. "
    "On Linux from systemd (systemctl show, output capped at 8 MB) or, when systemd is not running, from the "
    "unit files (each read up to 256 KB; FIFOs, devices and symbolic-link loops are skipped); launchd jobs on "
    "macOS; the SCM on Windows. An unknown Name gives an empty table.",
    params=(P("Name", "string", default=None, description="service name (with or without .service); omitted: all"),),
    columns=SERVICE_INFO_COLUMNS,
)
def get_service_info(env: MethodEnv, args: dict[str, object]):
    name = None if args.get("Name") is None else str(args["Name"])
    if name is not None and not _UNIT_NAME.match(name):
        raise MethodError("Name must be a service name: letters, digits and ':_.@\\-', at most 255 characters")
    if sys.platform.startswith("win"):
        base = [r for r in _services_windows(env) if name is None or str(r[0]).lower() == name.lower()]
        return [env.take([r[0], r[1] or "", r[2] or "", "", r[3] or "", r[4], "", "", "", "scm"]) for r in base]
    if sys.platform == "darwin":
        base = [r for r in _services_macos(env) if name is None or r[0] == name]
        return [env.take([r[0], "", r[2], "", "", r[4], "", "", "", "launchd"]) for r in base]
    rows = _service_info_systemctl(env, name)
    if rows is None:
        rows = _service_info_unit_files(env, name)
    return rows
