"""SCALE module Software: installed packages from the system's package databases."""

from __future__ import annotations

import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, method
from ._common import iso, read_system_file

DPKG_STATUS = Path("/var/lib/dpkg/status")
APK_INSTALLED = Path("/lib/apk/db/installed")
MAC_APP_DIRS = [Path("/Applications")]


def parse_dpkg_status(text: str) -> list[list[object]]:
    rows = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t"):
                continue  # continuation line
            if ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if not fields.get("Package"):
            continue
        status = fields.get("Status", "")
        if status and not status.endswith(" installed"):
            continue
        rows.append([fields["Package"], fields.get("Version"), fields.get("Maintainer"), fields.get("Architecture"), None, "dpkg"])
    return rows


def parse_apk_installed(text: str) -> list[list[object]]:
    rows = []
    for block in text.split("\n\n"):
        f = dict(line.split(":", 1) for line in block.splitlines() if len(line) > 2 and line[1] == ":")
        if f.get("P"):
            rows.append([f["P"], f.get("V"), f.get("m"), f.get("A"), iso(float(f["t"])) if f.get("t", "").isdigit() else None, "apk"])
    return rows


def _rpm(env: MethodEnv) -> list[list[object]]:
    exe = shutil.which("rpm")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, "-qa", "--queryformat", "%{NAME}\\t%{VERSION}-%{RELEASE}\\t%{VENDOR}\\t%{ARCH}\\t%{INSTALLTIME}\\n"],
            capture_output=True, text=True, timeout=max(1.0, min(60.0, env.remaining())),
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = []
    for line in out.stdout.splitlines():
        p = line.split("\t")
        if len(p) == 5:
            rows.append([p[0], p[1], None if p[2] == "(none)" else p[2], p[3], iso(float(p[4])) if p[4].isdigit() else None, "rpm"])
    return rows


def _macos_apps(env: MethodEnv) -> list[list[object]]:
    rows = []
    for d in MAC_APP_DIRS:
        for app in sorted(d.glob("*.app")) if d.is_dir() else []:
            env.check_time()
            info: dict = {}
            data = read_system_file(app / "Contents" / "Info.plist")
            try:
                info = plistlib.loads(data) if data is not None else {}
            except Exception:
                pass
            rows.append([info.get("CFBundleName") or app.stem, info.get("CFBundleShortVersionString"), info.get("CFBundleIdentifier"), None, None, "applications"])
    return rows


def _windows(env: MethodEnv) -> list[list[object]]:
    import winreg  # type: ignore[import-not-found]

    rows = []
    roots = [(winreg.HKEY_LOCAL_MACHINE, r"SOFTWARE\Microsoft\Windows\CurrentVersion\Uninstall"),
             (winreg.HKEY_LOCAL_MACHINE, r"SOFTWARE\WOW6432Node\Microsoft\Windows\CurrentVersion\Uninstall")]
    for hive, path in roots:
        try:
            key = winreg.OpenKey(hive, path)
        except OSError:
            continue
        for i in range(winreg.QueryInfoKey(key)[0]):
            try:
                sub = winreg.OpenKey(key, winreg.EnumKey(key, i))
                def val(n: str):
                    try:
                        return winreg.QueryValueEx(sub, n)[0]
                    except OSError:
                        return None
                name = val("DisplayName")
                if name:
                    rows.append([name, val("DisplayVersion"), val("Publisher"), None, val("InstallDate"), "registry"])
            except OSError:
                continue
    return rows


@method(
    "Software", "GetInstallations",
    "Installed software from the package databases (dpkg, rpm, apk on Linux; /Applications on macOS; the Uninstall registry keys on Windows).",
    columns=(
        C("Product", "string"), C("Version", "string"), C("Publisher", "string"), C("Architecture", "string"),
        C("InstallDate", "datetime"), C("Source", "string", "which package database"),
    ),
)
def get_installations(env: MethodEnv, args: dict[str, object]):
    if sys.platform.startswith("win"):
        return _windows(env)
    if sys.platform == "darwin":
        return _macos_apps(env)
    rows: list[list[object]] = []
    for path, parser in ((DPKG_STATUS, parse_dpkg_status), (APK_INSTALLED, parse_apk_installed)):
        data = read_system_file(path, env.limits.max_memory_bytes)
        if data is not None:
            rows.extend(parser(data.decode("utf-8", errors="replace")))
    env.check_time()
    rows.extend(_rpm(env))
    return rows
