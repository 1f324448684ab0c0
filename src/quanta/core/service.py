"""The Core: persists issued instructions, pokes Switches, hands them work, ingests responses
idempotently into the Responses database, and closes each instruction's gather window.

The class is transport-agnostic: :mod:`quanta.core.app` wires it to the internal HTTP/WS
endpoint. Database work runs on one writer thread, so writes keep their arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlalchemy as sa

from quanta import protocol as p
from quanta.db import store
from quanta.settings import poke_port

log = logging.getLogger("quanta.core")
T = TypeVar("T")

STATUS_TO_STATE = {"success": "success", "nocontent": "nocontent", "error": "error",
                   "notapplicable": "notapplicable", "notimplemented": "notapplicable"}


@dataclass
class SwitchLink:
    name: str
    host: str
    port: int
    incarnation: str
    send: Callable[[bytes], Awaitable[None]]
    devices: set[str] = field(default_factory=set)


class Core:
    def __init__(self, master: sa.Engine, responses: sa.Engine, secret: bytes,
                 expiry_interval: float = 0.2, purge_interval: float = 60.0) -> None:
        self.master = master
        self.responses = responses
        self.secret = secret
        self.switches: dict[str, SwitchLink] = {}
        self.active: dict[int, p.WorkItem] = {}
        # Active instruction -> target rows not yet answered. Set at issue (and recomputed from the
        # database at start), lowered by each committed batch; when it reaches 0 the database
        # confirms with one COUNT before the instruction finishes. Replaces a COUNT per batch.
        self.unanswered: dict[int, int] = {}
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="core-db")
        self._expiry_interval = expiry_interval
        self._purge_interval = purge_interval
        self._tasks: list[asyncio.Task[None]] = []
        self._finish_lock = asyncio.Lock()
        self._ended: dict[int, asyncio.Event] = {}  # active instruction -> set when it ends (see wait)

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a database call on the writer thread. If the database is unreachable, wait and
        retry: nothing is acknowledged until it is committed, so an outage delays, never loses."""
        delay = 0.5
        failing_since = None
        while True:
            try:
                result = await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as e:
                if failing_since is None:
                    failing_since = time.monotonic()
                log.error("database unavailable during %s: %s; retrying in %.1fs (nothing is acknowledged "
                          "until it is committed)", getattr(fn, "__name__", fn), str(e.orig or e).strip()[:200],
                          delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if failing_since is not None:
                log.warning("database back after %.1fs", time.monotonic() - failing_since)
            return result

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        for row in await self.db(store.active_instructions, self.master):
            self._cache(row)
        self.unanswered = await self.db(store.unanswered_many, self.responses, list(self.active))
        log.info("core started with %d active instructions", len(self.active))
        self._tasks = [asyncio.create_task(self._expiry_loop()), asyncio.create_task(self._purge_loop())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._db.shutdown(wait=True)

    def _cache(self, row: dict[str, Any]) -> p.WorkItem:
        item = p.WorkItem(instruction=p.SignedInstruction(body=row["body"], signature=row["signature"]),
                          id=row["id"], expires_at=row["expires_at"], devices=row["scope"])
        self.active[row["id"]] = item
        return item

    # -------------------------------------------------------------- issuing
    async def issue(self, instruction_id: int) -> dict[str, Any]:
        """Activate a stored, signed instruction: target, persist, poke. Idempotent."""
        row = await self.db(store.get_instruction, self.master, instruction_id)
        if row is None:
            raise KeyError(instruction_id)
        if row["status"] == "created":
            if row["body"] is None or row["signature"] is None:
                raise ValueError(f"instruction {instruction_id} is not signed")
            targets = await self.db(store.target_devices, self.master, row["scope"])
            existed = await self.db(store.insert_targets, self.responses, instruction_id, targets,
                                    row["response_expires_at"])
            if existed == 0:  # fresh rows, none answered yet (the instruction was never active)
                self.unanswered[instruction_id] = len(targets)
            await self.db(self._set_status, instruction_id, "active", len(targets))
            row["status"] = "active"
            row["targeted"] = len(targets)
            log.info("instruction %d issued: %d devices targeted (%d online)", instruction_id, len(targets),
                     sum(targets.values()))
        if row["status"] == "active":
            if instruction_id not in self.unanswered:
                self.unanswered[instruction_id] = await self.db(store.unanswered, self.responses, instruction_id)
            self._cache(row)
            if row["targeted"] == 0:
                await self.finish(instruction_id, "no devices in scope")
            else:
                await self.poke_all()
        return {"id": instruction_id, "status": row["status"], "targeted": row["targeted"]}

    def _set_status(self, instruction_id: int, status: str, targeted: int | None = None) -> None:
        from quanta.db.tables import instructions as t

        values: dict[str, Any] = {"status": status}
        if targeted is not None:
            values["targeted"] = targeted
        with self.master.begin() as c:
            c.execute(t.update().where(t.c.id == instruction_id).values(**values))

    async def finish(self, instruction_id: int, why: str, status: str = "finished") -> bool:
        """End an active instruction with ``status`` (finished, or cancelled): open devices end
        as expired. False if it was not active."""
        async with self._finish_lock:
            self.unanswered.pop(instruction_id, None)
            if self.active.pop(instruction_id, None) is None:
                row = await self.db(store.get_instruction, self.master, instruction_id)
                if row is None or row["status"] != "active":
                    return False
            await self.db(store.expire, self.responses, instruction_id)
            await self.db(self._set_status, instruction_id, status)
            ended = self._ended.pop(instruction_id, None)
            if ended is not None:
                ended.set()
        log.info("instruction %d %s: %s", instruction_id, status, why)
        msg = p.encode(p.Cancel(instruction_ids=[instruction_id]))
        for link in list(self.switches.values()):
            await self._safe_send(link, msg)
        return True

    async def wait(self, instruction_id: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for an active instruction to end; True once it is not
        (or no longer) active here. Its final status is in the database before this returns."""
        if instruction_id not in self.active:
            return True
        ended = self._ended.setdefault(instruction_id, asyncio.Event())
        try:
            await asyncio.wait_for(ended.wait(), timeout)
        except asyncio.TimeoutError:
            return instruction_id not in self.active
        return True

    async def cancel(self, instruction_id: int) -> bool:
        """Stop an active instruction now: open devices end as expired, the status says cancelled.
        An instruction that already finished is left as it is (returns False)."""
        row = await self.db(store.get_instruction, self.master, instruction_id)
        if row is None or row["status"] != "active":
            return False
        return await self.finish(instruction_id, "by request", status="cancelled")

    # ---------------------------------------------------------------- pokes
    async def poke_all(self) -> None:
        await asyncio.gather(*(self.poke(link) for link in list(self.switches.values())))

    async def poke(self, link: SwitchLink) -> None:
        port = poke_port(link.port)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(link.host, port), 3)
            writer.write(p.make_poke(self.secret))
            await writer.drain()
            writer.close()
        except (OSError, asyncio.TimeoutError) as e:
            # The Switch also fetches on every (re)connect, so a lost poke delays nothing for long;
            # fall back to pushing over the open link.
            log.warning("poke to switch %s at %s:%d failed (%s); pushing work over its link", link.name,
                        link.host, port, e)
            await self._send_work(link, known=())

    # ------------------------------------------------------- switch messages
    async def switch_connected(self, hello: p.SwitchHello, send: Callable[[bytes], Awaitable[None]]) -> SwitchLink:
        old = self.switches.get(hello.name)
        if old is not None:
            log.info("switch %s reconnected (incarnation %s)", hello.name, hello.incarnation)
        link = SwitchLink(hello.name, hello.host, hello.port, hello.incarnation, send)
        self.switches[hello.name] = link
        # The Switch re-announces everyone it holds right after its hello.
        await self.db(store.devices_offline, self.master, hello.name, None)
        log.info("switch %s connected from %s:%d", hello.name, hello.host, hello.port)
        return link

    async def switch_disconnected(self, link: SwitchLink) -> None:
        if self.switches.get(link.name) is link:
            del self.switches[link.name]
            await self.db(store.devices_offline, self.master, link.name, None)
            log.warning("switch %s disconnected; its devices are offline", link.name)

    async def handle(self, link: SwitchLink, msg: Any) -> None:
        if isinstance(msg, p.DevicesOnline):
            link.devices.update(d.device_id for d in msg.devices)
            await self.db(store.devices_online, self.master, link.name, msg.devices)
        elif isinstance(msg, p.DevicesOffline):
            link.devices.difference_update(msg.device_ids)
            await self.db(store.devices_offline, self.master, link.name, msg.device_ids)
        elif isinstance(msg, p.FetchWork):
            await self._send_work(link, msg.known)
        elif isinstance(msg, p.Delivered):
            await self.db(store.mark_sent, self.responses, msg.instruction_id, msg.device_ids)
        elif isinstance(msg, p.ResponseBatch):
            await self.ingest(link, msg)
        elif isinstance(msg, p.SwitchHello):
            raise p.ProtocolError("duplicate switch hello")

    async def _send_work(self, link: SwitchLink, known: Any) -> None:
        known_set = set(known)
        items = [w for i, w in self.active.items() if i not in known_set]
        await self._safe_send(link, p.encode(p.Work(items=items, active=list(self.active))))

    async def ingest(self, link: SwitchLink, batch: p.ResponseBatch) -> None:
        rows = [dict(instruction_id=r.response.instruction_id, device_id=r.device_id,
                     state=STATUS_TO_STATE[r.response.status], columns=r.response.columns,
                     rows=r.response.rows, error=r.response.error) for r in batch.responses]
        answered = await self.db(store.ingest_counted, self.responses, rows)
        # Committed: only now may the Switch (and through it the agent) forget these responses.
        await self._safe_send(link, p.encode(p.BatchAck(batch_id=batch.batch_id)))
        for iid, n in answered.items():
            if iid not in self.active:
                continue
            left = self.unanswered.get(iid)
            left = None if left is None or n < 0 else left - n
            if left is None or left <= 0:  # unknown, or apparently done: the database decides
                left = await self.db(store.unanswered, self.responses, iid)
            if iid in self.active:
                self.unanswered[iid] = left
                if left == 0:
                    await self.finish(iid, "every targeted device answered")

    async def _safe_send(self, link: SwitchLink, data: bytes) -> None:
        try:
            await link.send(data)
        except Exception as e:  # the link's reader notices the closed socket and cleans up
            log.debug("send to switch %s failed: %s", link.name, e)

    # ----------------------------------------------------------------- loops
    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(self._expiry_interval)
            now = time.time()
            for iid, item in list(self.active.items()):
                if item.expires_at <= now:
                    try:
                        await self.finish(iid, "gather window closed")
                    except Exception:
                        log.exception("could not close instruction %d; will retry", iid)

    async def _purge_loop(self) -> None:
        while True:
            try:
                n = await self.db(store.purge_expired, self.responses)
                if n:
                    log.info("purged %d responses past their response TTL", n)
            except Exception:
                log.exception("purge failed; will retry")
            await asyncio.sleep(self._purge_interval)

