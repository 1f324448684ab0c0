"""SCALE module Device: identity and hardware."""

from __future__ import annotations

import platform
import socket
import sys
import uuid

import psutil

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, method
from ._common import iso, os_release, os_type, read_text


def _cpu_model() -> str | None:
    if sys.platform.startswith("linux"):
        text = read_text("/proc/cpuinfo") or ""
        for line in text.splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _dmi(name: str) -> str | None:
    if sys.platform.startswith("linux"):
        return read_text(f"/sys/class/dmi/id/{name}") or None
    return None


def _os_name_version() -> tuple[str, str]:
    if sys.platform.startswith("linux"):
        rel = os_release()
        return rel.get("PRETTY_NAME") or rel.get("NAME") or "Linux", rel.get("VERSION_ID") or platform.release()
    if sys.platform == "darwin":
        return "macOS", platform.mac_ver()[0]
    if sys.platform.startswith("win"):
        return f"Windows {platform.release()}", platform.version()
    return platform.system(), platform.release()


@method(
    "Device", "GetSummary", "Identity, operating system and hardware summary of the device.",
    columns=(
        C("DeviceName", "string"), C("Fqdn", "string"), C("OperatingSystemType", "string", "Linux, Windows or MacOS"),
        C("OperatingSystem", "string"), C("OperatingSystemVersion", "string"), C("KernelVersion", "string"),
        C("Architecture", "string"), C("Manufacturer", "string"), C("Model", "string"), C("MachineId", "string"),
        C("MacAddress", "string"), C("CpuModel", "string"), C("CpuCores", "integer"), C("CpuLogicalProcessors", "integer"),
        C("TotalMemoryBytes", "integer"), C("BootTime", "datetime"),
    ),
)
def get_summary(env: MethodEnv, args: dict[str, object]):
    name, version = _os_name_version()
    machine_id = read_text("/etc/machine-id") if sys.platform.startswith("linux") else None
    mac = ":".join(f"{(uuid.getnode() >> s) & 0xFF:02x}" for s in range(40, -1, -8))
    return [[
        socket.gethostname(), socket.getfqdn(), os_type(), name, version, platform.release(),
        platform.machine(), _dmi("sys_vendor"), _dmi("product_name"), machine_id or None, mac,
        _cpu_model(), psutil.cpu_count(logical=False), psutil.cpu_count(logical=True),
        psutil.virtual_memory().total, iso(psutil.boot_time()),
    ]]


@method(
    "Device", "GetDisks", "Mounted disk partitions with their capacity and usage.",
    columns=(
        C("Device", "string"), C("MountPoint", "string"), C("FileSystem", "string"), C("Options", "string"),
        C("TotalBytes", "integer"), C("UsedBytes", "integer"), C("FreeBytes", "integer"), C("PercentUsed", "number"),
    ),
)
def get_disks(env: MethodEnv, args: dict[str, object]):
    rows = []
    for part in psutil.disk_partitions(all=False):
        env.check_time()
        try:
            u = psutil.disk_usage(part.mountpoint)
            total, used, free, pct = u.total, u.used, u.free, u.percent
        except (OSError, PermissionError):
            total = used = free = pct = None
        rows.append([part.device, part.mountpoint, part.fstype, part.opts, total, used, free, pct])
    return rows


def _linux_processors() -> list[dict[str, object]]:
    """One dict per physical package from /proc/cpuinfo (a block per logical processor)."""
    packages: dict[str, dict[str, object]] = {}
    for block in (read_text("/proc/cpuinfo") or "").split("\n\n"):
        info: dict[str, str] = {}
        for line in block.splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                info[k.strip().lower()] = v.strip()
        if "processor" not in info:
            continue
        pkg = packages.setdefault(info.get("physical id", "0"), {
            "name": info.get("model name") or info.get("cpu model") or info.get("hardware") or "",
            "vendor": info.get("vendor_id") or info.get("cpu implementer") or "",
            "cores": set(), "logical": 0, "mhz": info.get("cpu mhz"),
        })
        pkg["logical"] = int(pkg["logical"]) + 1  # type: ignore[call-overload]
        pkg["cores"].add(info.get("core id", info["processor"]))  # type: ignore[union-attr]
    return [packages[k] for k in sorted(packages, key=lambda x: int(x) if x.isdigit() else 0)]


def _max_mhz() -> int | None:
    try:
        f = psutil.cpu_freq()
    except (OSError, NotImplementedError, AttributeError):
        return None
    return int(f.max or f.current) if f and (f.max or f.current) else None


@method(
    "Device", "GetProcessors",
    "The device's processors: one row per physical processor (package), with its cores and logical processors.",
    columns=(
        C("DeviceId", "string", "CPU0, CPU1, ... by package"), C("Name", "string", "the model name"),
        C("Manufacturer", "string"), C("Architecture", "string"), C("NumberOfCores", "integer"),
        C("NumberOfLogicalProcessors", "integer"), C("MaxClockSpeed", "integer", "MHz, where the platform tells"),
    ),
)
def get_processors(env: MethodEnv, args: dict[str, object]):
    arch = platform.machine()
    mhz = _max_mhz()
    if sys.platform.startswith("linux"):
        pkgs = _linux_processors()
        if pkgs:
            rows = []
            for i, p in enumerate(pkgs):
                speed = mhz or (int(float(str(p["mhz"]))) if p["mhz"] else None)
                rows.append(env.take([f"CPU{i}", p["name"], p["vendor"], arch, len(p["cores"]), p["logical"], speed]))  # type: ignore[arg-type]
            return rows
    return [[
        "CPU0", _cpu_model() or "", "", arch, psutil.cpu_count(logical=False), psutil.cpu_count(logical=True), mhz,
    ]]
