"""Software capture: installs, removals and upgrades, from the package databases.

dpkg: ``/var/lib/dpkg/status`` is read when its modification time changes and compared with the
set seen last (kept in ``state/inventory-software.json``, 0600, so changes made while the agent was
stopped are found at its next start). rpm: ``rpm -qa`` when ``rpm`` and ``/var/lib/rpm`` exist.
The first run records the present set as ``Present`` rows. The time of a change is the time it
was found (at most one poll interval late), not the package manager's own time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .pace import Capture
from .settings import InventorySettings
from .store import Store, secure_file

log = logging.getLogger("quanta.agent.inventory")

DPKG_STATUS = Path("/var/lib/dpkg/status")
MAX_STATUS_BYTES = 256 * 1024 * 1024

Package = tuple[str, str, str]  # version, publisher, architecture


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
                 clock: Callable[[], float] = time.time, dpkg_status: Path = DPKG_STATUS) -> None:
        super().__init__(settings)
        self.store = store
        self.clock = clock
        self.state_path = Path(state_dir) / "inventory-software.json"
        self.dpkg_status = dpkg_status
        self.polls = threading.Semaphore(0)

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
        rpm = read_rpm()
        if rpm:
            current["rpm"] = rpm
        for mgr, pkgs in current.items():
            if state is None or mgr not in state:
                changes = [("Present", k, p, "") for k, p in pkgs.items()]
            else:
                changes = diff(state[mgr], pkgs)
            for op, key, pkg, prev in changes:
                self.store.put("Software_Live", {
                    "Ts": now, "Product": key.split(":")[0], "Version": pkg[0], "Publisher": pkg[1],
                    "Architecture": pkg[2], "Operation": op, "PreviousVersion": prev, "PackageManager": mgr,
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
