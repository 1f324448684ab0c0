"""Logon and Boot capture (Linux).

Logon: ``/var/log/wtmp`` (glibc's ``struct utmp``, 384 bytes a record) is read from where the
last read stopped (its inode and offset kept in ``state/inventory-wtmp.json``, 0600), so sessions
that began or ended while the agent was stopped are recorded with their own times. A
``USER_PROCESS`` record is a logon; a ``DEAD_PROCESS`` record ends the session of its terminal
(its user is the one that logged on there). On the first run only the last ``FIRST_RECORDS``
records are read. A rotated or truncated file is read from its start.

Boot: the kernel's boot time (``psutil.boot_time``), once per boot; a clean shutdown from wtmp's
``RUN_LVL`` record of user ``shutdown``.

Elsewhere (macOS, Windows; behind the OS check) there is no wtmp: the sessions the system lists
now (``psutil.users()``: utmpx on macOS, the terminal services sessions on Windows) are compared
with those of the last poll, kept in the same state file: a new session is a ``Logon`` at its own
start time, a session gone is a ``Logoff`` at the time it was found gone (at most one poll late).
Sessions that began and ended while the agent was stopped are not seen there. Boot as on Linux
(shutdowns are not recorded there).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import struct
import sys
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
                 clock: Callable[[], float] = time.time, wtmp: Path = WTMP, platform: str = sys.platform,
                 users: Callable[[], list[Any]] | None = None) -> None:
        super().__init__(settings)
        self.store = store
        self.clock = clock
        self.wtmp = wtmp
        self.platform = platform
        self.users = users
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
        if not self.platform.startswith("linux"):
            if self.settings.source("Logon").enabled:
                self._sessions(new)
        elif self.settings.source("Logon").enabled or self.settings.source("Boot").enabled:
            self._wtmp(new)
        if new != state:
            self._save(new)
        return new

    def _boot(self, state: dict[str, Any]) -> None:
        import psutil

        boot = int(psutil.boot_time())
        if abs(boot - int(state.get("boot", 0))) > 2:  # the boot time wobbles by a second
            self.store.put("Boot_Live", {"TS": boot, "Operation": "Boot", "KernelVersion": platform.release()})
            state["boot"] = boot

    def _sessions(self, state: dict[str, Any]) -> None:
        """macOS and Windows: the sessions listed now against those of the last poll."""
        users = self.users
        if users is None:
            import psutil

            users = psutil.users
        try:
            listed = users()
        except Exception:  # noqa: BLE001  # psutil's errors differ by system: try again next poll
            log.debug("listing the sessions failed", exc_info=True)
            return
        now: dict[str, list[Any]] = {}
        for u in listed[:1024]:
            name, term, host = (str(getattr(u, f, "") or "")[:256] for f in ("name", "terminal", "host"))
            started, pid = getattr(u, "started", 0) or 0, getattr(u, "pid", None)
            try:
                started_i = int(started)
            except (TypeError, ValueError, OverflowError):
                started_i = 0
            now[f"{name}\x1f{term}\x1f{host}\x1f{started_i}"] = [name, term, host, started_i,
                                                                    pid if isinstance(pid, int) else None]
        before: dict[str, list[Any]] = state.get("sessions") or {}
        if not isinstance(before, dict):
            before = {}
        for key, (name, term, host, started_i, pid) in now.items():
            if key not in before:
                self.store.put("Logon_Live", {"TS": started_i or int(self.clock()), "UserName": name,
                                              "Operation": "Logon", "Terminal": term, "RemoteHost": host,
                                              "ProcessId": pid})
        for key, old in before.items():
            if key not in now and isinstance(old, list) and len(old) == 5:
                self.store.put("Logon_Live", {"TS": int(self.clock()), "UserName": old[0], "Operation": "Logoff",
                                              "Terminal": old[1], "RemoteHost": old[2], "ProcessId": old[4]})
        state["sessions"] = now

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
                self.store.put("Logon_Live", {"TS": r["ts"], "UserName": r["user"], "Operation": "Logon",
                                              "Terminal": r["line"], "RemoteHost": r["host"], "ProcessId": r["pid"]})
            elif r["type"] == DEAD_PROCESS and self.settings.source("Logon").enabled and r["line"] in lines:
                self.store.put("Logon_Live", {"TS": r["ts"], "UserName": lines.pop(r["line"]), "Operation": "Logoff",
                                              "Terminal": r["line"], "RemoteHost": r["host"], "ProcessId": r["pid"]})
            elif r["type"] == RUN_LVL and r["user"] == "shutdown" and self.settings.source("Boot").enabled:
                self.store.put("Boot_Live", {"TS": r["ts"], "Operation": "Shutdown", "KernelVersion": ""})
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
