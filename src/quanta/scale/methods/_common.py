"""Helpers shared by method implementations."""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def os_type() -> str:
    if sys.platform.startswith("win"):
        return "Windows"
    if sys.platform == "darwin":
        return "MacOS"
    if sys.platform.startswith("linux"):
        return "Linux"
    return platform.system() or sys.platform


def user_name(uid: int) -> str | None:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return None


def group_name(gid: int) -> str | None:
    try:
        import grp

        return grp.getgrgid(gid).gr_name
    except (ImportError, KeyError):
        return None


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def os_release() -> dict[str, str]:
    out: dict[str, str] = {}
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        text = read_text(path)
        if text is None:
            continue
        for line in text.splitlines():
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                out[k.strip()] = v.strip().strip('"')
        break
    return out


def env_tmp() -> str:
    if sys.platform.startswith("win"):
        return os.environ.get("TMP") or os.environ.get("TEMP") or os.path.join(os.environ.get("WINDIR", "C:\\Windows"), "Temp")
    return os.environ.get("TMPDIR") or "/tmp"
