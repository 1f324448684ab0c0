"""Switch liveness without a timer per connection: one sweep pings the quiet connections and
closes the ones that stay silent. And the Switch's lean TLS engine still applies a CRL written
after it started, at the handshake."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from picows import WSListener, WSMsgType, ws_connect

from conftest import free_port
from quanta import protocol as p
from quanta.pki import Pki, load_cert
from quanta.protocol.switch_batches import SendBatch
from quanta.switch.service import ACK_SLICE, DELIVERED_HOLD, FLUSH_INTERVAL, STALE_TICKS, Switch


class Agent(WSListener):
    def __init__(self) -> None:
        self.frames: list[WSMsgType] = []
        self.closed = asyncio.Event()

    def on_ws_frame(self, transport, frame) -> None:  # type: ignore[no-untyped-def]
        self.frames.append(frame.msg_type)

    def on_ws_disconnected(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.closed.set()


def _ctx(pki: Pki, tmp: Path, name: str) -> ssl.SSLContext:
    if not (tmp / f"{name}.crt").exists():
        pki.issue(name, tmp / f"{name}.crt", tmp / f"{name}.key")
    ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
    ctx.load_cert_chain(tmp / f"{name}.crt", tmp / f"{name}.key")
    return ctx


async def _connect(pki: Pki, tmp: Path, port: int, name: str, *, answers_pings: bool) -> tuple[object, Agent]:
    transport, agent = await ws_connect(Agent, f"wss://localhost:{port}/agent", ssl_context=_ctx(pki, tmp, name),
                                        enable_auto_pong=answers_pings, use_aiofastnet=False)
    transport.send(WSMsgType.BINARY, p.encode(p.Hello(device_id=name, fqdn=name, os="Linux", agent_version="t")))
    return transport, agent  # type: ignore[return-value]


def _switch(pki: Pki, port: int) -> Switch:
    """A Switch whose Core link points at a closed port (it would keep retrying it)."""
    return Switch(name="s1", host="localhost", port=port, bind_host="127.0.0.1", pki=pki,
                  core_url=f"ws://127.0.0.1:{free_port()}/Core/switch", secret=b"k" * 32, max_message_bytes=1 << 20)


@contextlib.asynccontextmanager
async def _running_switch(pki: Pki, port: int) -> AsyncIterator[Switch]:
    """A Switch serving on ``port`` until the block ends; these tests do not need its Core link."""
    sw = _switch(pki, port)
    stop = asyncio.Event()
    task = asyncio.create_task(sw.serve(stop))
    for _ in range(100):
        await asyncio.sleep(0.05)
        if sw._tls is not None:
            break
    await asyncio.sleep(0.2)
    try:
        yield sw
    finally:
        stop.set()
        await task


def test_sweep_pings_quiet_connections_and_closes_silent_ones(pki: Pki, tmp_path: Path) -> None:
    async def main() -> None:
        port = free_port()
        async with _running_switch(pki, port) as sw:
            _, live = await _connect(pki, tmp_path, port, "live", answers_pings=True)
            _, dead = await _connect(pki, tmp_path, port, "dead", answers_pings=False)
            for _ in range(100):
                if {"live", "dead"} <= set(sw.conns):
                    break
                await asyncio.sleep(0.05)
            assert {"live", "dead"} <= set(sw.conns)
            sw.sweep()  # one tick: everyone has been heard from within it, no ping yet
            await asyncio.sleep(0.3)
            assert WSMsgType.PING not in live.frames and WSMsgType.PING not in dead.frames
            for _ in range(STALE_TICKS):
                sw.sweep()
                await asyncio.sleep(0.3)  # the live agent's pong arrives before the next sweep
            assert dead.frames.count(WSMsgType.PING) >= 2  # pinged, did not answer, pinged again, closed
            # (the live agent's picows answers pings itself and does not show them to its listener)
            await asyncio.wait_for(dead.closed.wait(), 5)
            assert "dead" not in sw.conns
            assert "live" in sw.conns and not live.closed.is_set()

    asyncio.run(main())


def test_crl_written_after_start_refuses_the_handshake(pki: Pki, tmp_path: Path) -> None:
    async def main() -> None:
        port = free_port()
        async with _running_switch(pki, port) as sw:
            transport, _ = await _connect(pki, tmp_path, port, "dev1", answers_pings=True)
            transport.disconnect()
            pki.revoke(load_cert(tmp_path / "dev1.crt").serial_number, "dev1")
            sw.reload_crl()  # what the CRL watcher does within a second
            with pytest.raises(ssl.SSLError, match="CERTIFICATE_REVOKED"):
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=_ctx(pki, tmp_path, "dev1"),
                                                     server_hostname="localhost")
                w.write(b"GET /agent HTTP/1.1\r\nHost: localhost\r\n\r\n")
                await asyncio.wait_for(r.read(100), 5)  # TLS 1.3: the refusal arrives after the client's Finished

    asyncio.run(main())


def test_tls_session_resumes_across_a_switch_restart_and_revocation_still_applies(pki: Pki, tmp_path: Path) -> None:
    """A restarted Switch (a new process in production: here a new Switch and a new TLS context)
    accepts the ticket its predecessor issued, and a resumed session of a revoked device is closed."""
    from quanta.signing import ResumingContext, client_context

    async def one_switch(port: int, ctx: ResumingContext, name: str) -> tuple[bool, Agent]:
        async with _running_switch(pki, port) as sw:
            assert sw._tickets is not None and sw._tickets.shared
            transport, agent = await ws_connect(Agent, f"wss://localhost:{port}/agent", ssl_context=ctx,
                                                use_aiofastnet=False)
            transport.send(WSMsgType.BINARY,
                           p.encode(p.Hello(device_id=name, fqdn=name, os="Linux", agent_version="t")))
            for _ in range(100):  # the Welcome, after which the TLS 1.3 ticket has arrived too
                if agent.frames or agent.closed.is_set():
                    break
                await asyncio.sleep(0.05)
            ssl_obj = transport.underlying_transport.get_extra_info("ssl_object")
            ctx.session = ssl_obj.session
            await asyncio.sleep(0.2)
            return ssl_obj.session_reused, agent

    async def main() -> None:
        _ctx(pki, tmp_path, "dev1")
        ctx = client_context(pki.ca_crt, tmp_path / "dev1.crt", tmp_path / "dev1.key", resuming=True)
        assert isinstance(ctx, ResumingContext)
        port = free_port()
        reused, agent = await one_switch(port, ctx, "dev1")
        assert not reused and agent.frames == [WSMsgType.BINARY]  # full handshake, welcomed
        reused, agent = await one_switch(port, ctx, "dev1")
        assert reused and agent.frames == [WSMsgType.BINARY]  # resumed at the restarted Switch, welcomed
        pki.revoke(load_cert(tmp_path / "dev1.crt").serial_number, "dev1")
        reused, agent = await one_switch(port, ctx, "dev1")
        assert reused  # the ticket is still good for TLS...
        assert agent.frames == [WSMsgType.CLOSE] and agent.closed.is_set()  # ...but the revoked device is closed, not welcomed

    asyncio.run(main())


def test_ticket_keys_are_shared_and_rotate(tmp_path: Path) -> None:
    from quanta.switch.tls import TICKET_PERIOD, TicketKeys, load_ticket_secret, ticket_keys

    secret = load_ticket_secret(tmp_path / "ticket.secret")
    assert len(secret) == 32 and (tmp_path / "ticket.secret").stat().st_mode & 0o777 == 0o600
    assert load_ticket_secret(tmp_path / "ticket.secret") == secret  # the second Switch reads the first's
    assert ticket_keys(secret, 7) == ticket_keys(secret, 7) and len(ticket_keys(secret, 7)) == 80
    assert ticket_keys(secret, 7) != ticket_keys(secret, 8)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    keys = TicketKeys(ctx, tmp_path / "ticket.secret")
    keys.refresh(now=7 * TICKET_PERIOD)
    assert keys.shared and keys.period == 7
    keys.refresh(now=8 * TICKET_PERIOD + 1)
    assert keys.period == 8
    (tmp_path / "bad.secret").write_bytes(b"short")
    with pytest.raises(ValueError, match="32 bytes"):
        load_ticket_secret(tmp_path / "bad.secret")


class _CoreLink:
    """Stands in for the Switch's CoreLink in these unit tests of the flusher (no Core is served):
    the same interface, recording what the Switch sends; never paused."""

    def __init__(self) -> None:
        self.batches: list[p.ResponseBatch] = []
        self.sent: list[object] = []

    def writable(self) -> bool:
        return True

    async def drained(self) -> None:
        return None

    def send(self, data: bytes) -> None:
        msg = p.decode_from_switch(data)
        self.sent.append(msg)
        if isinstance(msg, p.ResponseBatch):
            self.batches.append(msg)


class _Device:
    """Stands in for an agent's connection: records the messages the Switch sends it."""

    def __init__(self, log: list[tuple[str, object]], name: str) -> None:
        self.log = log
        self.name = name

    def send(self, data: bytes) -> None:
        self.log.append((self.name, p.decode_from_switch_for_agent(data)))


def test_answers_go_at_once_on_an_idle_link_and_gather_while_a_batch_is_unacknowledged(pki: Pki) -> None:
    """No timer wait for the first or last answers of a question; under load, batches grow while
    the Core commits the one in flight. Every answer is sent exactly once, in order."""
    sw = _switch(pki, 1)  # never served: its Core link is the stand-in below
    link = _CoreLink()
    sw._link = link
    sw.batches.link_up()

    def answer(dev: str) -> None:
        sw.on_response(dev, p.Response(instruction_id=1, status="success", columns=["X"], rows=[[1]]), 40)

    async def run() -> None:
        answer("a")
        assert sw._flush_wake.is_set()  # nothing awaits an ack: flush now
        sw._flush_wake.clear()
        await sw._flush_once()
        assert [len(b.responses) for b in link.batches] == [1]
        for dev in ("b", "c", "d"):
            answer(dev)
        # batch 1 unacknowledged: gather until its ack, with no timer (nothing for the flusher)
        assert sw.batches.flush_at() is None and not sw._flush_wake.is_set()
        sw.on_batch_ack(p.BatchAck(batch_id=999))  # an unknown ack changes nothing
        assert not sw._flush_wake.is_set()
        sw.on_batch_ack(p.BatchAck(batch_id=link.batches[0].batch_id))
        assert sw._flush_wake.is_set()  # acknowledged with answers waiting: flush now
        sw._flush_wake.clear()
        await sw._flush_once()
        assert [[r.device_id for r in b.responses] for b in link.batches] == [["a"], ["b", "c", "d"]]
        sw.on_batch_ack(p.BatchAck(batch_id=link.batches[1].batch_id))
        assert not sw._flush_wake.is_set()  # nothing waiting: no empty flush
        assert sw.batches.unacked() == []

    asyncio.run(run())


def _committed(sw: Switch, devices: list[str], instruction_id: int) -> None:
    """These devices' answers to one instruction, batched and committed by the Core, a while ago
    (answers have paused: their acknowledgements are due)."""
    then = time.monotonic() - 10
    for d in devices:
        sw.batches.answered(d, p.Response(instruction_id=instruction_id, status="success"), 10, then)
    for e in sw.batches.flush(then):
        assert isinstance(e, SendBatch)
        assert sw.batches.batch_acked(e.batch.batch_id, then) is False
    sw.on_batch_ack(p.BatchAck(batch_id=-1))  # (an unknown id: only wakes the acker)


def test_the_ack_drain_sends_each_ack_once_in_order_and_yields_between_slices(pki: Pki) -> None:
    """50,000 devices' acknowledgements: one ResponseAck each (with every committed id, in order),
    devices in the order their answers were committed, ACK_SLICE per loop turn; acks committed
    during the drain go in a later pass."""
    n = 50_000
    names = [f"d{i:05d}" for i in range(n)]
    sw = _switch(pki, 1)
    sent: list[tuple[str, object]] = []
    sw.conns = {d: _Device(sent, d) for d in names}  # type: ignore[misc]
    sw.batches.link_up()
    _committed(sw, names, 1)
    _committed(sw, names[:10], 2)  # ten devices answered a second instruction too

    async def run() -> int:
        turns = 0
        acker = asyncio.create_task(sw._acker())
        while len(sent) < n:
            await asyncio.sleep(0)
            turns += 1
            if turns == 5:  # mid-drain: the Core commits d00000's answer to a third instruction
                _committed(sw, names[:1], 3)
            assert turns < 10 * n, "the drain did not finish"
        while len(sent) < n + 1 and turns < 20 * n:
            await asyncio.sleep(0)
            turns += 1
        acker.cancel()
        return turns

    turns = asyncio.run(run())
    assert [d for d, _ in sent[:n]] == names  # in commit order, each device once
    assert sent[0][1] == p.ResponseAck(instruction_ids=[1, 2])
    assert all(m == p.ResponseAck(instruction_ids=[1]) for _, m in sent[10:n])
    assert sent[n:] == [("d00000", p.ResponseAck(instruction_ids=[3]))]  # the later pass
    assert turns >= n // ACK_SLICE  # the loop ran other work between slices
    assert not sw.batches.acks_pending()


def test_the_flusher_sleeps_while_there_is_nothing_to_send(pki: Pki) -> None:
    """Idle, the flusher does not wake (it woke every FLUSH_INTERVAL); a device coming online is
    reported after one gather of FLUSH_INTERVAL; answers gather only while a batch awaits its ack,
    and the flusher sleeps then (the ack wakes it); a delivery is reported once
    DELIVERED_HOLD old, with one wake-up for it."""
    sw = _switch(pki, 1)
    link = _CoreLink()
    sw._link = link
    flushes = 0
    flush_once = sw._flush_once

    async def counted() -> None:
        nonlocal flushes
        flushes += 1
        await flush_once()

    sw._flush_once = counted  # type: ignore[method-assign]

    async def until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
        for _ in range(int(timeout / 0.01)):
            if cond():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition not met")

    async def run() -> None:
        sw._link_up.set()
        sw.batches.link_up()
        flusher = asyncio.create_task(sw._flusher())
        window = 25 * FLUSH_INTERVAL
        await asyncio.sleep(window)  # an idle window: the old flusher woke 25 times in it
        assert flushes == 0
        for dev in ("dev1", "dev2"):  # a second device in the same gather: still one flush
            if sw.batches.device_online(p.DeviceInfo(device_id=dev, fqdn=dev, os="Linux", agent_version="t"),
                                        time.monotonic()):
                sw._flush_wake.set()
        await until(lambda: any(isinstance(m, p.DevicesOnline) for m in link.sent))
        assert flushes == 1
        await asyncio.sleep(window)
        assert flushes == 1  # idle again
        # an answer on an idle link goes at once; while its batch awaits the ack, the flusher
        # sleeps, whether answers gather or not; the ack sends what gathered, with one wake-up;
        # acknowledged, it sleeps again
        sw.on_response("dev1", p.Response(instruction_id=1, status="success"), 10)
        await until(lambda: len(link.batches) == 1)
        before = flushes
        await asyncio.sleep(window)
        assert flushes == before
        sw.on_response("dev2", p.Response(instruction_id=1, status="success"), 10)
        await asyncio.sleep(window)
        assert flushes == before and len(link.batches) == 1  # gathered: no timer sends it
        sw.on_batch_ack(p.BatchAck(batch_id=link.batches[0].batch_id))
        await until(lambda: len(link.batches) == 2)
        assert flushes == before + 1 and [r.device_id for r in link.batches[1].responses] == ["dev2"]
        sw.on_batch_ack(p.BatchAck(batch_id=link.batches[1].batch_id))
        await asyncio.sleep(2 * FLUSH_INTERVAL)  # the wake-up already under way, if any
        before = flushes
        await asyncio.sleep(window)
        assert flushes == before
        # a delivery the device does not answer is reported once it is DELIVERED_HOLD old
        if sw.batches.delivered(7, ["dev1"], time.monotonic()):
            sw._flush_wake.set()
        await until(lambda: any(isinstance(m, p.Delivered) for m in link.sent), 3 * DELIVERED_HOLD)
        assert [m for m in link.sent if isinstance(m, p.Delivered)] == [p.Delivered(instruction_id=7,
                                                                                    device_ids=["dev1"])]
        assert flushes - before == 1  # the one at DELIVERED_HOLD
        assert sw.batches.flush_at() is None
        flusher.cancel()

    asyncio.run(run())
