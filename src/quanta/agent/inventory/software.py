"""Software capture: installs, removals and upgrades, from the package databases.

dpkg: ``/var/lib/dpkg/status`` is read when its modification time changes and compared with the
set seen last (kept in ``state/inventory-software.json``, 0600, so changes made while the agent was
stopped are found at its next start). rpm: ``rpm -qa`` when ``rpm`` and ``/var/lib/rpm`` exist.
The first run records the present set as ``Present`` rows. The time of a change is the time it
was found (at most one poll interval late), not the package manager's own time.

Behind the OS check, the other systems' package databases, compared the same way:

- Windows (``PackageManager`` ``windows``): the machine's Uninstall keys,
  ``HKLM\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Uninstall`` in its 64-bit and its 32-bit
  view (what Programs and Features lists for all users; no user's own keys, so no user
  identity): ``DisplayName``, ``DisplayVersion``, ``Publisher``; entries without a
  ``DisplayName``, system components (``SystemComponent`` = 1) and updates of another entry
  (``ParentKeyName``) are left out, as Programs and Features leaves them out.
- macOS: the installer's receipts (``/var/db/receipts/*.plist``, what ``pkgutil --pkgs`` lists:
  ``PackageIdentifier``, ``PackageVersion``; ``PackageManager`` ``pkgutil``) and the applications
  in ``/Applications`` (``*.app/Contents/Info.plist``: ``CFBundleName``,
  ``CFBundleShortVersionString``, the bundle identifier as the publisher; ``PackageManager``
  ``app``).

Each is bounded: at most :data:`MAX_PACKAGES` entries, text cut at :data:`MAX_TEXT`, a plist
larger than :data:`MAX_PLIST_BYTES` or that does not parse is skipped. A database that reads as
empty although it had entries (rpm failed, the registry or the receipts unreadable) keeps its last
set: it is not recorded as every package removed.
"""

from __future__ import annotations

import json
import logging
import os
import plistlib
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .pace import Capture
from .settings import InventorySettings
from .store import Store, secure_file

log = logging.getLogger("quanta.agent.inventory")

DPKG_STATUS = Path("/var/lib/dpkg/status")
MAX_STATUS_BYTES = 256 * 1024 * 1024

Package = tuple[str, str, str]  # version, publisher, architecture
MAX_PACKAGES = 50_000  # per package database
MAX_TEXT = 1024  # characters of a name, version or publisher
MAX_PLIST_BYTES = 1024 * 1024
WINDOWS_UNINSTALL = r"SOFTWARE\Microsoft\Windows\CurrentVersion\Uninstall"
MAC_RECEIPTS = Path("/var/db/receipts")
MAC_APPLICATIONS = Path("/Applications")


def _text(v: Any) -> str:
    return ("" if v is None else str(v))[:MAX_TEXT]


def read_windows_uninstall(winreg: Any = None) -> dict[str, Package]:
    """Installed programs from the machine's Uninstall keys, both registry views, by
    ``DisplayName:x64`` / ``DisplayName:x86``. ``winreg`` is the standard module on Windows (a
    stand-in in tests)."""
    if winreg is None:
        import winreg  # type: ignore[import-not-found,no-redef]  # Windows only
    out: dict[str, Package] = {}
    for view, arch in ((winreg.KEY_WOW64_64KEY, "x64"), (winreg.KEY_WOW64_32KEY, "x86")):
        try:
            root = winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, WINDOWS_UNINSTALL, 0, winreg.KEY_READ | view)
        except OSError:
            continue
        try:
            i = 0
            while len(out) < MAX_PACKAGES and i < 10 * MAX_PACKAGES:
                try:
                    sub = winreg.EnumKey(root, i)
                except OSError:  # no more subkeys
                    break
                i += 1
                try:
                    key = winreg.OpenKey(root, sub, 0, winreg.KEY_READ | view)
                except OSError:
                    continue
                try:
                    values: dict[str, Any] = {}
                    for name in ("DisplayName", "DisplayVersion", "Publisher", "SystemComponent", "ParentKeyName"):
                        try:
                            values[name] = winreg.QueryValueEx(key, name)[0]
                        except OSError:
                            pass
                finally:
                    winreg.CloseKey(key)
                name = _text(values.get("DisplayName")).strip()
                if not name or values.get("ParentKeyName") or str(values.get("SystemComponent", "0")) == "1":
                    continue
                out[f"{name}:{arch}"] = (_text(values.get("DisplayVersion")), _text(values.get("Publisher")), arch)
        finally:
            winreg.CloseKey(root)
    return out


def _plist(path: Path) -> dict[str, Any] | None:
    """A plist file's top dictionary, or None (missing, not a regular file, too large, unparsable)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_PLIST_BYTES:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_PLIST_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        value = plistlib.loads(data)
    except Exception:  # noqa: BLE001  # InvalidFileException, ExpatError, ValueError, OverflowError, ...
        return None
    return value if isinstance(value, dict) else None


def _first(entries: Iterable[os.DirEntry[str]], limit: int) -> list[os.DirEntry[str]]:
    out = []
    for e in entries:
        if len(out) >= limit:
            break
        out.append(e)
    return out


def read_macos_receipts(receipts: Path = MAC_RECEIPTS) -> dict[str, Package]:
    """The installer's receipts (``pkgutil --pkgs``), by ``PackageIdentifier:``."""
    out: dict[str, Package] = {}
    try:
        with os.scandir(receipts) as it:
            entries = _first((e for e in it if e.name.endswith(".plist")), MAX_PACKAGES)
    except OSError:
        return out
    for e in sorted(entries, key=lambda e: e.name):
        d = _plist(Path(e.path))
        if d is None:
            continue
        ident = _text(d.get("PackageIdentifier")).strip()
        if ident:
            out[f"{ident}:"] = (_text(d.get("PackageVersion")), "", "")
    return out


def read_macos_applications(apps: Path = MAC_APPLICATIONS) -> dict[str, Package]:
    """The applications in ``/Applications`` (``*.app/Contents/Info.plist``), by name."""
    out: dict[str, Package] = {}
    try:
        with os.scandir(apps) as it:
            entries = _first((e for e in it if e.name.endswith(".app") and e.is_dir(follow_symlinks=False)),
                             MAX_PACKAGES)
    except OSError:
        return out
    for e in sorted(entries, key=lambda e: e.name):
        d = _plist(Path(e.path) / "Contents" / "Info.plist")
        if d is None:
            continue
        name = _text(d.get("CFBundleName") or d.get("CFBundleDisplayName") or e.name[:-4]).strip()
        version = d.get("CFBundleShortVersionString") or d.get("CFBundleVersion")
        if name:
            out[f"{name}:"] = (_text(version), _text(d.get("CFBundleIdentifier")), "")
    return out


def parse_dpkg_status(text: str) -> dict[str, Package]:
    """Installed packages (``Status: install ok installed``) by ``name:arch``."""
    out: dict[str, Package] = {}
    for para in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in para.split("\n"):
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            k, _, v = line.partition(":")
            fields[k.strip().lower()] = v.strip()
        name = fields.get("package")
        if not name or not fields.get("status", "").endswith(" installed"):
            continue
        arch = fields.get("architecture", "")
        out[f"{name}:{arch}" if arch else name] = (fields.get("version", ""), fields.get("maintainer", ""), arch)
    return out


def read_rpm() -> dict[str, Package]:
    rpm = shutil.which("rpm")
    if not rpm or not Path("/var/lib/rpm").exists():
        return {}
    fmt = "%{NAME}\\t%{EPOCHNUM}:%{VERSION}-%{RELEASE}\\t%{VENDOR}\\t%{ARCH}\\n"
    try:
        r = subprocess.run([rpm, "-qa", "--queryformat", fmt], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out: dict[str, Package] = {}
    for line in r.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            out[f"{parts[0]}:{parts[3]}"] = (parts[1], parts[2], parts[3])
    return out


def diff(before: dict[str, Package], after: dict[str, Package]) -> list[tuple[str, str, Package, str]]:
    """(operation, key, package, previous version) for every change."""
    out = []
    for key, pkg in after.items():
        old = before.get(key)
        if old is None:
            out.append(("Install", key, pkg, ""))
        elif old[0] != pkg[0]:
            out.append(("Upgrade", key, pkg, old[0]))
    for key, pkg in before.items():
        if key not in after:
            out.append(("Uninstall", key, pkg, ""))
    return out


class SoftwareCapture(Capture):
    def __init__(self, store: Store, settings: InventorySettings, state_dir: Path,
                 clock: Callable[[], float] = time.time, dpkg_status: Path = DPKG_STATUS,
                 platform: str = sys.platform, winreg: Any = None, mac_receipts: Path = MAC_RECEIPTS,
                 mac_applications: Path = MAC_APPLICATIONS) -> None:
        super().__init__(settings)
        self.store = store
        self.clock = clock
        self.state_path = Path(state_dir) / "inventory-software.json"
        self.dpkg_status = dpkg_status
        self.platform = platform
        self.winreg = winreg
        self.mac_receipts = mac_receipts
        self.mac_applications = mac_applications
        self.polls = threading.Semaphore(0)

    def read_other(self) -> dict[str, dict[str, Package]]:
        """The package databases of Windows and macOS, behind the OS check."""
        if self.platform == "win32":
            return {"windows": read_windows_uninstall(self.winreg)}
        if self.platform == "darwin":
            return {"pkgutil": read_macos_receipts(self.mac_receipts), "app": read_macos_applications(self.mac_applications)}
        return {}

    def start(self) -> None:
        self._spawn("quanta-inventory-software", self._run)

    def _load(self) -> dict[str, dict[str, Package]] | None:
        try:
            raw = json.loads(self.state_path.read_text())
            return {mgr: {k: tuple(v) for k, v in pkgs.items()} for mgr, pkgs in raw.items()}  # type: ignore[misc]
        except (OSError, ValueError, AttributeError, TypeError):
            return None

    def _save(self, state: dict[str, dict[str, Package]]) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        secure_file(tmp)
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)

    def poll_once(self, state: dict[str, dict[str, Package]] | None, mtime: list[float]) -> dict[str, dict[str, Package]]:
        now = int(self.clock())
        current: dict[str, dict[str, Package]] = {}
        try:
            st = self.dpkg_status.stat()
            if state is not None and "dpkg" in state and st.st_mtime == mtime[0]:
                current["dpkg"] = state["dpkg"]
            elif st.st_size <= MAX_STATUS_BYTES:
                current["dpkg"] = parse_dpkg_status(self.dpkg_status.read_text(errors="replace"))
                mtime[0] = st.st_mtime
        except OSError:
            pass
        others = {"rpm": read_rpm()} if self.platform.startswith("linux") else {}
        others.update(self.read_other())
        for mgr, pkgs in others.items():
            if pkgs:
                current[mgr] = pkgs
            elif state is not None and mgr in state:
                # read nothing (rpm failed, the registry or receipts unreadable): not "all removed"
                current[mgr] = state[mgr]
        for mgr, pkgs in current.items():
            if state is None or mgr not in state:
                changes = [("Present", k, p, "") for k, p in pkgs.items()]
            else:
                changes = diff(state[mgr], pkgs)
            for op, key, pkg, prev in changes:
                self.store.put("Software_Live", {
                    "TS": now, "Product": key.rsplit(":", 1)[0], "Version": pkg[0], "Publisher": pkg[1],
                    "Architecture": pkg[2], "IsUninstall": int(op == "Uninstall"), "Operation": op,
                    "PreviousVersion": prev, "PackageManager": mgr,
                })
        if current != state:
            self._save(current)
        return current

    def _run(self) -> None:
        state = self._load()
        mtime = [0.0]
        while not self.pace.stopped:
            try:
                state = self.poll_once(state, mtime)
            except Exception:  # noqa: BLE001
                log.exception("software capture poll failed")
            self.polls.release()
            self.pace.sleep(self.settings.source("Software").interval)
