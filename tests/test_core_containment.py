"""The Core's containment of what devices send, on SQLite and PostgreSQL: final counts stay final,
an answer the Core cannot count is *held* (kept, visible, not counted) and its batch is still
acknowledged, and a Switch link answers only for devices whose hello came through it."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import msgspec
import sqlalchemy as sa

from quanta import protocol as p
from quanta.core.service import Core, SwitchLink
from quanta.db import held, store
from test_core_counter import _setup


class Link(SwitchLink):
    """A real SwitchLink whose ``send`` records what the Core sent to the Switch."""

    def __init__(self, name: str = "sw", devices: set[str] | None = None) -> None:
        self.sent: list[Any] = []

        async def send(data: bytes) -> None:
            self.sent.append(p.decode_from_core(data))

        super().__init__(name, "127.0.0.1", 4000, "inc", send, set(devices or ()))

    def acks(self) -> list[int]:
        return [m.batch_id for m in self.sent if isinstance(m, p.BatchAck)]


def _answer(dev: str, iid: int = 7, **kw: Any) -> p.DeviceResponse:
    fields: dict[str, Any] = dict(instruction_id=iid, status="success", columns=["X"], rows=[[1]]) | kw
    return p.DeviceResponse(device_id=dev, response=p.Response(**fields))


async def _core(engine: Any) -> Core:
    core = Core(engine, engine, b"s" * 32)
    await core.start()
    await core.issue(7)
    return core


def test_an_answer_after_the_end_is_held_as_late_and_changes_no_count(db_url: str) -> None:
    engine = _setup(db_url, ["a", "b", "c", "late"])
    store.devices_offline(engine, "sw", ["late"])  # its row starts 'offline'

    async def run() -> None:
        core = await _core(engine)
        link = Link()
        await core.ingest(link, p.ResponseBatch(batch_id=1, responses=[_answer(d) for d in "abc"]))
        await core.finish(7, "gather window closed")
        before = store.state_counts(engine, 7)
        await core.ingest(link, p.ResponseBatch(batch_id=2, responses=[_answer("late", rows=[["after"]])]))
        assert link.acks() == [1, 2]  # acknowledged: the Switch and the agent may forget it
        assert store.state_counts(engine, 7) == before
        await core.stop()

    asyncio.run(run())
    counts = store.state_counts(engine, 7)
    assert counts["success"] == 3 and sum(counts.values()) == 4 and "late" not in counts
    [h] = held.list_held(engine, instruction_id=7)
    assert h["kind"] == "late" and h["device_id"] == "late" and h["response"]["rows"] == [["after"]]
    assert "had already ended (finished)" in h["reason"]
    assert held.held_counts(engine, 7) == {"late": 1}


def test_a_delivery_report_after_the_end_changes_no_count(db_url: str) -> None:
    """A Delivered in flight when the instruction ends must not turn a final 'offline' into 'sent'."""
    engine = _setup(db_url, ["a", "away"])
    store.devices_offline(engine, "sw", ["away"])

    async def run() -> None:
        core = await _core(engine)
        link = Link(devices={"a", "away"})
        await core.ingest(link, p.ResponseBatch(batch_id=1, responses=[_answer("a")]))
        await core.finish(7, "gather window closed")
        before = store.state_counts(engine, 7)
        assert before.get("offline") == 1 or before.get("expired") == 1, before
        await core.handle(link, p.Delivered(instruction_id=7, device_ids=["away"]))
        assert store.state_counts(engine, 7) == before
        await core.stop()

    asyncio.run(run())


def test_an_answer_the_database_refuses_is_held_and_the_batch_goes_on(db_url: str, caplog) -> None:  # type: ignore[no-untyped-def]
    """A value that cannot be stored (here: a msgpack extension value where a cell belongs, built
    past the decoder, which refuses it: whatever the database or the JSON encoder refuses, the Core
    must hold it and go on)."""
    engine = _setup(db_url, ["a", "b", "c"])

    async def run() -> None:
        core = await _core(engine)
        link = Link()
        bad = _answer("b", rows=[[msgspec.msgpack.Ext(1, b"x")]])
        await core.ingest(link, p.ResponseBatch(batch_id=1, responses=[_answer("a"), bad, _answer("c")]))
        assert link.acks() == [1]
        await core.stop()

    asyncio.run(run())
    page = {r["device_id"]: r for r in store.page_results(engine, 7, 0, 10)}
    assert page["a"]["state"] == page["c"]["state"] == "success"
    assert page["b"]["state"] == "error" and "held for administrators" in page["b"]["error"]
    [h] = held.list_held(engine, instruction_id=7, kind="refused")
    assert h["device_id"] == "b" and "the database refused it" in h["reason"]
    assert "storing them one by one" in caplog.text


def test_answers_for_unknown_instructions_and_from_other_links_are_held(db_url: str) -> None:
    engine = _setup(db_url, ["a", "b"])

    async def run() -> None:
        core = await _core(engine)
        dmz = Link("dmz-switch")  # "a" and "b" said hello through "sw", never through this link
        await core.ingest(dmz, p.ResponseBatch(batch_id=1, responses=[_answer("a")]))
        sw = Link()
        await core.ingest(sw, p.ResponseBatch(batch_id=1, responses=[_answer("b", iid=p.MAX_ID)]))
        assert dmz.acks() == [1] and sw.acks() == [1]
        await core.stop()

    asyncio.run(run())
    assert store.state_counts(engine, 7) == {"pending": 2}
    reasons = sorted(h["reason"] for h in held.list_held(engine, kind="refused"))
    assert reasons == [f"device 'a' is not connected through switch 'dmz-switch'",
                       f"instruction {p.MAX_ID} is unknown"]


def test_online_ack_names_what_each_device_already_answered(db_url: str) -> None:
    engine = _setup(db_url, ["a", "b"])
    info = lambda d: p.DeviceInfo(device_id=d, fqdn=d, os="Linux", agent_version="1")  # noqa: E731

    async def run() -> None:
        core = await _core(engine)
        link = Link()
        await core.ingest(link, p.ResponseBatch(batch_id=1, responses=[_answer("a")]))
        await core.handle(link, p.DevicesOnline(devices=[info("a"), info("b")], seq=5))
        [ack] = [m for m in link.sent if isinstance(m, p.OnlineAck)]
        assert ack.seq == 5 and ack.answered == {"a": [7]}
        assert {"a", "b"} <= link.devices
        await core.handle(link, p.DevicesOnline(devices=[info("b")]))  # seq 0: no acknowledgement wanted
        assert sum(isinstance(m, p.OnlineAck) for m in link.sent) == 1
        await core.stop()

    asyncio.run(run())


def test_held_answers_are_purged_after_their_keeping_time(db_url: str) -> None:
    engine = _setup(db_url, ["a"])
    resp = p.Response(instruction_id=7, status="success")
    held.hold(engine, [dict(kind="late", instruction_id=7, device_id="a", switch="sw", state="success",
                            reason="r", response=resp)], now=time.time() - held.HOLD_SECONDS - 10)
    assert held.held_counts(engine, 7) == {"late": 1}
    assert held.purge_held(engine) == 1 and held.held_counts(engine, 7) == {}


async def _while_the_writer_is_busy(core: Core, batches: list[tuple[Link, p.ResponseBatch]]) -> None:
    """Ingest ``batches`` concurrently while the Core's writer thread is held busy, and release it
    only once every batch has joined the queued write; then wait for them all."""
    gate = threading.Event()
    busy = core._db.submit(gate.wait, 10)  # the writer thread is in another job meanwhile
    tasks = [asyncio.create_task(core.ingest(link, b)) for link, b in batches]
    deadline = time.monotonic() + 10
    while core._group is None or len(core._group.batches) < len(batches):
        assert time.monotonic() < deadline, "the batches never joined one queued write"
        assert not any(t.done() for t in tasks), [t for t in tasks if t.done()]
        await asyncio.sleep(0.005)
    gate.set()
    await asyncio.gather(*tasks)
    assert busy.result() is True


def test_batches_arriving_while_the_writer_is_busy_are_committed_in_one_transaction(db_url: str) -> None:
    """Group commit: the three Switches' batches that wait for the writer are written in one
    transaction, each is acknowledged, and the counts (all given to the group's first batch) still
    end the instruction exactly when its last device answers."""
    devices = ["a", "b", "c", "d", "e", "f", "last"]
    engine = _setup(db_url, devices)
    commits: list[float] = []
    sa.event.listen(engine, "commit", lambda _conn: commits.append(time.monotonic()))

    async def run() -> None:
        core = await _core(engine)
        links = [Link(f"sw-{k}", devices=set(devices)) for k in range(3)]
        commits.clear()
        await _while_the_writer_is_busy(core, [
            (links[0], p.ResponseBatch(batch_id=1, responses=[_answer("a"), _answer("b")])),
            (links[1], p.ResponseBatch(batch_id=1, responses=[_answer("d"), _answer("c"), _answer("a", rows=[[2]])])),
            (links[2], p.ResponseBatch(batch_id=9, responses=[_answer("f"), _answer("e")]))])
        assert len(commits) == 1, commits  # one transaction for the three batches
        assert [lk.acks() for lk in links] == [[1], [1], [9]]
        assert 7 in core.active  # "last" has not answered
        await core.ingest(links[0], p.ResponseBatch(batch_id=2, responses=[_answer("last")]))
        assert 7 not in core.active  # every targeted device answered: it ended, no sooner and no later
        await core.stop()

    asyncio.run(run())
    assert store.state_counts(engine, 7) == {"success": len(devices)}
    rows = {r["device_id"]: r["rows"] for r in store.page_results(engine, 7, 0, 10)}
    assert rows["a"] == [[1]]  # of two answers of one device, the first to arrive is kept


def test_a_refused_answer_in_a_group_costs_only_its_own_batch(db_url: str, caplog) -> None:  # type: ignore[no-untyped-def]
    engine = _setup(db_url, ["a", "b", "c", "d"])

    async def run() -> None:
        core = await _core(engine)
        links = [Link(f"sw-{k}", devices={"a", "b", "c", "d"}) for k in range(2)]
        bad = _answer("c", rows=[[msgspec.msgpack.Ext(1, b"x")]])
        await _while_the_writer_is_busy(core, [
            (links[0], p.ResponseBatch(batch_id=1, responses=[_answer("a"), _answer("b")])),
            (links[1], p.ResponseBatch(batch_id=4, responses=[bad, _answer("d")]))])
        assert [lk.acks() for lk in links] == [[1], [4]]
        await core.stop()

    asyncio.run(run())
    states = {r["device_id"]: r["state"] for r in store.page_results(engine, 7, 0, 10)}
    assert states == {"a": "success", "b": "success", "c": "error", "d": "success"}
    [h] = held.list_held(engine, instruction_id=7, kind="refused")
    assert h["device_id"] == "c" and h["switch"] == "sw-1" and "the database refused it" in h["reason"]
    assert "refused a group of 2 batches" in caplog.text
    assert caplog.text.count("storing them one by one") == 1  # only the bad answer's batch took the slow path
