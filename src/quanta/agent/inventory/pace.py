"""The capture sources' common part: their threads, and the sleep between two polls, cut short by
a stop or a settings change."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .settings import InventorySettings

log = logging.getLogger("quanta.agent.inventory")


class Pace:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._stopped = False
        self._changes = 0

    @property
    def stopped(self) -> bool:
        return self._stopped

    def sleep(self, seconds: float) -> bool:
        """Wait ``seconds``, or less when :meth:`stop` or :meth:`wake` is called; True when stopped."""
        with self._cond:
            seen = self._changes
            self._cond.wait_for(lambda: self._stopped or self._changes != seen, seconds)
            return self._stopped

    def wake(self) -> None:
        """The settings changed: the sleeping thread polls now and then sleeps its new interval."""
        with self._cond:
            self._changes += 1
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


class Capture:
    """What every capture source shares: its settings (replaced live by :meth:`reconfigure`),
    its threads and their :class:`Pace`."""

    def __init__(self, settings: InventorySettings) -> None:
        self.settings = settings
        self.pace = Pace()
        self._threads: list[threading.Thread] = []

    def _spawn(self, name: str, fn: Callable[[], None]) -> None:
        def run() -> None:
            try:
                fn()
            except Exception:  # noqa: BLE001 - capture must never take the agent down
                log.exception("%s failed", name)

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def reconfigure(self, settings: InventorySettings) -> None:
        """New settings (the same sources on): intervals apply from the next poll, which comes now."""
        self.settings = settings
        self.pace.wake()

    def stop(self) -> None:
        self.pace.stop()
        for t in self._threads:
            t.join(2)
