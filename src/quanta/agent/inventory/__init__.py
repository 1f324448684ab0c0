"""The Activity Record: capture into a local store that SCALE reads as ``$Source_Granularity``.

The agent imports this package only when ``Module.Inventory.Enabled=true`` (see
:func:`quanta.agent.runtime.start_inventory`); ``schema`` is standard-library only, so SCALE may
import it without the capture code.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .settings import InventoryConfigError, InventorySettings, parse_settings
from .store import DB_NAME, Store

__all__ = ["DB_NAME", "Inventory", "InventoryConfigError", "InventorySettings", "Store", "parse_settings"]

log = logging.getLogger("quanta.agent.inventory")


# the capture groups: each runs the sources named (one capture object for them all)
GROUPS: dict[str, tuple[str, ...]] = {
    "Process": ("Process",), "TCP": ("TCP",), "Software": ("Software",),
    "Performance": ("DevicePerformance", "ProcessUsage"), "Logon": ("Logon", "Boot"),
}


def _make(group: str, store: Store, s: InventorySettings, state_dir: Path, clock: Callable[[], float]) -> Any:
    if group == "Process":
        from .process import ProcessCapture

        return ProcessCapture(store, s, clock)
    if group == "TCP":
        from .tcp import TcpCapture

        return TcpCapture(store, s, clock)
    if group == "Software":
        from .software import SoftwareCapture

        return SoftwareCapture(store, s, state_dir, clock)
    if group == "Performance":
        from .perf import PerfCapture

        return PerfCapture(store, s, clock)
    from .logon import LogonCapture

    return LogonCapture(store, s, state_dir, clock)


def _shape(group: str, s: InventorySettings) -> tuple[object, ...]:
    """What a capture object of ``group`` is built for: a change of it means a new capture object;
    any other change (intervals, retention, batching) is applied to the running one."""
    on = tuple(s.source(n).enabled for n in GROUPS[group])
    return on + ((s.process_method,) if group == "Process" else ())


class Inventory:
    """The store and the enabled capture sources of one agent; :meth:`apply` changes them while
    they run."""

    def __init__(self, state_dir: Path, settings: InventorySettings, clock: Callable[[], float] = time.time) -> None:
        self.state_dir = Path(state_dir)
        self.settings = settings
        self.clock = clock
        self.store = Store(self.state_dir / DB_NAME, settings, clock)
        self.captures: dict[str, Any] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        self.store.start()
        with self._lock:
            self._set(self.settings, initial=True)
        proc = self.captures.get("Process")
        log.info("activity record capturing to %s: %s%s", self.store.path, self._on(self.settings),
                 f" (processes by {proc.method})" if proc is not None else "")

    @staticmethod
    def _on(s: InventorySettings) -> str:
        return ", ".join(n for n in s.sources if s.source(n).enabled) or "no source"

    def apply(self, settings: InventorySettings) -> list[str]:
        """Put new settings in force now, without a restart: a source switched off stops, one
        switched on starts, the others take the new intervals at once; the store takes the new
        retention, size cap and batching. Returns what changed, for the log."""
        with self._lock:
            return self._set(settings, initial=False)

    def _set(self, new: InventorySettings, initial: bool) -> list[str]:
        old, self.settings = self.settings, new
        if not initial:
            self.store.reconfigure(new)
        changes: list[str] = []
        for group in GROUPS:
            running = self.captures.get(group)
            if running is not None and _shape(group, old) == _shape(group, new):
                running.reconfigure(new)
                continue
            if running is not None:
                self._stop_one(group)
            if any(_shape(group, new)[:len(GROUPS[group])]):
                c = _make(group, self.store, new, self.state_dir, self.clock)
                c.start()
                self.captures[group] = c
                changes.append(f"{group} capture {'started' if running is None else 'restarted'}")
            elif running is not None:
                changes.append(f"{group} capture stopped")
        if not initial:
            log.info("activity record settings applied: %s; capturing %s", "; ".join(changes) or "no source "
                     "started or stopped", self._on(new))
        return changes

    def _stop_one(self, group: str) -> None:
        c = self.captures.pop(group)
        try:
            c.stop()
        except Exception:  # noqa: BLE001
            log.exception("stopping the %s capture failed", group)

    def stop(self) -> None:
        with self._lock:
            for group in list(self.captures):
                self._stop_one(group)
        self.store.stop()
