"""A small process supervisor: starts child processes, restarts any that die (with back-off),
and stops them all on SIGTERM/SIGINT. ``quanta server`` and ``quanta switch-host`` use it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger("quanta.supervisor")


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    history: list[float] = field(default_factory=list)


def quanta_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "quanta", *args]


class Supervisor:
    def __init__(self, children: list[Child], *, stop_timeout: float = 10.0) -> None:
        self.children = children
        self.stop_timeout = stop_timeout
        self._stopping = False

    async def _run_child(self, child: Child) -> int:
        delay = 0.5
        while not self._stopping:
            child.proc = await asyncio.create_subprocess_exec(*child.argv)
            child.started_at = time.monotonic()
            log.info("started %s (pid %d)", child.name, child.proc.pid)
            rc = await child.proc.wait()
            if self._stopping:
                return 0
            if rc == 2:  # configuration error (e.g. a port that cannot be bound): restarting will not help
                log.error("%s exited with a configuration error (code 2); not restarting", child.name)
                return 2
            child.restarts += 1
            if time.monotonic() - child.started_at > 30:
                delay = 0.5
            log.warning("%s (pid %d) exited with code %s; restarting in %.1fs", child.name, child.proc.pid, rc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        return 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks = [asyncio.create_task(self._run_child(c)) for c in self.children]
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        for t in done:
            if t is not stopper and t.result():
                code = t.result()
        await self.stop()
        for t in tasks:
            t.cancel()
        return code

    async def stop(self) -> None:
        self._stopping = True
        procs = [c.proc for c in self.children if c.proc is not None and c.proc.returncode is None]
        for pr in procs:
            pr.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(pr.wait() for pr in procs)), self.stop_timeout)
        except asyncio.TimeoutError:
            for pr in procs:
                if pr.returncode is None:
                    pr.kill()
        log.info("all components stopped")
