"""The Core: persists issued instructions, pokes Switches, hands them work, ingests responses
idempotently into the Responses database, and closes each instruction's gather window.

The class is transport-agnostic: :mod:`quanta.core.app` wires it to the internal HTTP/WS
endpoint. Database work runs on one writer thread, so writes keep their arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlalchemy as sa
import tenacity

from quanta import protocol as p
from quanta.protocol.core_ledger import CoreLedger, Effect, Recount
from quanta import metrics
from quanta.db import held as held_store
from quanta.db import store
from quanta.internal import Credentials, poke_key
from quanta.settings import poke_port

log = logging.getLogger("quanta.core")
T = TypeVar("T")

DB_OUTAGE = (sa.exc.OperationalError, sa.exc.InterfaceError)  # retried; any other error is the data's
HELD_LOG_INTERVAL = 10.0  # held answers are logged at most this often (with their counts)
# Tags devices report on their live connections are written at most this often, coalesced (each
# device's latest, all in one statement): a flood of reports costs the master database one write
# per interval, whatever the number of devices or reports.
TAGS_WRITE_INTERVAL = 0.5
TAGS_RETRY = 5.0  # after a database outage, the tags wait this long before the next attempt
# Delivery reports ('sent', a progress state only, best effort: see quanta.protocol.switch_batches)
# are gathered for this long and written together, after the answers: a device's answer that comes
# first removes it from them, and while answers wait for the writer the reports wait (at most
# SENT_YIELD_MAX), so that a Switch link's reader never waits for them and they never delay an
# answer's commit.
SENT_WRITE_INTERVAL = 0.25
SENT_YIELD_MAX = 2.0


class BatchNotStored(Exception):
    """The database took nothing of a Switch's batch (not even the ``error`` rows that replace the
    answers it refused): the batch is not acknowledged, and the link that carried it is dropped so
    that its Switch sends it again on its next one (``__cause__``: the database's error)."""

    def __init__(self, switch: str, batch_id: int, error: Exception) -> None:
        super().__init__(f"switch {switch}: batch {batch_id} could not be stored ({_short(error)}); "
                         "not acknowledged")


def _short(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


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


_Stored = tuple[dict[int, int], list[dict[str, Any]]]  # answered counts per instruction, answers held
_BatchResult = _Stored | Exception  # an Exception: the database took none of it (that batch alone fails)


def _uncounted(rows: Any) -> dict[int, int]:
    """Counts the ledger cannot trust for these answer rows: -1 for each of their instructions, so
    that each is recounted from the database (CoreLedger.committed)."""
    return {r["instruction_id"]: -1 for r in rows}


@dataclass
class _AnswerGroup:
    """Switch batches written together by one writer-thread call (:meth:`Core._queue_answers`)."""

    batches: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)  # (switch, rows)
    started: bool = False  # the writer has taken it: nothing more may join
    attempts: int = 0  # writes of it begun (more than one: ``db`` retried it after an outage)
    result: asyncio.Future[list[_BatchResult]] | None = None


class Core:
    def __init__(self, master: sa.Engine, responses: sa.Engine, secret: bytes | Credentials,
                 expiry_interval: float = 0.2, purge_interval: float = 60.0) -> None:
        self.master = master
        self.responses = responses
        self.secret = secret
        self.switches: dict[str, SwitchLink] = {}
        # Which instructions are active, their open-target hints, which answers count: the pure rules
        # (quanta.protocol.core_ledger); this class is the shell around it (databases, Switch links).
        self.ledger = CoreLedger()
        self.active = self.ledger  # `iid in core.active`, len(), iteration, .items()
        metrics.core_instructions.labels(state="active").set_function(lambda: len(self.ledger))
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="core-db")
        self._expiry_interval = expiry_interval
        self._purge_interval = purge_interval
        self._tasks: list[asyncio.Task[None]] = []
        self._finish_lock = asyncio.Lock()
        self._ended: dict[int, asyncio.Event] = {}  # active instruction -> set when it ends (see wait)
        self._persisting: dict[int, asyncio.Future[None]] = {}  # handed out, target rows not yet committed
        self._group: _AnswerGroup | None = None  # answers queued for one write that has not started
        self._group_lock = threading.Lock()  # the loop appends to a group, the writer thread starts it
        self.stats: Counter[str] = Counter()  # held_late, held_refused, devices_refused
        self._held_logged = -HELD_LOG_INTERVAL
        self._tags: dict[str, tuple[str, dict[str, str]]] = {}  # device -> (its Switch, its latest tags), to write
        self._tags_wake = asyncio.Event()
        self._tags_superseded: set[str] | None = None  # announced while a tags write is under way
        self._sent: dict[int, set[str]] = {}  # instruction -> devices delivered to, to be written as 'sent'
        self._sent_wake = asyncio.Event()

    async def db(self, fn: Callable[..., T], *args: Any, first: asyncio.Future[T] | None = None) -> T:
        """Run a database call on the writer thread. If the database is unreachable, wait and
        retry (0.5 s doubling to 5 s, jittered), for as long as it takes: nothing is acknowledged
        until it is committed, so an outage delays, never loses. ``first``: the first attempt,
        already queued on the writer thread (see :meth:`_queue_answers`).

        The first attempt is awaited directly: the retry loop (tenacity) costs ~50 µs to set up,
        and a question makes tens of these calls, nearly all of which succeed at once."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            return await (first if first is not None else loop.run_in_executor(self._db, fn, *args))
        except DB_OUTAGE as e:
            failed: BaseException | None = e
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(DB_OUTAGE), reraise=True,
            wait=tenacity.wait_exponential(multiplier=0.5, max=5.0) + tenacity.wait_random(0, 0.25),
            before_sleep=lambda rs: log.error(
                "database unavailable during %s: %s; retrying in %.1fs (nothing is acknowledged until it is "
                "committed)", getattr(fn, "__name__", fn), _short(rs.outcome.exception()),
                rs.next_action.sleep if rs.next_action else 0.0))
        async for attempt in retrying:
            with attempt:
                if failed is not None:  # the direct attempt's failure, as tenacity's first attempt
                    err, failed = failed, None
                    raise err
                result = await loop.run_in_executor(self._db, fn, *args)
        log.warning("database back after %.1fs", time.monotonic() - started)
        return result

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        for row in await self.db(store.active_instructions, self.master):
            self._cache(row)
        effects: list[Effect] = []
        for iid, left in (await self.db(store.unanswered_many, self.responses, list(self.active))).items():
            effects += self.ledger.recounted(iid, left)  # 0: answered in full before a crash, not yet ended
        log.info("core started with %d active instructions", len(self.active))
        self._tasks = [asyncio.create_task(self._expiry_loop()), asyncio.create_task(self._purge_loop()),
                       asyncio.create_task(self._tags_loop()), asyncio.create_task(self._sent_loop())]
        await self._apply(effects)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._db.shutdown(wait=True)

    def _cache(self, row: dict[str, Any], unanswered: int | None = None) -> p.WorkItem:
        item = p.WorkItem(instruction=p.SignedInstruction(body=row["body"], signature=row["signature"]),
                          id=row["id"], expires_at=row["expires_at"], devices=row["scope"])
        self.ledger.open(item, unanswered)
        return item

    # -------------------------------------------------------------- issuing
    async def issue(self, instruction_id: int) -> dict[str, Any]:
        """Activate a stored, signed instruction: target, persist, hand it to the Switches. Idempotent.

        A question goes out first and is persisted while it travels (:meth:`_issue_at_once`); an
        action is persisted first (its targets, then the compare-and-set to active), then handed
        out, so that nothing changes a device before the database knows it was asked to."""
        metrics.core_milestones.start(instruction_id, "issue")
        busy = self._persisting.get(instruction_id)
        if busy is not None:  # issued a moment ago and still being written: answer as that issue does
            await asyncio.shield(busy)
        row = await self.db(store.get_instruction, self.master, instruction_id)
        if row is None:
            raise KeyError(instruction_id)
        unanswered: int | None = None
        if row["status"] == "created":
            if row["body"] is None or row["signature"] is None:
                raise ValueError(f"instruction {instruction_id} is not signed")
            busy = self._persisting.get(instruction_id)
            if busy is not None:  # a concurrent issue of the same instruction got there first
                await asyncio.shield(busy)
                return await self.issue(instruction_id)
            if row["kind"] == "question" and self.ledger.phase(instruction_id) is None:
                return await self._issue_at_once(row)
            targets = await self.db(store.target_devices, self.master, row["scope"])
            metrics.core_milestones.mark(instruction_id, "targets_read")
            busy = self._persisting.get(instruction_id)
            if busy is not None:  # a concurrent issue of the same instruction got there first
                await asyncio.shield(busy)
                return await self.issue(instruction_id)
            existed = await self.db(store.insert_targets, self.responses, instruction_id, targets,
                                    row["response_expires_at"])
            # fresh rows, none answered yet (the instruction was never active): the hint is exact
            unanswered = len(targets) if existed == 0 else None
            if not await self.db(self._activate, instruction_id, len(targets)):
                return await self._not_issued(instruction_id)
            row["status"] = "active"
            row["targeted"] = len(targets)
            log.info("instruction %d issued: %d devices targeted (%d online)", instruction_id, len(targets),
                     sum(targets.values()))
        if row["status"] == "active":
            item = None
            if instruction_id not in self.active:
                if unanswered is None:
                    unanswered = await self.db(store.unanswered, self.responses, instruction_id)
                item = self._cache(row, unanswered)
            if row["targeted"] == 0:
                await self.finish(instruction_id, "no devices in scope")
            elif item is not None:
                await self.hand_out(item)
        return {"id": instruction_id, "status": row["status"], "targeted": row["targeted"]}

    async def _issue_at_once(self, row: dict[str, Any]) -> dict[str, Any]:
        """A question: open it in the ledger and hand it to the Switches *before* its targets are
        even read (no per-device work before the first send: a Switch delivers to the ready devices
        in the instruction's scope, which the Core has vetted, and needs no target list), then read
        the targets, write their rows and the compare-and-set to active. Until that commit, every
        write that needs the target rows (the answers' ingest, Delivered, the end) waits for it
        (:meth:`_written`), so nothing counted is lost, and the open-target hint is set from the
        targets before any answer can count. A crash before the commit leaves the instruction
        ``created`` (never issued, later ``expired``); the answers it drew are then held as for an
        unknown instruction, not lost."""
        iid = row["id"]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._persisting[iid] = done
        activated = False
        targets: dict[str, bool] = {}
        try:
            row = dict(row, status="active")
            item = self._cache(row, None)  # the hint once the targets are read (below)
            await self.hand_out(item)
            metrics.core_milestones.mark(iid, "handed_out")
            targets = await self.db(store.target_devices, self.master, row["scope"])
            metrics.core_milestones.mark(iid, "targets_read")
            self.ledger.open(item, len(targets))  # exact: nothing counts before the commit below
            existed = await self.db(store.insert_targets, self.responses, iid, targets, row["response_expires_at"])
            metrics.core_milestones.mark(iid, "targets_written")
            activated = await self.db(self._activate, iid, len(targets))
            metrics.core_milestones.mark(iid, "activated")
        finally:
            del self._persisting[iid]
            done.set_result(None)
            if not activated:  # refused by the database, or cancelled meanwhile: call it back
                self.ledger.close(iid)
                await self._cancel_everywhere(iid)
        if not activated:
            return await self._not_issued(iid)
        log.info("instruction %d issued: %d devices targeted (%d online)", iid, len(targets), sum(targets.values()))
        if not targets:
            await self.finish(iid, "no devices in scope")
        elif existed:  # rows of an earlier, interrupted issue: the database knows how many are open
            await self._apply([Recount(iid)])
        return {"id": iid, "status": "active", "targeted": len(targets)}

    async def _not_issued(self, instruction_id: int) -> dict[str, Any]:
        """Cancelled (or expired unissued) between the read and the compare-and-set: it never runs;
        the target rows just written end as expired. (Activated by someone else meanwhile: its rows
        are left as they are.)"""
        now = await self.db(store.get_instruction, self.master, instruction_id)
        if now is not None and now["status"] == "active":
            return {"id": instruction_id, "status": "active", "targeted": now["targeted"]}
        await self.db(store.expire, self.responses, instruction_id)
        log.info("instruction %d not issued: it is %s", instruction_id, now["status"] if now else "gone")
        return {"id": instruction_id, "status": now["status"] if now else "gone", "targeted": 0}

    async def _written(self, instruction_ids: Any) -> None:
        """Wait until the target rows of each of ``instruction_ids`` being issued are committed."""
        for iid in instruction_ids:
            busy = self._persisting.get(iid)
            if busy is not None:
                await asyncio.shield(busy)

    def _activate(self, instruction_id: int, targeted: int) -> bool:
        """created -> active, a compare-and-set: an instruction cancelled (or expired unissued) by
        the Consumer API or the Coordinator meanwhile is never brought back to life."""
        from quanta.db.tables import instructions as t

        with self.master.begin() as c:
            return c.execute(t.update().where(t.c.id == instruction_id, t.c.status == "created")
                             .values(status="active", targeted=targeted)).rowcount == 1

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
        await self._written((instruction_id,))
        async with self._finish_lock:
            if not self.ledger.close(instruction_id):  # closed before the expiry is queued: see CoreLedger
                row = await self.db(store.get_instruction, self.master, instruction_id)
                if row is None or row["status"] != "active":
                    return False
            await self.db(store.expire, self.responses, instruction_id)
            await self.db(self._set_status, instruction_id, status)
            ended = self._ended.pop(instruction_id, None)
            if ended is not None:
                ended.set()
        metrics.core_instructions_ended.labels(status=status).inc()
        metrics.core_milestones.mark(instruction_id, "finished")
        log.info("instruction %d %s: %s", instruction_id, status, why)
        await self._cancel_everywhere(instruction_id)
        return True

    async def _cancel_everywhere(self, instruction_id: int) -> None:
        msg = p.encode(p.Cancel(instruction_ids=[instruction_id]))
        for link in list(self.switches.values()):
            await self._safe_send(link, msg)

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

    # ----------------------------------------------------- handing out work
    async def hand_out(self, item: p.WorkItem) -> None:
        """Give a newly active instruction to every linked Switch over its open link (no extra
        round trip). A Switch whose link cannot take it is poked on its poke port instead, the
        seed's wake-up; it also fetches everything active on every (re)connect."""
        msg = p.encode(p.Work(items=[item], active=list(self.active)))
        links = list(self.switches.values())
        pushed = await asyncio.gather(*(self._push(link, msg) for link in links))
        await asyncio.gather(*(self.poke(link) for link, ok in zip(links, pushed) if not ok))

    async def _push(self, link: SwitchLink, data: bytes) -> bool:
        try:
            await link.send(data)
        except Exception as e:  # noqa: BLE001 - the link's reader notices the closed socket and cleans up
            log.debug("push to switch %s failed: %s", link.name, e)
            return False
        return True

    async def poke(self, link: SwitchLink) -> None:
        port = poke_port(link.port)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(link.host, port), 3)
            writer.write(p.make_poke(poke_key(self.secret)))
            await writer.drain()
            writer.close()
        except (OSError, asyncio.TimeoutError) as e:
            # The Switch also fetches on every (re)connect, so a lost poke delays nothing for long.
            log.warning("poke to switch %s at %s:%d failed (%s); it gets the work when its link is back",
                        link.name, link.host, port, e)

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
            await self.devices_online(link, msg)
        elif isinstance(msg, p.DevicesOffline):
            link.devices.difference_update(msg.device_ids)
            await self.db(store.devices_offline, self.master, link.name, msg.device_ids)
        elif isinstance(msg, p.FetchWork):
            await self._send_work(link, msg.known)
        elif isinstance(msg, p.Delivered):
            # a link speaks for its own devices only; written by write_deliveries, after the answers
            if msg.instruction_id in self.ledger:
                mine = link.devices.intersection(msg.device_ids)
                if mine:
                    self._sent.setdefault(msg.instruction_id, set()).update(mine)
                    self._sent_wake.set()
        elif isinstance(msg, p.ResponseBatch):
            await self.ingest(link, msg)
        elif isinstance(msg, p.DeviceTags):  # written by _tags_loop, coalesced
            self._tags.update((d, (link.name, tags)) for d, tags in msg.devices.items() if d in link.devices)
            self._tags_wake.set()
        elif isinstance(msg, p.SwitchHello):
            raise p.ProtocolError("duplicate switch hello")

    async def devices_online(self, link: SwitchLink, msg: p.DevicesOnline) -> None:
        """Register the devices a Switch announces (enrolled ones only) and tell it, per device, which
        active instructions are already answered, so that none is delivered to it again."""
        for d in msg.devices:  # a hello's tags are newer than a report still waiting to be written
            self._tags.pop(d.device_id, None)
            if self._tags_superseded is not None:
                self._tags_superseded.add(d.device_id)
        refused = list(await self.db(store.devices_online, self.master, link.name, msg.devices) or ())
        if refused:
            self.stats["devices_refused"] += len(refused)
            log.warning("switch %s announced %d devices that are not enrolled (or are revoked); refused, "
                        "not registered: %s", link.name, len(refused), ", ".join(refused[:10]) +
                        (" ..." if len(refused) > 10 else ""))
        gone = set(refused)
        ids = [d.device_id for d in msg.devices if d.device_id not in gone]
        link.devices.update(ids)
        answered: dict[str, list[int]] = {}
        if self.active and ids:
            answered = await self.db(store.answered_by_device, self.responses, list(self.active), ids)
        if msg.seq:
            await self._safe_send(link, p.encode(p.OnlineAck(seq=msg.seq, answered=answered, refused=refused)))

    async def _send_work(self, link: SwitchLink, known: Any) -> None:
        known_set = set(known)
        items = [w for i, w in self.active.items() if i not in known_set]
        await self._safe_send(link, p.encode(p.Work(items=items, active=list(self.active))))

    async def ingest(self, link: SwitchLink, batch: p.ResponseBatch) -> None:
        """Commit a batch of answers, then acknowledge it. Nothing in one answer can stop the batch
        or the link: an answer is *held* instead of counted when its instruction has ended (late:
        final counts stay final), when its device is not on this Switch's link, when its
        instruction is unknown, or when the database refuses it (see ``quanta.db.held``)."""
        answers = batch.responses
        ms, latest = metrics.core_milestones, metrics.core_milestones.instruction_id
        carries = any(a.response.instruction_id == latest for a in answers)
        if carries:
            ms.mark(latest, "first_batch")
        if self._persisting:  # an answer may overtake its instruction's target rows: wait for them
            await self._written({a.response.instruction_id for a in answers})
        refused_devices: set[str] = set()
        strangers = self.ledger.strangers(answers, link.devices)
        if strangers:  # an answer may be re-sent after its device went away: ask where it last was
            last = await self.db(store.device_switches, self.master, list(strangers))
            refused_devices = {d for d in strangers if last.get(d) != link.name}
        others = self.ledger.not_active(answers)
        statuses = await self.db(store.instruction_statuses, self.master, list(others)) if others else {}
        # No await between sorting and queuing the write (see CoreLedger).
        sorted_ = self.ledger.sort(answers, link=link.name, refused_devices=refused_devices, statuses=statuses)
        rows = [dict(instruction_id=a.response.instruction_id, device_id=a.device_id,
                     state=STATUS_TO_STATE[a.response.status], columns=a.response.columns, rows=a.response.rows,
                     error=a.response.error, _response=a.response) for a in sorted_.count]
        if self._sent:  # answered: its 'sent' need not be written
            sent = self._sent
            for a in sorted_.count:
                ids = sent.get(a.response.instruction_id)
                if ids:
                    ids.discard(a.device_id)
        t0 = time.perf_counter()
        group, index = self._queue_answers(link.name, rows)
        stored = (await asyncio.shield(group))[index]
        if isinstance(stored, Exception):
            # answers stored one by one before the one that failed are committed: a re-send counts
            # nothing for them, so their instructions are recounted from the database now
            await self._apply(self.ledger.committed(_uncounted(rows)))
            raise BatchNotStored(link.name, batch.batch_id, stored) from stored
        moved, refused = stored
        metrics.core_commit_latency.observe(time.perf_counter() - t0)
        if carries:
            ms.mark(latest, "first_commit")
            ms.again(latest, "last_commit")
        metrics.core_answers.inc(sum(n for n in moved.values() if n > 0))
        held = [self._held(h.kind, link, h.answer, h.reason) for h in sorted_.held] + refused
        if held:
            await self._hold(link, held)
        # Committed: only now may the Switch (and through it the agent) forget these responses.
        await self._safe_send(link, p.encode(p.BatchAck(batch_id=batch.batch_id)))
        await self._apply(self.ledger.committed(moved))

    async def _apply(self, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Recount):
                left = await self.db(store.unanswered, self.responses, e.instruction_id)
                await self._apply(self.ledger.recounted(e.instruction_id, left))
            else:
                await self.finish(e.instruction_id, e.why)

    @staticmethod
    def _held(kind: str, link: SwitchLink, r: p.DeviceResponse, reason: str) -> dict[str, Any]:
        return dict(kind=kind, instruction_id=r.response.instruction_id, device_id=r.device_id, switch=link.name,
                    state=STATUS_TO_STATE[r.response.status], reason=reason, response=r.response)

    def _queue_answers(self, switch: str, rows: list[dict[str, Any]]) -> tuple[asyncio.Future[list[_BatchResult]], int]:
        """Queue a Switch batch's counted answers for the writer thread, at once (no ``await``: see
        CoreLedger.sort). Group commit: batches that arrive while the writer is busy join one group,
        written in one transaction when the writer comes to it, so that under load the Core commits
        once per writer turn, not once per batch, and touches each database page once for many
        answers. Returns the group's result (one entry per batch) and this batch's index in it."""
        with self._group_lock:
            g = self._group
            if g is None or g.started:
                g = self._group = _AnswerGroup()
                queued = asyncio.get_running_loop().run_in_executor(self._db, self._write_group, g)
                g.result = asyncio.ensure_future(self.db(self._write_group, g, first=queued))
            g.batches.append((switch, rows))
            return g.result, len(g.batches) - 1  # type: ignore[return-value]

    def _write_group(self, g: _AnswerGroup) -> list[_BatchResult]:
        """On the writer thread: every batch of the group in one transaction; if the database refuses
        it (not an outage: those are retried by ``db``, the group whole), each batch alone, so that
        one bad answer costs only its own batch the slow path, and a batch that cannot be stored at
        all fails alone (its entry is the exception; the other Switches' batches are acknowledged).
        The counts of a group written whole are all given to its first batch: the ledger needs only
        the totals. A write retried after an outage (``db``) counts nothing it finds already
        answered, which may be what the attempt cut short committed: its instructions are then
        recounted from the database instead (-1), so that one still ends when its last device answers."""
        with self._group_lock:
            g.started = True  # from now on, new batches go to the next group
        g.attempts += 1
        out = self._write_batches(g.batches)
        if g.attempts > 1:  # what an attempt cut short by the outage committed is not in these counts
            unknown = _uncounted(r for _, rows in g.batches for r in rows)
            for i, r in enumerate(out):  # -1: the ledger recounts from the database (given once)
                if not isinstance(r, Exception):
                    out[i], unknown = (unknown, r[1]), {}
        return out

    def _write_batches(self, batches: list[tuple[str, list[dict[str, Any]]]]) -> list[_BatchResult]:
        """One attempt of :meth:`_write_group`."""
        if len(batches) > 1:
            try:
                moved = store.ingest_counted(self.responses, [r for _, rows in batches for r in rows])
                return [(moved, [])] + [({}, [])] * (len(batches) - 1)
            except DB_OUTAGE:
                raise
            except Exception as e:  # noqa: BLE001 - a value the database cannot take
                log.warning("the database refused a group of %d batches (%s); storing each batch alone",
                            len(batches), _short(e))
        out: list[_BatchResult] = []
        for switch, rows in batches:
            try:
                out.append(self._store_answers(switch, rows))
            except DB_OUTAGE:
                raise
            except Exception as e:  # noqa: BLE001 - even its answers' replacements refused: see ingest
                out.append(e)
        return out

    def _store_answers(self, switch: str, rows: list[dict[str, Any]]
                       ) -> tuple[dict[int, int], list[dict[str, Any]]]:
        """On the writer thread: the batch in one transaction; if the database refuses it (not an
        outage: those are retried by ``db``), each answer alone, so only the ones it refuses are held
        (returned), each replaced by an ``error`` naming why, so that its device still ends in a final
        state. Returns the answered counts per instruction (see ``store.ingest_counted``)."""
        try:
            return store.ingest_counted(self.responses, rows), []
        except DB_OUTAGE:
            raise
        except Exception as e:  # noqa: BLE001 - a value the database cannot take
            log.warning("switch %s: the database refused a batch of %d answers (%s); storing them one by one",
                        switch, len(rows), _short(e))
        out: dict[int, int] = {}
        held: list[dict[str, Any]] = []
        for row in rows:
            try:
                got = store.ingest_counted(self.responses, [row])
            except DB_OUTAGE:
                raise
            except Exception as e:  # noqa: BLE001
                reason = f"the database refused it: {_short(e)}"
                held.append(dict(kind="refused", instruction_id=row["instruction_id"], device_id=row["device_id"],
                                 switch=switch, state=row["state"], reason=reason, response=row["_response"]))
                got = store.ingest_counted(self.responses, [dict(
                    row, state="error", columns=[], rows=[], error=f"answer could not be stored ({reason}); "
                                                                  "held for administrators")])
            for iid, n in got.items():
                out[iid] = -1 if n < 0 or out.get(iid, 0) < 0 else out.get(iid, 0) + n
        return out, held

    async def _hold(self, link: SwitchLink, held: list[dict[str, Any]]) -> None:
        try:
            await self.db(held_store.hold, self.responses, held)
        except Exception as e:  # noqa: BLE001 - never let keeping a bad answer stop the good ones
            log.error("switch %s: could not keep %d held answers: %s", link.name, len(held), _short(e))
            return
        kinds: dict[str, int] = {}
        for h in held:
            kinds[h["kind"]] = kinds.get(h["kind"], 0) + 1
            self.stats[f"held_{h['kind']}"] += 1
        for kind, n in kinds.items():
            metrics.core_held.labels(kind=kind).inc(n)
        now = time.monotonic()
        if now - self._held_logged >= HELD_LOG_INTERVAL:  # one line per interval, whatever the flood
            self._held_logged = now
            first = held[0]
            log.warning("switch %s: held %s answers (not counted); e.g. device %s, instruction %d: %s",
                        link.name, ", ".join(f"{n} {k}" for k, n in kinds.items()), first["device_id"],
                        first["instruction_id"], first["reason"])

    async def _safe_send(self, link: SwitchLink, data: bytes) -> None:
        try:
            await link.send(data)
        except Exception as e:  # the link's reader notices the closed socket and cleans up
            log.debug("send to switch %s failed: %s", link.name, e)

    # ----------------------------------------------------------------- loops
    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(self._expiry_interval)
            for due in self.ledger.due(time.time()):
                try:
                    await self.finish(due.instruction_id, due.why)
                except Exception:
                    log.exception("could not close instruction %d; will retry", due.instruction_id)

    async def _tags_loop(self) -> None:
        """Write the devices' reported tags: each device's latest, in one statement, at most every
        TAGS_WRITE_INTERVAL. Not retried in place (as ``db`` would): after an outage what was not
        written waits with the newer reports, except where a hello came meanwhile (its
        DevicesOnline, written in between, is newer)."""
        loop = asyncio.get_running_loop()
        while True:
            await self._tags_wake.wait()
            await asyncio.sleep(TAGS_WRITE_INTERVAL)
            self._tags_wake.clear()
            pending, self._tags = self._tags, {}
            self._tags_superseded = superseded = set()
            try:
                await loop.run_in_executor(self._db, store.set_device_tags, self.master, pending)
            except DB_OUTAGE as e:
                log.error("database unavailable: the tags of %d devices wait %.0fs (%s)", len(pending), TAGS_RETRY,
                          _short(e))
                self._tags = {**{d: t for d, t in pending.items() if d not in superseded}, **self._tags}
                self._tags_wake.set()
                await asyncio.sleep(TAGS_RETRY)
            except Exception as e:  # noqa: BLE001 - the next hello carries them; never stop the loop
                log.error("could not write the tags of %d devices: %s", len(pending), _short(e))
            finally:
                self._tags_superseded = None

    async def _sent_loop(self) -> None:
        while True:
            await self._sent_wake.wait()
            await asyncio.sleep(SENT_WRITE_INTERVAL)
            self._sent_wake.clear()
            await self.write_deliveries()

    async def write_deliveries(self) -> None:
        """Write the delivery reports gathered since the last call (pending/offline -> sent), after
        the answers waiting for the writer (at most SENT_YIELD_MAX). Only while the instruction is
        active: after it ended, 'offline' is final and a late report must not turn it into 'sent';
        the lock keeps finish() from ending it meanwhile. Best effort, as the reports are: what a
        crash loses here stays pending until the device answers or the instruction ends."""
        yield_until = time.monotonic() + SENT_YIELD_MAX
        while (g := self._group) is not None and not g.started and time.monotonic() < yield_until:
            await asyncio.wait([g.result], timeout=yield_until - time.monotonic())  # type: ignore[list-item]
        pending, self._sent = self._sent, {}
        for iid, ids in pending.items():
            if not ids:
                continue
            try:
                await self._written((iid,))
                async with self._finish_lock:
                    if iid in self.ledger:
                        await self.db(store.mark_sent, self.responses, iid, sorted(ids))
            except Exception as e:  # noqa: BLE001 - a progress state: never stop the loop for it
                log.error("could not write the deliveries of instruction %d to %d devices: %s", iid, len(ids),
                          _short(e))

    async def _purge_loop(self) -> None:
        while True:
            try:
                n = await self.db(store.purge_expired, self.responses)
                if n:
                    log.info("purged %d responses past their response TTL", n)
                n = await self.db(held_store.purge_held, self.responses)
                if n:
                    log.info("purged %d held answers past their keeping time", n)
            except Exception:
                log.exception("purge failed; will retry")
            await asyncio.sleep(self._purge_interval)

