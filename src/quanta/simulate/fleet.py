"""One simulator worker process: thousands of protocol-true agents on one uvloop.

Each simulated device is exactly what a real agent is on the wire: its own TLS client
certificate (mutual TLS, the Switch is verified against the CA), and the real agent's protocol
behaviour, :class:`~quanta.protocol.agent_session.AgentSession` (hello, welcome, the instruction's
Ed25519 signature checked against ``signing.pub``, the journal's rules: responses kept until a
:class:`ResponseAck` arrives, re-sent after a reconnect or a timeout, never executed twice; the
back-off), over an in-memory journal store instead of the agent's file.

Only the answer is synthetic: ``rows`` rows of ``row_size`` bytes, after a latency drawn from a
configurable distribution, with configurable failure and no-content rates.

Signature checks are memoised per exact ``(body, signature)`` bytes within a process: the
verdict for identical bytes is identical, and this keeps the simulator's CPU for the
measurement, not for repeating the same Ed25519 check 10,000 times.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

import quanta
from quanta import protocol as p
from quanta.pki import Verifier
from quanta.agent.journal import MemoryStore
from quanta.agent.runtime import open_ws
from quanta.protocol.agent_session import Acked, AgentSession, Backoff, Close, Effect, Judged, Run, Send, State
from quanta.signing import ResumingContext

from .enroll import Fleet

log = logging.getLogger("quanta.simulate")

# A connection whose WebSocket opened but that got no Welcome within this many seconds is dropped
# and dialled again (the Switch may have lost the hello, or closed without the close reaching us).
WELCOME_TIMEOUT = 30.0
WATCHDOG_INTERVAL = 5.0
# Shared counters, one block per worker (see runner.py).
COUNTERS = ("connected", "connects", "connect_failures", "deliveries", "executions", "responses",
            "resends", "acks", "disconnects", "churned", "resumed", "welcome_timeouts",
            "window", "in_flight")  # the last two are gauges: this process's handshake window and its use
C = {name: i for i, name in enumerate(COUNTERS)}
GAUGES = ("window", "in_flight")

# The handshake window (see ConnectWindow): in-flight handshakes per process follow the rate they
# achieve times WINDOW_TARGET seconds, between WINDOW_MIN and the configured maximum.
WINDOW_TARGET = 2.0
WINDOW_MIN = 8
WINDOW_INITIAL = 64  # a small fleet (up to 64 per process) dials at once, as before the window
WINDOW_SPAN = 2.0  # seconds of completions the rate is measured over


class ConnectWindow:
    """How many handshakes one simulator process keeps in flight: the rate it achieves times a
    target latency (Little's law), so that the handshakes wait about WINDOW_TARGET seconds each
    however many processes share the Switches' CPU.

    A fixed window (it was 256 per process) does not scale: with P processes the Switches hold
    P x 256 handshakes at once, each waits P x 256 / rate seconds, and past the handshake timeouts
    (the Switch's 15 s, the client's 30 s) the work is thrown away and done again after a back-off.
    Here an unsaturated Switch answers quickly, the measured rate exceeds window / target and the
    window grows (to ``maximum``); a saturated one answers at its rate and the window settles at
    rate x target. A failed handshake is not a completion, so failures shrink the window too. Pure:
    the caller passes the time."""

    def __init__(self, maximum: int, *, minimum: int = WINDOW_MIN, initial: int = WINDOW_INITIAL,
                 target: float = WINDOW_TARGET, span: float = WINDOW_SPAN) -> None:
        self.maximum = max(1, maximum)
        self.minimum = max(1, min(minimum, self.maximum))
        self.target = target
        self.span = span
        self.limit = max(self.minimum, min(initial, self.maximum))
        self.in_flight = 0
        self._done: deque[float] = deque()
        self._since: float | None = None  # when the first handshake of this busy period started

    def rate(self, now: float) -> float | None:
        """Completions per second over the last ``span`` seconds, once there is that much history."""
        while self._done and self._done[0] < now - self.span:
            self._done.popleft()
        if self._since is None or now - self._since < self.span:
            return None
        return len(self._done) / self.span

    def may_start(self) -> bool:
        return self.in_flight < self.limit

    def started(self, now: float) -> None:
        if self._since is None:
            self._since = now
        self.in_flight += 1

    def finished(self, ok: bool, now: float) -> None:
        self.in_flight -= 1
        if ok:
            self._done.append(now)
        self._adjust(now)
        if self.in_flight == 0:
            self._since = None  # idle: the next burst measures afresh
            self._done.clear()

    def _adjust(self, now: float) -> None:
        r = self.rate(now)
        if r is None:
            return
        self.limit = max(self.minimum, min(self.maximum, round(r * self.target)))


def load_cert_chain(ctx: ssl.SSLContext, pem: bytes) -> None:
    """``ctx.load_cert_chain`` from bytes: Python's ssl reads a key and certificate only from a
    path, so they are handed over through an anonymous in-memory file (no file per device)."""
    fd = os.memfd_create("quanta-device", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class SimConfig(msgspec.Struct, frozen=True):
    rows: int = 1
    row_size: int = 32
    latency: str = "0"  # "0", "fixed:S", "uniform:A:B", "exp:MEAN", "lognormal:MU:SIGMA"
    failure_rate: float = 0.0
    nocontent_rate: float = 0.0
    churn: float = 0.0  # fraction of the fleet that leaves per minute
    churn_downtime: float = 5.0
    connect_concurrency: int = 256  # the most handshakes in flight per process (see ConnectWindow)
    retry_min: float = 1.0
    retry_max: float = 60.0
    resume: bool = True  # offer the last TLS session on reconnect (TLS 1.3 tickets)
    # Bind each worker's connections to this IPv4 address plus the worker's index (127.0.0.2,
    # 127.0.0.3, ... on loopback): tens of thousands of local connections then do not use up
    # 127.0.0.1's ports, which every other local program needs too.
    source_ip: str | None = None
    seed: int | None = None


def latency_sampler(spec: str, rnd: random.Random) -> Callable[[], float]:
    """Parse a latency spec into a sampler returning seconds."""
    kind, _, rest = spec.partition(":")
    args = [float(x) for x in rest.split(":")] if rest else []
    try:
        if kind in ("0", "none", ""):
            return lambda: 0.0
        if kind == "fixed":
            (s,) = args
            return lambda: s
        if kind == "uniform":
            a, b = args
            return lambda: rnd.uniform(a, b)
        if kind == "exp":
            (mean,) = args
            return lambda: rnd.expovariate(1.0 / mean) if mean > 0 else 0.0
        if kind == "lognormal":
            mu, sigma = args
            return lambda: rnd.lognormvariate(mu, sigma)
        float(spec)
        return lambda: float(spec)
    except ValueError:
        pass
    raise ValueError(f"latency {spec!r}: expected 0, fixed:S, uniform:A:B, exp:MEAN or lognormal:MU:SIGMA")


class SimDevice(WSListener):
    """One simulated device: a picows listener and the timers around the real agent's
    :class:`AgentSession` over an in-memory journal store."""

    def __init__(self, sim: Simulator, name: str, index: int) -> None:
        self.sim = sim
        self.name = name
        self.switch_index = index % len(sim.switches)
        self.transport: WSTransport | None = None
        self.ctx: ResumingContext | None = None
        self.up = False  # welcomed by a Switch
        self.session = AgentSession(MemoryStore(), sim, Backoff(sim.cfg.retry_min, sim.cfg.retry_max, sim.rnd))
        self.away_until = 0.0
        self.opened_at = 0.0  # when the current transport opened (monotonic)
        self.pending = False  # a connect is scheduled or in flight
        self.close_reason = ""

    # --------------------------------------------------------------- picows callbacks
    def on_ws_connected(self, transport: WSTransport) -> None:
        if self.session.state is State.CLOSED:  # the simulator stopped while this dial was under way
            transport.send_close(WSCloseCode.GOING_AWAY, b"agent stopping")
            transport.disconnect()
            return
        self.transport = transport
        self.opened_at = time.monotonic()
        self.close_reason = ""
        self.apply(self.session.connected(self.sim.hello(self.name), time.time()))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        t = frame.msg_type
        if t is WSMsgType.BINARY:
            welcomed = self.session.ready
            effects = self.session.receive(frame.get_payload_as_memoryview(), time.time())
            if not welcomed and self.session.ready:
                self.on_welcome(transport)
            self.apply(effects)
        elif t is WSMsgType.CLOSE:
            self.close_reason = f"closed by the switch: {frame.get_close_code()} " \
                                f"{(frame.get_close_message() or b'').decode(errors='replace')}"
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if transport is not self.transport:
            return
        self.transport = None
        sim = self.sim
        if self.up:
            self.up = False
            sim.count(C["connected"], -1)
            sim.count(C["disconnects"])
        if self.session.state is State.CLOSED:  # the simulator is stopping
            return
        retry = self.session.lost(self.close_reason or "connection lost", time.time())
        if retry.fail_over:
            self.switch_index += 1
        if not sim.stopping:
            sim.schedule_connect(self, max(self.away_until - time.time(), retry.delay))

    # ---------------------------------------------------------------------- protocol
    def apply(self, effects: list[Effect]) -> None:
        sim = self.sim
        for e in effects:
            if isinstance(e, Send):
                msg = e.message
                t = self.transport
                if t is None or t.is_disconnected or not (self.up or isinstance(msg, p.Hello)):
                    continue  # journalled: goes again after the next Welcome
                t.send(WSMsgType.BINARY, p.encode(msg))
                if isinstance(msg, p.Response):
                    sim.count(C["resends"] if e.resend else C["responses"])
            elif isinstance(e, Run):
                delay = sim.latency()
                if delay <= 0:
                    self.answer(e.body.id)
                else:
                    sim.loop.call_later(delay, self.answer, e.body.id)
            elif isinstance(e, Judged):
                if e.action != "too large":
                    sim.count(C["deliveries"])
                if e.action in ("refuse", "too large"):
                    log.error("%s: instruction %s: %s", self.name, e.instruction_id, e.reason)
            elif isinstance(e, Acked):
                sim.count(C["acks"], len(e.instruction_ids))
            elif isinstance(e, Close):
                # a deliberate stop (going away) is routine; anything else is the Switch misbehaving
                log.log(logging.DEBUG if e.code == WSCloseCode.GOING_AWAY else logging.ERROR, "%s: closing: %s",
                        self.name, e.reason)
                t = self.transport
                if t is not None and not t.is_disconnected:
                    t.send_close(WSCloseCode(e.code), p.close_reason(e.reason))
                    t.disconnect()

    def on_welcome(self, transport: WSTransport) -> None:
        self.up = True
        sim = self.sim
        sim.count(C["connected"])
        sim.count(C["connects"])
        if self.ctx is not None:
            ssl_obj = transport.underlying_transport.get_extra_info("ssl_object")
            if ssl_obj is not None:
                if ssl_obj.session_reused:
                    sim.count(C["resumed"])
                if sim.cfg.resume:
                    self.ctx.session = ssl_obj.session

    def answer(self, iid: int) -> None:
        if self.session.state is State.CLOSED:
            return
        sim = self.sim
        sim.count(C["executions"])
        sim.unacked.add(self)
        self.apply(self.session.completed(sim.response(iid, self.name), time.time()))

    def drop_unwelcomed(self) -> None:
        """Give up on an opened connection that was never welcomed, and dial again."""
        t, self.transport = self.transport, None
        sim = self.sim
        sim.count(C["welcome_timeouts"])
        log.debug("%s: no welcome within %.0fs; reconnecting", self.name, WELCOME_TIMEOUT)
        if t is not None and not t.is_disconnected:
            t.disconnect()  # its on_ws_disconnected sees another transport and does nothing
        retry = self.session.lost(f"no welcome within {WELCOME_TIMEOUT:.0f}s", time.time())
        self.switch_index += 1  # try the next Switch, as after a failed connect
        if self.ctx is not None:
            self.ctx.session = None
        if not sim.stopping:
            sim.schedule_connect(self, retry.delay)

    def tick(self, now: float) -> None:
        self.apply(self.session.tick(now))
        if not self.session.unacked():
            self.sim.unacked.discard(self)


class Simulator:
    def __init__(self, fleet: Fleet, names: list[str], first_index: int, cfg: SimConfig,
                 counters: Any, offset: int) -> None:
        self.fleet = fleet
        self.cfg = cfg
        self.switches = fleet.switches
        self.rnd = random.Random(cfg.seed)
        self.latency = latency_sampler(cfg.latency, self.rnd)
        self.verifier = Verifier.from_file(fleet.signing_pub)
        self.cadata = fleet.ca.read_text()
        self.devices = [SimDevice(self, n, first_index + i) for i, n in enumerate(names)]
        self.counters = counters
        self.offset = offset
        self.connect_kw: dict[str, Any] = {}
        if cfg.source_ip:
            import ipaddress

            ip = ipaddress.IPv4Address(cfg.source_ip) + offset // len(COUNTERS)
            self.connect_kw["local_addr"] = (str(ip), 0)
        self.stopping = False
        self.unacked: set[SimDevice] = set()
        self._verified: dict[tuple[bytes, bytes], bool] = {}
        self.window = ConnectWindow(cfg.connect_concurrency)
        self._waiting: deque[asyncio.Future[None]] = deque()  # connects waiting for the window
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._payload = "x" * cfg.row_size
        self._tags = {"simulated": "true"}

    # ------------------------------------------------------------------ helpers
    def count(self, i: int, n: int = 1) -> None:
        self.counters[self.offset + i] += n

    def hello(self, name: str) -> p.Hello:
        return p.Hello(device_id=name, fqdn=f"{name}.sim", os="Simulated 1.0", agent_version=quanta.__version__,
                       tags=self._tags)

    def verify(self, body: bytes, signature: bytes) -> bool:
        """The sessions' signature check (SignatureCheck), memoised per exact bytes."""
        key = (body, signature)
        ok = self._verified.get(key)
        if ok is None:
            ok = self._verified[key] = self.verifier.verify(body, signature)
        return ok

    def response(self, iid: int, name: str) -> p.Response:
        r = self.rnd.random()
        cfg = self.cfg
        if r < cfg.failure_rate:
            msg = p.Response(instruction_id=iid, status="error", error="simulated failure")
        elif r < cfg.failure_rate + cfg.nocontent_rate:
            msg = p.Response(instruction_id=iid, status="nocontent", columns=["Device", "Row", "Data"])
        else:
            msg = p.Response(instruction_id=iid, status="success", columns=["Device", "Row", "Data"],
                             rows=[[name, i, self._payload] for i in range(cfg.rows)])
        return msg

    def context(self, dev: SimDevice) -> ResumingContext:
        if dev.ctx is None:
            ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_verify_locations(cadata=self.cadata)
            load_cert_chain(ctx, self.fleet.pem_bytes(dev.name))
            dev.ctx = ctx
        return dev.ctx

    # ------------------------------------------------------------------ connecting
    def schedule_connect(self, dev: SimDevice, delay: float) -> None:
        def go() -> None:
            if not self.stopping and dev.transport is None:
                asyncio.ensure_future(self.connect(dev))
            else:
                dev.pending = False
        dev.pending = True
        self.loop.call_later(max(0.0, delay), go)

    async def connect(self, dev: SimDevice) -> None:
        dev.pending = True
        try:
            await self._connect(dev)
        finally:
            if dev.transport is not None:
                dev.pending = False

    async def _enter_window(self) -> None:
        """Wait for room in the handshake window, first come first served."""
        w = self.window
        first = True
        while not w.may_start() or (first and self._waiting):
            fut = self.loop.create_future()
            if first:
                self._waiting.append(fut)
            else:  # woken but the window shrank meanwhile: keep its place at the head
                self._waiting.appendleft(fut)
            first = False
            try:
                await fut
            except asyncio.CancelledError:
                if fut in self._waiting:
                    self._waiting.remove(fut)
                raise
        w.started(time.monotonic())
        self._gauge()

    def _leave_window(self, ok: bool) -> None:
        w = self.window
        w.finished(ok, time.monotonic())
        self._gauge()
        free = w.limit - w.in_flight
        while free > 0 and self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                free -= 1

    def _gauge(self) -> None:
        self.counters[self.offset + C["window"]] = self.window.limit
        self.counters[self.offset + C["in_flight"]] = self.window.in_flight

    async def _connect(self, dev: SimDevice) -> None:
        await self._enter_window()
        ok = False
        try:
            if self.stopping or dev.transport is not None:
                return  # no handshake: neither a completion nor a failure for the window's rate
            host, port = self.switches[dev.switch_index % len(self.switches)]
            try:
                await asyncio.wait_for(open_ws(
                    lambda: dev, f"wss://{host}:{port}/agent", self.context(dev), explain=False,
                    websocket_handshake_timeout=20, enable_auto_ping=True, auto_ping_idle_timeout=60,
                    auto_ping_reply_timeout=30, use_aiofastnet=False, max_frame_size=16 * 1024 * 1024,
                    read_buffer_init_size=1024, **self.connect_kw), 30)
                ok = True
                return
            except Exception as e:  # noqa: BLE001 - refused, TLS failure, timeout: fail over and back off
                if dev.session.state is State.CLOSED:  # the simulator stopped while this dial was under way
                    return
                log.debug("%s: cannot connect to %s:%d: %s", dev.name, host, port, e)
                self.count(C["connect_failures"])
                retry = dev.session.failed(f"cannot connect: {e or type(e).__name__}")
                dev.switch_index += 1
                if dev.ctx is not None and isinstance(e, (ssl.SSLError, ConnectionError)) \
                        and not isinstance(e, ConnectionRefusedError):
                    # a refused or timed-out connect keeps the session: the Switch that issued it
                    # (or its restarted successor) takes it back once it is up; a TLS failure does not
                    dev.ctx.session = None
        finally:
            self._leave_window(ok)
        self.schedule_connect(dev, retry.delay)

    # ------------------------------------------------------------------ loops
    def watchdog(self) -> None:
        """Every device is welcomed, or on its way to a (re)connect: a connection opened but never
        welcomed within WELCOME_TIMEOUT is dropped and retried, and a device with neither a
        connection nor a pending connect is dialled again."""
        if self.stopping:
            return
        mono = time.monotonic()
        for dev in self.devices:
            if dev.up:
                continue
            if dev.transport is not None:
                if mono - dev.opened_at >= WELCOME_TIMEOUT:
                    dev.drop_unwelcomed()
            elif not dev.pending:
                self.schedule_connect(dev, dev.session.backoff.failed("not connected").delay)

    async def _housekeeping(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL)
            self.watchdog()
            if time.monotonic() - last < 5:
                continue
            last = time.monotonic()
            now = time.time()
            for dev in list(self.unacked):  # resends due
                dev.tick(now)
            for dev in self.devices:  # forget instructions long past their window
                if dev.session.store.entries:
                    dev.session.prune(now)

    async def _churn(self) -> None:
        carry = 0.0
        while True:
            await asyncio.sleep(1.0)
            carry += self.cfg.churn * len(self.devices) / 60.0
            k, carry = int(carry), carry - int(carry)
            if k <= 0:
                continue
            up = [d for d in self.devices if d.up]
            for dev in self.rnd.sample(up, min(k, len(up))):
                dev.away_until = time.time() + self.cfg.churn_downtime
                self.count(C["churned"])
                if dev.transport is not None:
                    dev.transport.send_close(WSCloseCode.GOING_AWAY)
                    dev.transport.disconnect()

    async def run(self, stop: asyncio.Event) -> None:
        self.loop = asyncio.get_running_loop()
        self._gauge()
        tasks = [asyncio.create_task(self._housekeeping())]
        if self.cfg.churn > 0:
            tasks.append(asyncio.create_task(self._churn()))
        for dev in self.devices:
            asyncio.ensure_future(self.connect(dev))
        await stop.wait()
        self.stopping = True
        for t in tasks:
            t.cancel()
        for dev in self.devices:
            if dev.transport is not None:
                dev.apply(dev.session.close())
            else:
                dev.session.close()
        await asyncio.sleep(0.2)


def worker_main(fleet_root: str, names: list[str], first_index: int, cfg_bytes: bytes, counters: Any,
                offset: int, stop_event: Any, log_level: str) -> None:
    """Entry point of one simulator process (multiprocessing, spawn)."""
    import uvloop

    logging.basicConfig(level=getattr(logging, log_level, logging.WARNING),
                        format="%(asctime)s %(levelname)s simulate[%(process)d] %(name)s: %(message)s")
    logging.getLogger("picows").setLevel(logging.CRITICAL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    cfg = msgspec.msgpack.decode(cfg_bytes, type=SimConfig)
    fleet = Fleet.load(fleet_root)
    import gc

    gc.set_threshold(10_000, 20, 1_000)  # thousands of long-lived devices: rare full collections (cf. the Switch)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)

        async def watch() -> None:
            while not stop_event.is_set():
                await asyncio.sleep(0.1)
            stop.set()

        watcher = asyncio.create_task(watch())
        await Simulator(fleet, names, first_index, cfg, counters, offset).run(stop)
        watcher.cancel()

    uvloop.run(main())
