"""The Activity Record: capture into a local store that SCALE reads as ``$Source_Granularity``.

The agent imports this package only when ``Module.Inventory.Enabled=true`` (see
:func:`quanta.agent.runtime.start_inventory`); ``schema`` is standard-library only, so SCALE may
import it without the capture code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .settings import InventoryConfigError, InventorySettings, parse_settings
from .store import DB_NAME, Store

__all__ = ["DB_NAME", "Inventory", "InventoryConfigError", "InventorySettings", "Store", "parse_settings"]

log = logging.getLogger("quanta.agent.inventory")


class Inventory:
    """The store and the enabled capture sources of one agent."""

    def __init__(self, state_dir: Path, settings: InventorySettings, clock: Callable[[], float] = time.time) -> None:
        self.state_dir = Path(state_dir)
        self.settings = settings
        self.clock = clock
        self.store = Store(self.state_dir / DB_NAME, settings, clock)
        self.captures: dict[str, Any] = {}

    def start(self) -> None:
        self.store.start()
        s = self.settings
        if s.source("Process").enabled:
            from .process import ProcessCapture

            self.captures["Process"] = ProcessCapture(self.store, s, self.clock)
        if s.source("TCP").enabled:
            from .tcp import TcpCapture

            self.captures["TCP"] = TcpCapture(self.store, s, self.clock)
        if s.source("Software").enabled:
            from .software import SoftwareCapture

            self.captures["Software"] = SoftwareCapture(self.store, s, self.state_dir, self.clock)
        if s.source("DevicePerformance").enabled or s.source("ProcessUsage").enabled:
            from .perf import PerfCapture

            self.captures["Performance"] = PerfCapture(self.store, s, self.clock)
        if s.source("Logon").enabled or s.source("Boot").enabled:
            from .logon import LogonCapture

            self.captures["Logon"] = LogonCapture(self.store, s, self.state_dir, self.clock)
        for c in self.captures.values():
            c.start()
        proc = self.captures.get("Process")
        log.info("activity record capturing to %s: %s%s", self.store.path, ", ".join(
            n for n in s.sources if s.source(n).enabled),
            f" (processes by {proc.method})" if proc is not None else "")

    def stop(self) -> None:
        for c in self.captures.values():
            try:
                c.stop()
            except Exception:  # noqa: BLE001
                log.exception("stopping a capture failed")
        self.store.stop()
