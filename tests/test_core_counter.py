"""The Core's in-memory count of unanswered targets per active instruction: set at issue,
lowered by each committed batch (duplicates do not count), recomputed from the database after a
Core restart, and an instruction finishes exactly when its last target answers."""

from __future__ import annotations

import asyncio
import time

from quanta import protocol as p
from quanta.core.service import Core
from quanta.db import make_engine, migrate, store, tables


def _setup(db_url: str, devices: list[str]):  # type: ignore[no-untyped-def]
    migrate(db_url, "master")
    migrate(db_url, "responses")
    e = make_engine(db_url)
    now = time.time()
    with e.begin() as c:
        for d in devices:
            c.execute(tables.devices.insert().values(device_id=d, cert_serial=f"s-{d}", tags={}, online=True, switch="sw",
                                                     first_seen=now))
        c.execute(tables.instructions.insert().values(
            id=7, name="q", kind="question", payload="@x = Device.GetSummary();", parameters={}, scope=devices,
            created_by="t", created_at=now, expires_at=now + 600, response_expires_at=now + 3600,
            status="created", body=b"body", signature=b"sig"))
    return e


class _Link:  # a Switch link whose devices said hello through switch "sw" (see _setup)
    name = "sw"

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.devices: set[str] = set()  # announced on this link: none (the database knows their Switch)

    async def send(self, data: bytes) -> None:
        self.sent.append(data)


def _batch(bid: int, devs: list[str]) -> p.ResponseBatch:
    return p.ResponseBatch(batch_id=bid, responses=[
        p.DeviceResponse(device_id=d, response=p.Response(instruction_id=7, status="success", columns=["X"],
                                                          rows=[[1]])) for d in devs])


def test_unanswered_counter_survives_a_core_restart(db_url: str) -> None:
    devs = [f"d{i}" for i in range(10)]
    engine = _setup(db_url, devs)

    async def first_life() -> None:
        core = Core(engine, engine, b"s" * 32)
        await core.start()
        assert (await core.issue(7))["targeted"] == 10
        assert core.ledger.unanswered(7) == 10
        link = _Link()
        await core.ingest(link, _batch(1, devs[:4]))
        await core.ingest(link, _batch(2, devs[2:6]))  # d2, d3 again: duplicates count once
        assert core.ledger.unanswered(7) == 4 and 7 in core.active
        assert len(link.sent) == 2  # every batch acknowledged
        await core.stop()

    async def second_life() -> None:
        core = Core(engine, engine, b"s" * 32)
        await core.start()  # the count comes back from the database
        assert 7 in core.active and core.ledger.unanswered(7) == 4
        link = _Link()
        await core.ingest(link, _batch(3, devs[6:9]))
        assert core.ledger.unanswered(7) == 1 and 7 in core.active
        await core.ingest(link, _batch(4, devs[9:]))
        assert 7 not in core.active and core.ledger.unanswered(7) is None
        await core.stop()

    asyncio.run(first_life())
    asyncio.run(second_life())
    assert store.state_counts(engine, 7) == {"success": 10}
    assert store.get_instruction(engine, 7)["status"] == "finished"


def test_a_wrong_count_never_finishes_early(db_url: str) -> None:
    """If the counter says 0 but the database still has open rows, the database wins."""
    devs = ["a", "b", "c"]
    engine = _setup(db_url, devs)

    async def run() -> None:
        core = await _issued_core(engine)
        core.ledger._open[7].unanswered = 1  # corrupt the hint
        await core.ingest(_Link(), _batch(1, ["a"]))
        assert 7 in core.active and core.ledger.unanswered(7) == 2
        await core.ingest(_Link(), _batch(2, ["b", "c"]))
        assert 7 not in core.active
        await core.stop()

    asyncio.run(run())


def test_wait_returns_the_moment_the_instruction_ends(db_url: str) -> None:
    """Core.wait (the Consumer API's long poll): times out while answers are missing, returns as
    soon as the last one is committed (the status already final in the database), and returns at
    once for an instruction that is not active; a cancel ends a wait too."""
    devs = ["a", "b"]
    engine = _setup(db_url, devs)

    async def run() -> None:
        core = await _issued_core(engine)
        t = time.monotonic()
        assert await core.wait(7, 0.2) is False  # nobody answered: the whole timeout
        assert time.monotonic() - t >= 0.19
        waiter = asyncio.create_task(core.wait(7, 30))
        await core.ingest(_Link(), _batch(1, ["a"]))
        await asyncio.sleep(0.05)
        assert not waiter.done()  # one answer missing
        await core.ingest(_Link(), _batch(2, ["b"]))  # the last answer: committed, status final
        t = time.monotonic()  # from the commit, not before it (the commit's own time varies with load)
        assert await asyncio.wait_for(waiter, 5) is True
        assert time.monotonic() - t < 0.5
        assert store.get_instruction(engine, 7)["status"] == "finished"
        assert await core.wait(7, 30) is True  # not active: at once
        assert await core.wait(12345, 30) is True  # unknown here: at once
        assert core._ended == {}  # nothing left behind
        await core.stop()

    asyncio.run(run())


def test_cancel_ends_a_wait_with_status_cancelled(db_url: str) -> None:
    engine = _setup(db_url, ["a", "b"])

    async def run() -> None:
        core = await _issued_core(engine)
        waiter = asyncio.create_task(core.wait(7, 30))
        await asyncio.sleep(0.05)
        assert await core.cancel(7) is True
        assert await asyncio.wait_for(waiter, 5) is True
        # the waiter's next look finds the final status, never an intermediate 'finished'
        assert store.get_instruction(engine, 7)["status"] == "cancelled"
        assert store.state_counts(engine, 7) == {"expired": 2}
        assert await core.cancel(7) is False  # already ended
        await core.stop()

    asyncio.run(run())



async def _issued_core(engine):  # type: ignore[no-untyped-def]
    """A started Core (no Switches to poke) with instruction 7 issued."""
    core = Core(engine, engine, b"s" * 32)
    await core.start()
    await core.issue(7)
    return core
