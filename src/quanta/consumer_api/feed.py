"""Progress feeds for ``GET /Consumer/Instructions/{id}/Stream``.

One poller per watched instruction, shared by every viewer of it: ten portals watching one
question cost the database what one does. The poller looks every ``fast`` seconds while the
status changes and backs off, doubling up to ``slow`` seconds, while it does not; it stops when
the instruction is done or its last viewer leaves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger("quanta.consumer_api")

# (the status as the stream sends it, whether it is final), or None: no such instruction
Snapshot = tuple[str, bool] | None
Loader = Callable[[int], Awaitable[Snapshot]]


@dataclass
class _Watch:
    viewers: int = 0
    data: str | None = None
    version: int = 0  # bumped on every change of ``data`` or ``done``
    done: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # replaced after each change
    task: asyncio.Task[None] | None = None

    def publish(self, data: str | None, done: bool) -> None:
        self.data, self.done = data, done
        self.version += 1
        self.changed.set()
        self.changed = asyncio.Event()


class StatusFeed:
    def __init__(self, load: Loader, fast: float = 0.2, slow: float = 1.0, check_every: float = 1.0) -> None:
        self._load = load
        self.fast = fast
        self.slow = slow
        self.check_every = check_every  # how often a quiet viewer asks whether its client is still there
        self._watches: dict[int, _Watch] = {}
        self.polls = 0  # loads done, all instructions together

    def watching(self) -> dict[int, int]:
        """instruction id -> number of viewers, for the instructions being polled."""
        return {iid: w.viewers for iid, w in self._watches.items()}

    async def subscribe(self, instruction_id: int,
                        connected: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
        """The instruction's status each time it changes (the current one first), until it is
        done, it is gone, or ``connected()`` says the viewer left."""
        w = self._watches.get(instruction_id)
        if w is None:
            w = self._watches[instruction_id] = _Watch()
            w.task = asyncio.create_task(self._poll(instruction_id, w), name=f"stream-{instruction_id}")
        w.viewers += 1
        seen = 0
        sent: str | None = None
        try:
            while True:
                if w.version != seen:
                    seen = w.version
                    if w.data is not None and w.data != sent:
                        sent = w.data
                        yield sent
                    if w.done:
                        return
                    continue
                changed = w.changed
                try:
                    await asyncio.wait_for(changed.wait(), self.check_every)
                except asyncio.TimeoutError:
                    if not await connected():
                        return
        finally:
            w.viewers -= 1
            if w.viewers == 0 and self._watches.get(instruction_id) is w:
                del self._watches[instruction_id]
                if w.task is not None:
                    w.task.cancel()

    async def _poll(self, instruction_id: int, w: _Watch) -> None:
        interval = self.fast
        failing = False
        while True:
            self.polls += 1
            try:
                snap = await self._load(instruction_id)
            except Exception as e:  # the database away: viewers keep the last status; look again later
                if not failing:
                    log.warning("progress of instruction %d unavailable (%s); retrying every %.1fs",
                                instruction_id, str(getattr(e, "orig", e)).strip()[:200], self.slow)
                failing = True
                await asyncio.sleep(self.slow)
                continue
            if failing:
                log.info("progress of instruction %d available again", instruction_id)
                failing = False
            data, done = snap if snap is not None else (w.data, True)
            if data != w.data or done:
                w.publish(data, done)
                interval = self.fast
            else:
                interval = min(interval * 2, self.slow)
            if done:
                return
            await asyncio.sleep(interval)
