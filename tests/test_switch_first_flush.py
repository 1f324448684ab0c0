"""The Switch flushes answers to the Core in the turn of the event loop that made them due (an
answer on an idle link, a full batch), not when the flusher task next runs: with thousands of
devices answering at once, a turn of the loop reads hundreds of answers before any task runs. A
real Switch shell over a real websockets link to a stand-in Core (which records what arrives and
acknowledges on the test's word); the flusher task is *not* started (the test runs one flush where
it says so), so anything else the Core receives went by the immediate path. Hostile devices
(answers for instructions never sent, duplicates, a flood) cannot break it or starve an honest
device."""

from __future__ import annotations

import asyncio

import websockets

from conftest import free_port
from quanta import protocol as p
from quanta.pki import Pki
from quanta.protocol.switch_batches import MAX_BATCH
from quanta.switch.service import Switch


class _Core:
    """Accepts one Switch link; keeps every message it gets; sends what the test asks."""

    def __init__(self) -> None:
        self.got: list[object] = []
        self.ws = None
        self.arrived = asyncio.Event()

    async def handler(self, ws) -> None:  # type: ignore[no-untyped-def]
        self.ws = ws
        async for data in ws:
            self.got.append(p.decode_from_switch(data))
            self.arrived.set()

    def batches(self) -> list[p.ResponseBatch]:
        return [m for m in self.got if isinstance(m, p.ResponseBatch)]

    async def until(self, cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
        async def wait() -> None:
            while not cond():
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(wait(), timeout)


def _answer(iid: int, status: str = "success") -> tuple[p.Response, int]:
    r = p.Response(instruction_id=iid, status=status, columns=["X"], rows=[[1]])
    return r, len(p.encode(r))


async def _linked(pki: Pki) -> tuple[Switch, _Core, asyncio.Task[None], object]:
    core = _Core()
    server = await websockets.serve(core.handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sw = Switch(name="s1", host="localhost", port=free_port(), bind_host="127.0.0.1", pki=pki,
                core_url=f"ws://127.0.0.1:{port}/Core/Switch", secret=b"k" * 32, max_message_bytes=1 << 20)
    link = asyncio.create_task(sw._core_link())  # no _flusher: only the immediate path can send
    await asyncio.wait_for(sw._link_up.wait(), 5)
    await core.until(lambda: any(isinstance(m, p.DevicesOnline) for m in core.got))
    return sw, core, link, server


async def _ack(core: _Core, sw: Switch, batch_id: int) -> None:
    await core.ws.send(p.encode(p.BatchAck(batch_id=batch_id)))  # type: ignore[union-attr]
    await asyncio.wait_for(_until(lambda: batch_id not in sw.batches.unacked()), 5)


async def _until(cond) -> None:  # type: ignore[no-untyped-def]
    while not cond():
        await asyncio.sleep(0.005)


def test_the_first_answer_on_an_idle_link_is_written_in_the_same_turn(pki: Pki) -> None:
    async def run() -> None:
        sw, core, link, server = await _linked(pki)
        sw.on_response("d1", *_answer(7))
        # written to the link's transport before this coroutine yielded once
        assert sw.batches.unacked() == [1] and sw.batches.pending_answers() == 0
        await core.until(lambda: len(core.batches()) == 1)
        assert [(a.device_id, a.response.instruction_id) for a in core.batches()[0].responses] == [("d1", 7)]
        # while batch 1 awaits its ack, the next answers gather (nothing is sent) ...
        sw.on_response("d2", *_answer(7))
        sw.on_response("d3", *_answer(7))
        assert sw.batches.unacked() == [1] and sw.batches.pending_answers() == 2
        # ... and are the flusher's once the ack comes (it gathers what the turn reads meanwhile)
        await _ack(core, sw, 1)
        assert sw._flush_wake.is_set() and sw.batches.pending_answers() == 2
        await sw._flush_once()
        await core.until(lambda: len(core.batches()) == 2)
        assert [a.device_id for a in core.batches()[1].responses] == ["d2", "d3"]
        link.cancel()
        server.close()

    asyncio.run(run())


def test_a_hostile_flood_neither_breaks_the_flush_nor_starves_an_honest_device(pki: Pki) -> None:
    async def run() -> None:
        sw, core, link, server = await _linked(pki)
        sw.on_response("evil", *_answer(999))  # an instruction it was never sent: goes (the Core holds it)
        for _ in range(3):
            sw.on_response("evil", *_answer(999))  # duplicates
        sw.on_response("evil", *_answer(5, "error"))  # an answer to an instruction long finished
        flood = MAX_BATCH * 2 + 10
        for _ in range(flood):
            sw.on_response("evil", *_answer(2**31 - 1))
        sw.on_response("honest", *_answer(7))  # after the flood, while batches await acks
        # full batches went at once (a full batch does not wait), the rest gathers: nothing lost
        await core.until(lambda: len(core.batches()) >= 3)
        for b in list(sw.batches.unacked()):
            await _ack(core, sw, b)
        await sw._flush_once()  # what gathered behind the acks
        await core.until(lambda: sum(len(b.responses) for b in core.batches()) == 5 + flood + 1)
        got = [(a.device_id, a.response.instruction_id) for b in core.batches() for a in b.responses]
        assert got[0] == ("evil", 999) and got[-1] == ("honest", 7)
        assert len(got) == 5 + flood + 1  # each answer exactly once, in order
        assert all(len(b.responses) <= MAX_BATCH for b in core.batches())
        assert sw.batches.pending_answers() == 0
        link.cancel()
        server.close()

    asyncio.run(run())


def test_while_the_flusher_is_sending_the_immediate_path_stands_back(pki: Pki) -> None:
    """Messages keep the order of the flush that cut them: a flush under way (the flusher awaiting
    the link's drain) is never overtaken; the flusher sends what came meanwhile."""
    async def run() -> None:
        sw, core, link, server = await _linked(pki)
        sw._flushing = True
        sw.on_response("d1", *_answer(7))
        assert sw.batches.pending_answers() == 1 and sw.batches.unacked() == []
        assert sw._flush_wake.is_set()  # left to the flusher
        sw._flushing = False
        await sw._flush_once()
        await core.until(lambda: len(core.batches()) == 1)
        link.cancel()
        server.close()

    asyncio.run(run())
