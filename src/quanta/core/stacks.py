"""The Core of one of several Response Stacks sharing the Master's PostgreSQL databases.

A Master (role ``master``) sends each instruction to one Core, its ``core_url``. The other
stacks' Cores hold other devices on other Switches; they learn of the instruction, and of its end,
from the shared master database. :class:`StackCore` (the Core of every ``role = "response"``
host, ``quanta.core.app.serve``) adds to :class:`quanta.core.service.Core` one loop that runs
every :data:`FOLLOW_INTERVAL`:

- an instruction active in the database but not here (issued by another stack's Core, or an
  action approved on the Master) is opened in the ledger, with its open targets counted from the
  database, and handed to this stack's Switches (pushed over their links; a poke if that fails);
- an instruction active here that the database says has ended (finished by another stack,
  cancelled through the Consumer API on any stack, expired) is closed here: its waiters wake and
  this stack's Switches get its ``Cancel``;
- each instruction this Core committed answers to since the last turn is recounted from the
  database (one grouped ``COUNT``), so the Core that commits the last open target, on whichever
  stack, finishes it: the ledger's in-memory hint counts only this Core's own answers.

The target rows are keyed by (instruction, device) in the one Responses database, so an answer is
committed once whichever stack's Switch carried it (a device that moves between stacks included),
and the final status is a compare-and-set from ``active`` (:meth:`StackCore._set_status`): the
first stack to end an instruction decides how it ended (a cancel is never turned into
``finished`` by a slower stack's window closing).

Reads run on their own thread (:attr:`StackCore._reader`), never queued behind the writer thread's
ingest. A single server (role ``single``) runs the plain :class:`Core`, without this loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa

from quanta.core.service import DB_OUTAGE, Core, _AnswerGroup, _BatchResult, _short
from quanta.db import store
from quanta.db.tables import instructions as t_instructions

log = logging.getLogger("quanta.core")

FOLLOW_INTERVAL = 0.25  # seconds between two looks at the shared master database
NOT_ENDED = ("active", "created")  # an instruction in the ledger with one of these has not ended


def active_ids(engine: sa.Engine) -> set[int]:
    with engine.connect() as c:
        return {int(i) for i in c.scalars(sa.select(t_instructions.c.id).where(t_instructions.c.status == "active"))}


class StackCore(Core):
    def __init__(self, *args: Any, follow_interval: float = FOLLOW_INTERVAL, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._follow_interval = follow_interval
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="core-follow")
        self._dirty: set[int] = set()  # instructions this Core committed answers to since the last turn
        self._dirty_lock = threading.Lock()  # _write_group runs on the writer thread
        self.followed = 0  # instructions opened here because another stack issued them (tests read it)

    async def start(self) -> None:
        await super().start()
        self._tasks.append(asyncio.create_task(self._follow_loop()))

    async def stop(self) -> None:
        await super().stop()
        self._reader.shutdown(wait=True)

    async def _read(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, *args)

    def _write_group(self, g: _AnswerGroup) -> list[_BatchResult]:
        """Every write of answers goes through here (a group written whole, each batch alone, each
        answer alone): whatever it committed, and even if it failed part way, its instructions are
        recounted on the next turn (after the commit, so that the count sees it)."""
        try:
            return super()._write_group(g)
        finally:
            with self._dirty_lock:
                self._dirty.update({r["instruction_id"] for _, rows in g.batches for r in rows})

    def _set_status(self, instruction_id: int, status: str, targeted: int | None = None) -> None:
        """active -> ``status`` only: another stack may have ended it first, and its word stands."""
        values: dict[str, Any] = {"status": status}
        if targeted is not None:
            values["targeted"] = targeted
        with self.master.begin() as c:
            c.execute(t_instructions.update().where(t_instructions.c.id == instruction_id,
                                                    t_instructions.c.status == "active").values(**values))

    async def _follow_loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._follow_interval)
            try:
                await self.follow()
                if failing:
                    log.warning("following the other Response Stacks again")
                failing = False
            except DB_OUTAGE as e:
                if not failing:
                    log.error("database unavailable: cannot follow the other Response Stacks (%s); retrying",
                              _short(e))
                failing = True
            except Exception:  # noqa: BLE001 - the loop must survive anything one turn meets
                log.exception("following the other Response Stacks failed; will retry")

    async def follow(self) -> None:
        """One turn: open what another stack issued, close what ended elsewhere, recount what this
        Core answered (see the module's docstring)."""
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        active = await self._read(active_ids, self.master)
        persisting = set(self._persisting)
        for iid in sorted(active - set(self.ledger) - persisting):
            await self._open_from_elsewhere(iid)
        gone = [i for i in self.ledger if i not in active and i not in persisting]
        if gone:
            statuses = await self._read(store.instruction_statuses, self.master, gone)
            for iid in gone:
                status = statuses.get(iid, "gone")
                if status not in NOT_ENDED:
                    await self._ended_elsewhere(iid, status)
        recount = [i for i in dirty if i in self.ledger and i not in persisting]
        if recount:
            left = await self._read(store.unanswered_many, self.responses, recount)
            effects = []
            for iid, n in left.items():
                effects += self.ledger.recounted(iid, n)
            await self._apply(effects)

    async def _open_from_elsewhere(self, iid: int) -> None:
        row = await self._read(store.get_instruction, self.master, iid)
        if row is None or row["status"] != "active":
            return
        left = await self._read(store.unanswered, self.responses, iid)
        if self.ledger.phase(iid) is not None or iid in self._persisting:  # issued here meanwhile
            return
        item = self._cache(row, left)
        self.followed += 1
        log.info("instruction %d issued on another stack: handed to %d Switches here (%d targets open)", iid,
                 len(self.switches), left)
        if left == 0:
            await self._apply(self.ledger.recounted(iid, 0))
        else:
            await self.hand_out(item)

    async def _ended_elsewhere(self, iid: int, status: str) -> None:
        async with self._finish_lock:
            if not self.ledger.close(iid):
                return
            ended = self._ended.pop(iid, None)
            if ended is not None:
                ended.set()
        log.info("instruction %d %s on another stack: its Switches here are told", iid, status)
        await self._cancel_everywhere(iid)


__all__ = ["FOLLOW_INTERVAL", "StackCore", "active_ids"]
