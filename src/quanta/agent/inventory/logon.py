"""Logon and Boot capture (Linux).

Logon: ``/var/log/wtmp`` (glibc's ``struct utmp``, 384 bytes a record) is read from where the
last read stopped (its inode and offset kept in ``state/inventory-wtmp.json``, 0600), so sessions
that began or ended while the agent was stopped are recorded with their own times. A
``USER_PROCESS`` record is a logon; a ``DEAD_PROCESS`` record ends the session of its terminal
(its user is the one that logged on there). On the first run only the last ``FIRST_RECORDS``
records are read. A rotated or truncated file is read from its start.

Boot: the kernel's boot time (``psutil.boot_time``), once per boot; a clean shutdown from wtmp's
``RUN_LVL`` record of user ``shutdown``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .pace import Capture
from .settings import InventorySettings
from .store import Store, secure_file

log = logging.getLogger("quanta.agent.inventory")

WTMP = Path("/var/log/wtmp")
UTMP = struct.Struct("=hxxi32s4s32s256shhiii16s20s")  # 384 bytes (x86_64 and aarch64 glibc)
RUN_LVL, BOOT_TIME, USER_PROCESS, DEAD_PROCESS = 1, 2, 7, 8
FIRST_RECORDS = 10_000
MAX_READ = 4 * 1024 * 1024  # per poll


def _text(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "replace")


def parse_records(data: bytes) -> list[dict[str, Any]]:
    """The whole records in ``data`` (a partial last one is left for the next read)."""
    out = []
    for off in range(0, len(data) - UTMP.size + 1, UTMP.size):
        (kind, pid, line, _id, user, host, _term, _exit, _session, sec, _usec, _addr,
         _unused) = UTMP.unpack_from(data, off)
        out.append({"type": kind, "pid": pid, "line": _text(line), "user": _text(user), "host": _text(host),
                    "ts": sec})
    return out


def pack_record(kind: int, pid: int, line: str, user: str, host: str, ts: int) -> bytes:
    """One wtmp record (for tests and tools)."""
    return UTMP.pack(kind, pid, line.encode()[:32], b"", user.encode()[:32], host.encode()[:256], 0, 0, 0, ts, 0,
                     b"", b"")


class LogonCapture(Capture):
    def __init__(self, store: Store, settings: InventorySettings, state_dir: Path,
                 clock: Callable[[], float] = time.time, wtmp: Path = WTMP) -> None:
        super().__init__(settings)
        self.store = store
        self.clock = clock
        self.wtmp = wtmp
        self.state_path = Path(state_dir) / "inventory-wtmp.json"
        self.polls = threading.Semaphore(0)

    def start(self) -> None:
        self._spawn("quanta-inventory-logon", self._run)

    def _load(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text())
            if isinstance(state, dict):
                return state
        except (OSError, ValueError):
            pass
        return {}

    def _save(self, state: dict[str, Any]) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        secure_file(tmp)
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)

    def poll_once(self, state: dict[str, Any]) -> dict[str, Any]:
        new = dict(state)
        if self.settings.source("Boot").enabled:
            self._boot(new)
        if self.settings.source("Logon").enabled or self.settings.source("Boot").enabled:
            self._wtmp(new)
        if new != state:
            self._save(new)
        return new

    def _boot(self, state: dict[str, Any]) -> None:
        import psutil

        boot = int(psutil.boot_time())
        if abs(boot - int(state.get("boot", 0))) > 2:  # the boot time wobbles by a second
            self.store.put("Boot_Live", {"Ts": boot, "Operation": "Boot", "KernelVersion": platform.release()})
            state["boot"] = boot

    def _wtmp(self, state: dict[str, Any]) -> None:
        try:
            f = open(self.wtmp, "rb")
        except OSError:
            return
        with f:
            st = os.fstat(f.fileno())
            offset = int(state.get("offset", -1))
            if state.get("inode") != st.st_ino or offset > st.st_size or offset < 0:
                first = "inode" not in state
                offset = max(0, st.st_size - FIRST_RECORDS * UTMP.size) if first else 0
                offset -= offset % UTMP.size
            f.seek(offset)
            data = f.read(MAX_READ)
        records = parse_records(data)
        lines: dict[str, str] = dict(state.get("lines", {}))
        for r in records:
            if r["type"] == USER_PROCESS and self.settings.source("Logon").enabled:
                lines[r["line"]] = r["user"]
                self.store.put("Logon_Live", {"Ts": r["ts"], "UserName": r["user"], "Operation": "Logon",
                                              "Terminal": r["line"], "RemoteHost": r["host"], "ProcessId": r["pid"]})
            elif r["type"] == DEAD_PROCESS and self.settings.source("Logon").enabled and r["line"] in lines:
                self.store.put("Logon_Live", {"Ts": r["ts"], "UserName": lines.pop(r["line"]), "Operation": "Logoff",
                                              "Terminal": r["line"], "RemoteHost": r["host"], "ProcessId": r["pid"]})
            elif r["type"] == RUN_LVL and r["user"] == "shutdown" and self.settings.source("Boot").enabled:
                self.store.put("Boot_Live", {"Ts": r["ts"], "Operation": "Shutdown", "KernelVersion": ""})
        if len(lines) > 1024:
            lines = dict(list(lines.items())[-1024:])
        state.update(inode=st.st_ino, offset=offset + len(records) * UTMP.size, lines=lines)

    def _run(self) -> None:
        state = self._load()
        while not self.pace.stopped:
            try:
                state = self.poll_once(state)
            except Exception:  # noqa: BLE001
                log.exception("logon capture poll failed")
            self.polls.release()
            self.pace.sleep(min(self.settings.source("Logon").interval, self.settings.source("Boot").interval))
