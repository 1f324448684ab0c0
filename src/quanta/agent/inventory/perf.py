"""DevicePerformance and ProcessUsage: sampled at their intervals (``psutil``)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from .pace import Capture
from .settings import InventorySettings
from .store import Store

log = logging.getLogger("quanta.agent.inventory")


class PerfCapture(Capture):
    def __init__(self, store: Store, settings: InventorySettings, clock: Callable[[], float] = time.time) -> None:
        super().__init__(settings)
        self.store = store
        self.clock = clock

    def start(self) -> None:
        if self.settings.source("DevicePerformance").enabled:
            self._spawn("quanta-inventory-perf", self._device)
        if self.settings.source("ProcessUsage").enabled:
            self._spawn("quanta-inventory-usage", self._usage)

    def _device(self) -> None:
        import psutil

        psutil.cpu_percent(None)
        disk0, net0, t0 = psutil.disk_io_counters(), psutil.net_io_counters(), time.monotonic()
        while not self.pace.sleep(self.settings.source("DevicePerformance").interval):
            try:
                disk, net, t1 = psutil.disk_io_counters(), psutil.net_io_counters(), time.monotonic()
                dt = max(t1 - t0, 1e-3)
                mem = psutil.virtual_memory()
                self.store.put("DevicePerformance_Live", {
                    "TS": int(self.clock()), "ProcessorUtilization": round(psutil.cpu_percent(None), 2),
                    "MemoryUtilization": round(mem.percent, 2), "MemoryAvailableBytes": mem.available,
                    "DiskReadBytesPerSecond": _rate(disk0, disk, "read_bytes", dt),
                    "DiskWriteBytesPerSecond": _rate(disk0, disk, "write_bytes", dt),
                    "NetworkSentBytesPerSecond": _rate(net0, net, "bytes_sent", dt),
                    "NetworkReceivedBytesPerSecond": _rate(net0, net, "bytes_recv", dt),
                })
                disk0, net0, t0 = disk, net, t1
            except Exception:  # noqa: BLE001
                log.exception("device performance sample failed")

    def _usage(self) -> None:
        import psutil

        before: dict[tuple[int, float], float] = {}
        names: dict[tuple[int, float], tuple[str, str]] = {}  # a process's executable and user, read once
        first = True
        while True:
            try:
                now = int(self.clock())
                after: dict[tuple[int, float], float] = {}
                acc: dict[tuple[str, str], list[float]] = {}
                for p in psutil.process_iter(["cpu_times", "memory_info", "create_time"], ad_value=None):
                    ct, mem = p.info.get("cpu_times"), p.info.get("memory_info")
                    if ct is None:
                        continue
                    key = (p.pid, p.info.get("create_time") or 0.0)
                    used = ct.user + ct.system
                    after[key] = used
                    delta = used - before.get(key, 0.0 if not first else used)
                    ident = names.get(key)
                    if ident is None:
                        ident = names[key] = _identity(p)
                    a = acc.setdefault(ident, [0.0, 0, 0])
                    a[0] += max(delta, 0.0)
                    a[1] = max(a[1], mem.rss if mem else 0)
                    a[2] += 1
                if not first:
                    for (name, user), (cpu, peak, count) in acc.items():
                        if cpu > 0:
                            self.store.put("ProcessUsage_Live", {
                                "TS": now, "ExecutableName": name, "UserName": user,
                                "ProcessorTimeSeconds": round(cpu, 3), "PeakMemoryBytes": int(peak),
                                "ProcessCount": int(count),
                            })
                before, first = after, False
                names = {k: v for k, v in names.items() if k in after}  # the processes gone are forgotten
            except Exception:  # noqa: BLE001
                log.exception("process usage sample failed")
            if self.pace.sleep(self.settings.source("ProcessUsage").interval):
                return


def _identity(p: object) -> tuple[str, str]:
    """(executable name, user name) of a psutil process; empty strings for what cannot be read."""
    import psutil

    values = []
    for attr in ("exe", "name", "username"):
        try:
            values.append(getattr(p, attr)() or "")
        except (psutil.Error, OSError):
            values.append("")
    exe, name, user = values
    return os.path.basename(exe) or name, user


def _rate(a: object, b: object, attr: str, dt: float) -> float | None:
    if a is None or b is None:
        return None
    return round(max(getattr(b, attr) - getattr(a, attr), 0) / dt, 1)
