"""TCP capture: the connections in the kernel's socket table, polled (``psutil``).

A connection is recorded when first seen (``Ts``) with its process; ``LastSeenTs`` is set when it
is no longer seen. It is ``Inbound`` when its local port is one this device listens on,
``Outbound`` otherwise. A connection opened and closed between two polls is missed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from .pace import Capture
from .settings import InventorySettings
from .store import Store

log = logging.getLogger("quanta.agent.inventory")

OPEN_STATES = ("ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT", "CLOSING", "LAST_ACK")


class TcpCapture(Capture):
    def __init__(self, store: Store, settings: InventorySettings, clock: Callable[[], float] = time.time) -> None:
        super().__init__(settings)
        self.store = store
        self.clock = clock
        self.polls = threading.Semaphore(0)  # released after every poll (tests wait on it)

    def start(self) -> None:
        self._spawn("quanta-inventory-tcp", self._run)

    def _run(self) -> None:
        import psutil

        open_: dict[tuple[str, int, str, int], int] = {}  # key -> last seen
        exe_cache: dict[int, tuple[float, str]] = {}
        pending: dict[tuple[str, int, str, int], tuple[dict[str, object], int]] = {}  # no process yet: row, polls
        while not self.pace.stopped:
            try:
                now = int(self.clock())
                conns = psutil.net_connections(kind="tcp")
                listening = {c.laddr.port for c in conns if c.status == "LISTEN" and c.laddr}
                seen: set[tuple[str, int, str, int]] = set()
                for c in conns:
                    if not c.raddr or c.status not in OPEN_STATES:
                        continue
                    key = (c.laddr.ip, c.laddr.port, c.raddr.ip, c.raddr.port)
                    seen.add(key)
                    if key in open_:
                        open_[key] = now
                        continue
                    row = {"Ts": now, "LastSeenTs": now, "ProcessId": c.pid, "LocalAddress": c.laddr.ip,
                           "LocalPort": c.laddr.port, "IpAddress": c.raddr.ip, "Port": c.raddr.port,
                           "Direction": "Inbound" if c.laddr.port in listening else "Outbound",
                           "CaptureMethod": "poll"}
                    earlier = pending.pop(key, None)
                    if earlier is not None:
                        row["Ts"] = earlier[0]["Ts"]
                    if not c.pid and (earlier[1] if earlier else 0) < 2:
                        # its process not found yet (the socket's owner was being scanned as it
                        # opened): look again at the next polls before recording it without one
                        pending[key] = (row, (earlier[1] if earlier else 0) + 1)
                        continue
                    open_[key] = now
                    path = _exe(c.pid, exe_cache) if c.pid else ""
                    self.store.put("TCP_Live", {**row, "ExecutableName": os.path.basename(path), "ExecutablePath": path})
                for key in [k for k in pending if k not in seen]:  # closed before its process was found
                    row, _ = pending.pop(key)
                    self.store.put("TCP_Live", {**row, "ExecutableName": "", "ExecutablePath": ""})
                for key in [k for k in open_ if k not in seen]:
                    last = open_.pop(key)
                    self.store.update("tcp_seen", (last, key[1], key[3], key[0], key[2]))
                if len(exe_cache) > 4096:
                    exe_cache.clear()
            except Exception:  # noqa: BLE001 - capture must never take the agent down
                log.exception("TCP capture poll failed")
            self.polls.release()
            self.pace.sleep(self.settings.source("TCP").interval)


def _exe(pid: int, cache: dict[int, tuple[float, str]]) -> str:
    import psutil

    try:
        p = psutil.Process(pid)
        ct = p.create_time()
        hit = cache.get(pid)
        if hit is not None and hit[0] == ct:
            return hit[1]
        path = p.exe()
    except (psutil.Error, OSError):
        return ""
    cache[pid] = (ct, path)
    return path
