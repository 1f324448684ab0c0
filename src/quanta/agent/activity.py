"""The Activity Record's switch in the agent: ``Module.Inventory.*`` of agent.conf, in force while
the agent runs.

The switch reads agent.conf when the agent starts and again whenever the file changes (it looks
every ``CHECK_SECONDS``; ``Inventory.SetSetting`` asks it at once): ``Module.Inventory.Enabled``
starts or stops the whole capture, and any other change is applied to the running capture by
:meth:`quanta.agent.inventory.Inventory.apply` (a source switched off stops, one switched on
starts, intervals, retention and batching change). No restart is needed. A file whose
``Module.Inventory.*`` values the parser refuses changes nothing: at the start capture stays off,
later the settings in force stay, with the error in the log. The capture package is imported only
when capture is on.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("quanta.agent")

CHECK_SECONDS = 1.0
_SWITCHES: dict[str, "ActivityRecord"] = {}  # by agent.conf's resolved path: the agents of this process
_SWITCHES_LOCK = threading.Lock()


def switch_for(conf_path: Path) -> "ActivityRecord | None":
    """The running switch of the agent whose configuration is ``conf_path`` (None outside an agent)."""
    with _SWITCHES_LOCK:
        return _SWITCHES.get(str(Path(conf_path).resolve()))


class ActivityRecord:
    def __init__(self, conf_path: Path, state_dir: Path, check_seconds: float = CHECK_SECONDS) -> None:
        self.conf_path = Path(conf_path)
        self.state_dir = Path(state_dir)
        self.check_seconds = check_seconds
        self.inventory: Any = None  # quanta.agent.inventory.Inventory while capture is on
        self._stamp: tuple[int, int, int] | None = None
        self._started = False
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.check()
        with _SWITCHES_LOCK:
            _SWITCHES[str(self.conf_path.resolve())] = self
        self._thread = threading.Thread(target=self._watch, name="quanta-inventory-settings", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and capturing (the rows still queued are written)."""
        with _SWITCHES_LOCK:
            if _SWITCHES.get(str(self.conf_path.resolve())) is self:
                del _SWITCHES[str(self.conf_path.resolve())]
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            if self.inventory is not None:
                self.inventory.stop()
                self.inventory = None

    def in_force(self) -> dict[str, str]:
        """The ``Module.Inventory.*`` values the running capture uses (only ``Enabled`` when it is off)."""
        with self._lock:
            if self.inventory is None:
                return {"Module.Inventory.Enabled": "false"}
            from .inventory.conf_access import flatten

            return flatten(self.inventory.settings)

    def _watch(self) -> None:
        while not self._stop.wait(self.check_seconds):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - capture must never keep the agent from its work
                log.exception("activity record: applying agent.conf failed")

    def check(self) -> None:
        """Apply agent.conf's ``Module.Inventory.*`` settings when the file changed since the last check."""
        with self._lock:
            if self._stop.is_set():
                return
            try:
                st = os.stat(self.conf_path)
            except OSError as e:
                if self._stamp != (0, 0, 0):
                    log.error("activity record: cannot read %s: %s", self.conf_path, e)
                    self._stamp = (0, 0, 0)
                return
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return
            self._stamp = stamp
            first, self._started = not self._started, True
            self._apply(first)

    def _apply(self, first: bool) -> None:
        from .config import read_conf

        keeps = "activity record off" if first else "activity record settings unchanged"
        try:
            values = read_conf(self.conf_path)
        except (OSError, ValueError) as e:
            log.error("%s: cannot read %s: %s", keeps, self.conf_path, e)
            return
        flag = next((v for k, v in values.items() if k.strip().lower() == "module.inventory.enabled"), "false")
        if flag.strip().lower() not in ("true", "1", "yes", "on"):
            if self.inventory is not None:
                self.inventory.stop()
                self.inventory = None
                log.info("activity record stopped: Module.Inventory.Enabled is not true in %s", self.conf_path)
            return
        from .inventory import Inventory, InventoryConfigError, parse_settings

        try:
            settings = parse_settings(values)
        except InventoryConfigError as e:
            log.error("%s: %s: %s", keeps, self.conf_path, e)
            return
        for warning in settings.warnings:
            log.warning("activity record: %s: %s", self.conf_path, warning)
        if self.inventory is not None:
            self.inventory.apply(settings)
            return
        try:
            inventory = Inventory(self.state_dir, settings)
            inventory.start()
        except Exception:  # noqa: BLE001 - capture must never keep the agent from its work
            log.exception("activity record could not start")
            return
        self.inventory = inventory
