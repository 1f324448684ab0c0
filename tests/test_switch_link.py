"""The Switch's link to the Core: dialled again with exponential back-off, jitter and a cap
(tenacity), and its failures logged once per interval with a count, not once per attempt; what a
broken Core sends ends the link (not the Switch) with its reason."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from conftest import free_port
from quanta import protocol as p
from quanta.pki import Pki
from quanta.switch import service
from quanta.switch.service import LINK_RETRY_JITTER, LINK_RETRY_MIN, Switch


def _switch(pki: Pki, core_port: int, max_message_bytes: int) -> Switch:
    """A Switch (never served) whose Core link dials 127.0.0.1:core_port."""
    return Switch(name="s1", host="localhost", port=free_port(), bind_host="127.0.0.1", pki=pki,
                  core_url=f"ws://127.0.0.1:{core_port}/Core/switch", secret=b"k" * 32,
                  max_message_bytes=max_message_bytes)


async def _dial_times(pki: Pki, seconds: float) -> tuple[list[float], Switch]:
    """Run a Switch's core link for ``seconds`` against a port that accepts each connection and
    closes it at once (a Core that is not there, or not itself); when each attempt came."""
    times: list[float] = []

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        times.append(time.monotonic())
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sw = _switch(pki, port, 1 << 20)
    task = asyncio.create_task(sw._core_link())
    await asyncio.sleep(seconds)
    task.cancel()
    server.close()
    sw.link_failures.close()
    return times, sw


def test_the_core_link_backs_off_exponentially_with_jitter_and_logs_once(pki: Pki,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "quanta.switch")
    times, sw = asyncio.run(_dial_times(pki, 3.5))
    gaps = [b - a for a, b in zip(times, times[1:])]
    # 0.2, 0.4, 0.8, 1.6 s apart (each plus up to LINK_RETRY_JITTER): 4 or 5 attempts in 3.5 s
    assert 3 <= len(times) <= 6, gaps
    for i, gap in enumerate(gaps):
        want = LINK_RETRY_MIN * 2 ** i
        assert want * 0.9 <= gap <= want + LINK_RETRY_JITTER + 0.5, (i, gaps)
    assert sw._link_failed == len(times)
    lines = [r.getMessage() for r in caplog.records if "core link down" in r.getMessage()]
    assert len(lines) == 1, lines  # the rest are counted, for the next line of the interval
    assert "retrying in" in lines[0] and "attempt 1" in lines[0], lines


def test_the_core_link_back_off_is_capped(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "LINK_RETRY_MAX", 0.3)
    times, _ = asyncio.run(_dial_times(pki, 3.0))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) >= 6, gaps  # uncapped, 3 s would hold 4 attempts
    assert all(g <= 0.3 + LINK_RETRY_JITTER + 0.3 for g in gaps[2:]), gaps
    assert len({round(g, 3) for g in gaps[2:]}) > 1, gaps  # jittered: not one fixed delay


async def _link_against(pki: Pki, behave, prepare=lambda sw: None) -> tuple[BaseException, list[bytes]]:
    """Run one Switch core link (CoreLink over a real socket) against a websockets server that
    reads the Switch's first message and then does ``behave(ws)``; what the link raised, and what
    the server received."""
    from websockets.asyncio.server import serve

    got: list[bytes] = []

    async def handler(ws) -> None:  # type: ignore[no-untyped-def]
        got.append(await ws.recv())
        await behave(ws)
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        sw = _switch(pki, port, 1 << 16)
        prepare(sw)
        with pytest.raises(BaseException) as caught:
            await asyncio.wait_for(sw._link_once(), 10)
        assert sw._link is None and not sw._link_up.is_set()  # nothing sends into the dead link
        sw.link_failures.close()
    return caught.value, got


@pytest.mark.parametrize("behave, want", [
    (lambda ws: ws.send("hello"), "text frame from core"),
    (lambda ws: ws.send(b"\xc1garbage"), "malformed message"),
    (lambda ws: ws.send([b"frag", b"ment"]), "fragmented message from core"),
    (lambda ws: ws.close(4000, "go away"), "closed by the core (4000: go away)"),
    (lambda ws: ws.send(b"x" * (4 * (1 << 16) + 1)), "exceeding max allowed size"),
], ids=["text", "garbage", "fragmented", "close", "oversized"])
def test_a_core_that_breaks_the_protocol_ends_only_the_link_with_its_reason(pki: Pki, behave, want: str) -> None:
    """What a broken or hostile Core sends ends the link with a reason the back-off logs (one of
    LINK_DOWN, so the Switch dials again), never the Switch; the Switch's hello went first."""
    error, got = asyncio.run(_link_against(pki, behave))
    assert isinstance(error, service.LINK_DOWN), repr(error)
    assert want in str(error), repr(error)
    assert p.decode_from_switch(got[0]).__class__ is p.SwitchHello


def test_a_bug_in_handling_a_core_message_ends_the_link_as_a_bug(pki: Pki) -> None:
    """An exception in the Switch's own handling of a good message is not a link outage: it ends
    the link with that exception (not one of LINK_DOWN), which the back-off logs with its traceback."""
    def prepare(sw: Switch) -> None:
        def broken(ack: p.BatchAck) -> None:
            raise RuntimeError("handler bug")
        sw.on_batch_ack = broken  # type: ignore[method-assign]

    error, _ = asyncio.run(_link_against(pki, lambda ws: ws.send(p.encode(p.BatchAck(batch_id=1))), prepare))
    assert isinstance(error, RuntimeError) and not isinstance(error, service.LINK_DOWN), repr(error)


def test_a_core_that_accepts_and_never_answers_times_out_the_dial(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """TCP accepted, then silence (no upgrade answer): the dial gives up after LINK_OPEN."""
    monkeypatch.setattr(service, "LINK_OPEN", 0.5)
    held: list[asyncio.StreamWriter] = []

    async def run() -> float:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sw = _switch(pki, port, 1 << 16)
        t = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await sw._link_once()
        took = time.monotonic() - t
        for w in held:
            w.close()
        server.close()
        sw.link_failures.close()
        return took

    took = asyncio.run(run())
    assert 0.4 <= took < 5, took


