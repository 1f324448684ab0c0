"""The Core's issue path: a question is handed to the Switches over their open links before its
target rows are written (nothing per device before the first send), an action only after; answers
that overtake the write wait for it and are all counted; a cancel or a second issue racing the
write is handled; a Switch whose link cannot take the push is poked on its poke port."""

from __future__ import annotations

import asyncio
import socket

from quanta import protocol as p
from quanta.core.service import Core, SwitchLink
from quanta.db import store, tables
from quanta.internal import poke_key

from test_core_counter import _batch, _setup

SECRET = b"s" * 32
DEVS = [f"d{i}" for i in range(20)]


def _kind(engine, kind: str) -> None:  # type: ignore[no-untyped-def]
    with engine.begin() as c:
        c.execute(tables.instructions.update().where(tables.instructions.c.id == 7).values(kind=kind))


class _Switch:
    """A linked Switch: records what the Core sends; ``on_work`` runs (synchronously) when a Work
    arrives, so a test can look at the databases at the moment of the first send."""

    def __init__(self, core: Core, on_work=None) -> None:  # type: ignore[no-untyped-def]
        self.msgs: list[object] = []
        self.on_work = on_work
        self.link = SwitchLink("sw", "127.0.0.1", 1, "inc-1", self.send)
        core.switches["sw"] = self.link

    async def send(self, data: bytes) -> None:
        msg = p.decode_from_core(data)
        self.msgs.append(msg)
        if isinstance(msg, p.Work) and msg.items and self.on_work is not None:
            self.on_work(msg)

    def of(self, kind: type) -> list:  # type: ignore[type-arg]
        return [m for m in self.msgs if isinstance(m, kind)]


def test_a_question_goes_out_before_its_target_rows_and_answers_overtaking_them_all_count(db_url: str) -> None:
    engine = _setup(db_url, DEVS)
    seen: dict[str, object] = {}

    async def run() -> None:
        core = Core(engine, engine, SECRET)
        await core.start()
        answers: list[asyncio.Task[None]] = []

        def on_work(work: p.Work) -> None:
            seen["rows_at_send"] = store.state_counts(engine, 7)
            seen["status_at_send"] = store.get_instruction(engine, 7)["status"]
            seen["items"] = [i.id for i in work.items]
            # every device answers at once, while the Core is still writing the target rows
            answers.append(asyncio.create_task(core.ingest(sw.link, _batch(1, DEVS))))

        sw = _Switch(core, on_work)
        got = await core.issue(7)
        assert got == {"id": 7, "status": "active", "targeted": 20}
        await asyncio.gather(*answers)
        assert await core.wait(7, 10) is True
        assert sw.of(p.BatchAck) == [p.BatchAck(batch_id=1)]
        await core.stop()

    asyncio.run(run())
    assert seen["rows_at_send"] == {} and seen["status_at_send"] == "created"  # nothing written before the send
    assert seen["items"] == [7]
    assert store.state_counts(engine, 7) == {"success": 20}  # not one answer lost
    row = store.get_instruction(engine, 7)
    assert row["status"] == "finished" and row["targeted"] == 20


def test_a_question_goes_out_before_its_targets_are_even_read(db_url: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    engine = _setup(db_url, DEVS)
    order: list[str] = []
    real = store.target_devices

    def target_devices(*args):  # type: ignore[no-untyped-def] - the real read, its moment noted
        order.append("targets read")
        return real(*args)

    monkeypatch.setattr(store, "target_devices", target_devices)

    async def run() -> None:
        core = Core(engine, engine, SECRET)
        await core.start()
        sw = _Switch(core, lambda _w: order.append("work sent"))
        assert await core.issue(7) == {"id": 7, "status": "active", "targeted": 20}
        assert core.ledger.unanswered(7) == 20  # the hint from the targets, once read
        await core.ingest(sw.link, _batch(1, DEVS[:5]))
        assert core.ledger.unanswered(7) == 15
        await core.stop()

    asyncio.run(run())
    assert order == ["work sent", "targets read"]


def test_a_question_with_no_device_in_scope_goes_out_and_ends_at_once(db_url: str) -> None:
    engine = _setup(db_url, DEVS)
    with engine.begin() as c:  # names no enrolled device: nothing to target
        c.execute(tables.instructions.update().where(tables.instructions.c.id == 7).values(scope=["nobody"]))

    async def run() -> None:
        core = Core(engine, engine, SECRET)
        await core.start()
        sw = _Switch(core)
        assert await core.issue(7) == {"id": 7, "status": "active", "targeted": 0}
        assert 7 not in core.active
        assert [type(m) for m in sw.msgs] == [p.Work, p.Cancel]  # handed out, then called back
        await core.stop()

    asyncio.run(run())
    row = store.get_instruction(engine, 7)
    assert row["status"] == "finished" and row["targeted"] == 0
    assert store.state_counts(engine, 7) == {}


def test_an_action_is_written_and_active_before_it_is_handed_out(db_url: str) -> None:
    engine = _setup(db_url, DEVS)
    _kind(engine, "action")
    seen: dict[str, object] = {}

    async def run() -> None:
        core = Core(engine, engine, SECRET)
        await core.start()

        def on_work(_: p.Work) -> None:
            seen["rows_at_send"] = store.state_counts(engine, 7)
            seen["status_at_send"] = store.get_instruction(engine, 7)["status"]

        _Switch(core, on_work)
        assert (await core.issue(7))["status"] == "active"
        await core.stop()

    asyncio.run(run())
    assert seen == {"rows_at_send": {"pending": 20}, "status_at_send": "active"}


def test_a_cancel_racing_the_write_calls_the_question_back_and_its_answers_are_held(db_url: str) -> None:
    engine = _setup(db_url, DEVS)

    async def run() -> None:
        core = Core(engine, engine, SECRET)
        await core.start()
        answers: list[asyncio.Task[None]] = []

        def on_work(_: p.Work) -> None:  # the Consumer API's cancel lands between the send and the write
            with engine.begin() as c:
                c.execute(tables.instructions.update().where(tables.instructions.c.id == 7,
                                                             tables.instructions.c.status == "created")
                          .values(status="cancelled"))
            answers.append(asyncio.create_task(core.ingest(sw.link, _batch(1, DEVS[:5]))))

        sw = _Switch(core, on_work)
        got = await core.issue(7)
        await asyncio.gather(*answers)
        assert got == {"id": 7, "status": "cancelled", "targeted": 0}
        assert 7 not in core.active
        assert sw.of(p.Cancel) == [p.Cancel(instruction_ids=[7])]  # the Switches drop it
        assert sw.of(p.BatchAck) == [p.BatchAck(batch_id=1)]  # the answers are kept (held), then acknowledged
        await core.stop()

    asyncio.run(run())
    assert store.get_instruction(engine, 7)["status"] == "cancelled"
    assert store.state_counts(engine, 7) == {"expired": 20}  # none counted
    from quanta.db import held

    assert {(h["device_id"], h["kind"]) for h in held.list_held(engine, instruction_id=7)} == {(d, "late") for d in DEVS[:5]}


def test_a_second_issue_during_the_write_waits_for_it_and_changes_nothing(db_url: str) -> None:
    engine = _setup(db_url, DEVS)

    async def run() -> None:
        core = Core(engine, engine, SECRET)
        await core.start()
        sw = _Switch(core)
        first, second = await asyncio.gather(core.issue(7), core.issue(7))
        assert first == second == {"id": 7, "status": "active", "targeted": 20}
        assert len(sw.of(p.Work)) == 1 and sw.of(p.Cancel) == []
        await core.stop()

    asyncio.run(run())
    assert store.state_counts(engine, 7) == {"pending": 20}


def test_a_switch_whose_link_refuses_the_push_is_poked(db_url: str) -> None:
    engine = _setup(db_url, DEVS)
    # a listener on the poke port (the Switch port + 1) of a Switch whose link is broken
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    poke_port = listener.getsockname()[1]

    async def broken(_: bytes) -> None:
        raise ConnectionResetError("link gone")

    async def run() -> bytes:
        core = Core(engine, engine, SECRET)
        await core.start()
        core.switches["sw"] = SwitchLink("sw", "127.0.0.1", poke_port - 1, "inc-1", broken)
        loop = asyncio.get_running_loop()
        accepted = loop.run_in_executor(None, listener.accept)
        assert (await core.issue(7))["status"] == "active"
        conn, _ = await asyncio.wait_for(accepted, 10)
        with conn:
            data = await loop.run_in_executor(None, conn.recv, 4096)
        await core.stop()
        return data

    try:
        data = asyncio.run(run())
    finally:
        listener.close()
    assert p.check_poke(poke_key(SECRET), data)  # made with the poke hop's key
