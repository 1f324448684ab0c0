"""The Switch: holds agents' ``wss`` connections (mutual TLS), delivers instructions to the
connected devices in scope, streams their responses to the Core in batches, and reports who is
online.

Per connection the Switch keeps one small listener object; messages are decoded by
:mod:`quanta.protocol`. A connection that misbehaves (malformed frame, oversized message, text
frame, anything before its hello, a hello for another device than its certificate names) is
closed with a logged reason; nothing else is affected.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import ssl
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets
from cryptography import x509
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

from quanta import protocol as p
from quanta.pki import Pki, cert_serial_and_name, client_context
from quanta.runtime import bind_socket
from quanta.settings import core_link_max_bytes

log = logging.getLogger("quanta.switch")

HELLO_TIMEOUT = 10.0
HEARTBEAT = 60.0
FLUSH_INTERVAL = 0.02
# A delivery is reported to the Core (pending -> sent) only once it is this old and its device has
# not answered meanwhile: an answer supersedes it, so most devices never cost a 'sent' write, and
# the Core commits answers first. (The Core's write is state-guarded, so the order is free.)
DELIVERED_HOLD = 1.0
ACK_SLICE = 256  # ResponseAcks sent per loop turn, so acknowledging never stalls reading answers
# Answers first: while answers keep arriving (one in the last ACK_IDLE seconds), committed
# ResponseAcks wait, for at most ACK_MAX_DELAY. An unacknowledged agent only resends after 30 s.
ACK_IDLE = 0.02
ACK_MAX_DELAY = 1.0
# Tens of thousands of long-lived connection objects make every full (generation 2) garbage
# collection a pause of a few hundred ms, and each question's responses (held until the Core
# acknowledges them) promote enough objects to trigger one every few questions. Full collections
# are made rarer; young cyclic garbage is still collected as before.
GC_THRESHOLDS = (10_000, 20, 1_000)


@dataclass
class ActiveInstruction:
    item: p.WorkItem
    frame: bytes  # the encoded Deliver message, built once
    scope: frozenset[str] | None
    delivered: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)  # a Cancel is only for devices not in here


class AgentConnection(WSListener):
    __slots__ = ("switch", "transport", "device_id", "serial", "info", "peer", "_cn", "_hello_timer")

    def __init__(self, switch: Switch) -> None:
        self.switch = switch
        self.transport: WSTransport | None = None
        self.device_id: str | None = None
        self.serial = 0
        self._cn = ""
        self.info: p.DeviceInfo | None = None
        self.peer = ""
        self._hello_timer: asyncio.TimerHandle | None = None

    # picows callbacks -------------------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        under = transport.underlying_transport
        peer = under.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        ssl_obj = under.get_extra_info("ssl_object")
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        if not der:  # cannot happen with CERT_REQUIRED, but never trust a path we did not test
            self.close(WSCloseCode.POLICY_VIOLATION, "no client certificate")
            return
        self.serial, self._cn = cert_serial_and_name(der)
        if self.serial in self.switch.revoked_serials:
            self.close(WSCloseCode.POLICY_VIOLATION, "certificate revoked")
            return
        self._hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT, self._hello_timeout)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        t = frame.msg_type
        if t is WSMsgType.BINARY:
            if not frame.fin:
                self.close(WSCloseCode.UNSUPPORTED_DATA, "fragmented messages are not accepted")
                return
            try:
                msg = p.decode_from_agent(frame.get_payload_as_memoryview())
            except p.ProtocolError as e:
                self.close(WSCloseCode.PROTOCOL_ERROR, str(e))
                return
            if isinstance(msg, p.Response):
                if self.device_id is None:
                    self.close(WSCloseCode.PROTOCOL_ERROR, "response before hello")
                    return
                self.switch.on_response(self.device_id, msg, frame.payload_size)
            else:
                self.on_hello(msg)
        elif t is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        elif t is WSMsgType.PING or t is WSMsgType.PONG:
            pass  # picows answers pings itself
        else:
            self.close(WSCloseCode.UNSUPPORTED_DATA, f"unexpected {t.name} frame")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if self.device_id is not None:
            self.switch.on_disconnected(self)

    # -------------------------------------------------------------------------------
    def on_hello(self, hello: p.Hello) -> None:
        if self.device_id is not None:
            self.close(WSCloseCode.PROTOCOL_ERROR, "second hello on one connection")
            return
        if hello.device_id != self._cn:
            self.close(WSCloseCode.POLICY_VIOLATION,
                       f"hello names device {hello.device_id!r} but the certificate is for {self._cn!r}")
            return
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        self.device_id = hello.device_id
        self.info = p.DeviceInfo(device_id=hello.device_id, fqdn=hello.fqdn, os=hello.os,
                                 agent_version=hello.agent_version, tags=hello.tags,
                                 address=self.peer.rsplit(":", 1)[0])
        self.switch.on_hello(self)

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.send(WSMsgType.BINARY, data)

    def close(self, code: WSCloseCode, reason: str) -> None:
        log.warning("closing connection from %s (device %s): %s", self.peer,
                    self.device_id or self._cn or "?", reason)
        if self.transport is not None:
            self.transport.send_close(code, reason.encode()[:120])
            self.transport.disconnect()

    def _hello_timeout(self) -> None:
        self._hello_timer = None
        if self.device_id is None:
            self.close(WSCloseCode.POLICY_VIOLATION, f"no hello within {HELLO_TIMEOUT:.0f}s")


class Switch:
    """One Switch process. ``name``/``host``/``port`` come from its SwitchConfiguration row."""

    def __init__(self, *, name: str, host: str, port: int, bind_host: str, pki: Pki, core_url: str,
                 secret: bytes, max_message_bytes: int) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.bind_host = bind_host
        self.pki = pki
        self.core_url = core_url
        self.secret = secret
        self.max_message_bytes = max_message_bytes
        self.incarnation = uuid.uuid4().hex
        self.conns: dict[str, AgentConnection] = {}
        self.active: dict[int, ActiveInstruction] = {}
        self.revoked_serials: set[int] = set()
        # outgoing buffers towards the Core
        self._online: dict[str, p.DeviceInfo] = {}
        self._offline: set[str] = set()
        self._delivered: dict[int, dict[str, float]] = defaultdict(dict)  # instruction -> device -> when
        self._responses: list[p.DeviceResponse] = []
        self._sizes: list[int] = []
        self._responses_bytes = 0
        self._unacked: dict[int, p.ResponseBatch] = {}
        self._acks: dict[str, list[int]] = {}  # device -> instruction ids the Core committed, to send
        self._ack_now = asyncio.Event()
        self._last_response = 0.0
        self._batch_seq = 0
        self._flush_now = asyncio.Event()
        self._fetch = asyncio.Event()
        self._link: Any = None
        self._link_up = asyncio.Event()
        self._ctx_current: ssl.SSLContext | None = None
        self._crl_mtime = 0.0
        self.stats = {"connects": 0, "responses": 0, "closed_bad_input": 0}

    # ------------------------------------------------------------------ TLS / CRL
    def _build_context(self) -> ssl.SSLContext:
        ctx = self.pki.server_context(require_client_cert=True)
        return ctx

    def _load_revoked(self) -> None:
        crl = x509.load_pem_x509_crl(self.pki.crl.read_bytes())
        self.revoked_serials = {r.serial_number for r in crl}

    def reload_crl(self) -> None:
        """Swap in a context holding the new CRL and drop connections of revoked devices."""
        self._crl_mtime = self.pki.crl.stat().st_mtime
        self._ctx_current = self._build_context()
        self._load_revoked()
        for conn in list(self.conns.values()):
            if conn.serial in self.revoked_serials:
                conn.close(WSCloseCode.POLICY_VIOLATION, "certificate revoked")
        log.info("CRL loaded: %d revoked certificates", len(self.revoked_serials))

    def _sni(self, obj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        # Called for every handshake, before the client certificate is verified: hand the
        # connection the context with the newest CRL, so revocations apply without a restart.
        if self._ctx_current is not None:
            obj.context = self._ctx_current

    async def _watch_crl(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                if self.pki.crl.stat().st_mtime != self._crl_mtime:
                    self.reload_crl()
            except Exception:
                log.exception("could not reload the CRL; keeping the previous one")

    # ------------------------------------------------------------------ agent events
    def on_hello(self, conn: AgentConnection) -> None:
        assert conn.device_id is not None and conn.info is not None
        old = self.conns.get(conn.device_id)
        if old is not None and old is not conn:
            old.device_id = None  # its disconnect must not unregister the new connection
            old.close(WSCloseCode.POLICY_VIOLATION, "replaced by a newer connection of the same device")
        self.conns[conn.device_id] = conn
        self.stats["connects"] += 1
        self._offline.discard(conn.device_id)
        self._online[conn.device_id] = conn.info
        conn.send(p.encode(p.Welcome(switch=self.name, heartbeat_seconds=HEARTBEAT)))
        now = time.monotonic()
        for iid, act in self.active.items():
            if act.scope is None or conn.device_id in act.scope:
                conn.send(act.frame)
                act.delivered.add(conn.device_id)
                pending = self._delivered[iid]
                pending.pop(conn.device_id, None)  # keep each dict in time order
                pending[conn.device_id] = now

    def on_disconnected(self, conn: AgentConnection) -> None:
        dev = conn.device_id
        if dev is not None and self.conns.get(dev) is conn:
            del self.conns[dev]
            self._online.pop(dev, None)
            self._offline.add(dev)

    def on_response(self, device_id: str, resp: p.Response, size: int) -> None:
        self._last_response = time.monotonic()
        pending = self._delivered.get(resp.instruction_id)
        if pending is not None:
            pending.pop(device_id, None)  # answered: its 'sent' need not be reported
        act = self.active.get(resp.instruction_id)
        if act is not None:
            act.answered.add(device_id)
        self._responses.append(p.DeviceResponse(device_id=device_id, response=resp))
        self._sizes.append(size)
        self._responses_bytes += size
        self.stats["responses"] += 1
        if self._responses_bytes >= self.max_message_bytes or len(self._responses) >= 2000:
            self._flush_now.set()

    # ------------------------------------------------------------------ core events
    def on_work(self, work: p.Work) -> None:
        live = set(work.active)
        for iid in [i for i in self.active if i not in live]:
            del self.active[iid]
        now = time.time()
        for item in work.items:
            if item.id in self.active or item.expires_at <= now:
                continue
            scope = frozenset(item.devices) if item.devices is not None else None
            act = ActiveInstruction(item, p.encode(p.Deliver(instruction=item.instruction)), scope)
            self.active[item.id] = act
            targets = (self.conns.values() if scope is None else
                       (self.conns[d] for d in scope if d in self.conns))
            sent = []
            for conn in targets:
                conn.send(act.frame)
                sent.append(conn.device_id)
            act.delivered.update(sent)
            pending = self._delivered[item.id]  # a new instruction: nothing pending yet
            pending.update(dict.fromkeys(sent, time.monotonic()))  # type: ignore[arg-type]
            log.info("instruction %d delivered to %d connected devices", item.id, len(sent))
        self._flush_now.set()

    def on_batch_ack(self, ack: p.BatchAck) -> None:
        batch = self._unacked.pop(ack.batch_id, None)
        if batch is None:
            return
        acks = self._acks
        for r in batch.responses:
            ids = acks.get(r.device_id)
            if ids is None:
                acks[r.device_id] = [r.response.instruction_id]
            else:
                ids.append(r.response.instruction_id)
        self._ack_now.set()

    async def _acker(self) -> None:
        """Send the queued ResponseAcks, ACK_SLICE per loop turn, when answers pause (see ACK_IDLE)."""
        while True:
            await self._ack_now.wait()
            self._ack_now.clear()
            since = time.monotonic()
            while self._acks:
                now = time.monotonic()
                if now - self._last_response < ACK_IDLE and now - since < ACK_MAX_DELAY:
                    await asyncio.sleep(ACK_IDLE)
                    continue
                for _ in range(min(ACK_SLICE, len(self._acks))):
                    dev = next(iter(self._acks))
                    ids = self._acks.pop(dev)
                    conn = self.conns.get(dev)
                    if conn is not None:
                        conn.send(p.encode(p.ResponseAck(instruction_ids=ids)))
                await asyncio.sleep(0)

    def on_cancel(self, cancel: p.Cancel) -> None:
        for iid in cancel.instruction_ids:
            act = self.active.pop(iid, None)
            if act is None:
                continue
            frame = p.encode(p.Cancel(instruction_ids=[iid]))
            for dev in act.delivered - act.answered:  # those that answered have nothing to cancel
                conn = self.conns.get(dev)
                if conn is not None:
                    conn.send(frame)

    # ------------------------------------------------------------------ core link
    async def _send_core(self, msg: Any) -> None:
        await self._link.send(p.encode(msg))

    async def _flusher(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._flush_now.wait(), FLUSH_INTERVAL)
            except asyncio.TimeoutError:
                pass
            self._flush_now.clear()
            await self._link_up.wait()
            try:
                await self._flush_once()
            except websockets.ConnectionClosed:
                pass  # the link task reconnects and resends

    async def _flush_once(self) -> None:
        if self._online:
            infos, self._online = list(self._online.values()), {}
            await self._send_core(p.DevicesOnline(devices=infos))
        if self._offline:
            gone, self._offline = sorted(self._offline), set()
            await self._send_core(p.DevicesOffline(device_ids=gone))
        while self._responses:
            # Cut a batch of at most max_message_bytes (but at least one response) or 2000 responses.
            n, size = 0, 0
            while n < len(self._responses) and n < 2000 and (n == 0 or size + self._sizes[n] <= self.max_message_bytes):
                size += self._sizes[n]
                n += 1
            chunk, self._responses, self._sizes = self._responses[:n], self._responses[n:], self._sizes[n:]
            self._responses_bytes -= size
            self._batch_seq += 1
            batch = p.ResponseBatch(batch_id=self._batch_seq, responses=chunk)
            self._unacked[batch.batch_id] = batch
            await self._send_core(batch)
        if self._delivered:  # after the answers: see DELIVERED_HOLD
            cutoff = time.monotonic() - DELIVERED_HOLD
            for iid in list(self._delivered):
                pending = self._delivered[iid]
                due = []
                for d, t in pending.items():  # in time order
                    if t > cutoff:
                        break
                    due.append(d)
                for d in due:
                    del pending[d]
                if not pending:
                    del self._delivered[iid]
                if due:
                    await self._send_core(p.Delivered(instruction_id=iid, device_ids=due))

    async def _core_link(self) -> None:
        headers = {"Authorization": f"Bearer {p.internal_token(self.secret)}"}
        delay = 0.2
        while True:
            try:
                tls = client_context(self.pki.ca_crt) if self.core_url.startswith("wss:") else None
                async with websockets.connect(self.core_url, additional_headers=headers, ssl=tls,
                                              max_size=core_link_max_bytes(self.max_message_bytes),
                                              ping_interval=20, open_timeout=10) as ws:
                    self._link = ws
                    await ws.send(p.encode(p.SwitchHello(name=self.name, host=self.host, port=self.port,
                                                         incarnation=self.incarnation)))
                    await ws.send(p.encode(p.DevicesOnline(devices=[c.info for c in self.conns.values()
                                                                    if c.info is not None])))
                    self._online.clear()
                    self._offline.clear()
                    for batch in list(self._unacked.values()):  # the Core dedups by (instruction, device)
                        await ws.send(p.encode(batch))
                    await ws.send(p.encode(p.FetchWork(known=[])))
                    self._link_up.set()
                    delay = 0.2
                    log.info("linked to core at %s", self.core_url)
                    async for data in ws:
                        if isinstance(data, str):
                            raise p.ProtocolError("text frame from core")
                        msg = p.decode_from_core(data)
                        if isinstance(msg, p.Work):
                            self.on_work(msg)
                        elif isinstance(msg, p.BatchAck):
                            self.on_batch_ack(msg)
                        elif isinstance(msg, p.Cancel):
                            self.on_cancel(msg)
            except (OSError, websockets.WebSocketException, asyncio.TimeoutError, p.ProtocolError) as e:
                log.warning("core link down (%s); retrying in %.1fs", e, delay)
            finally:
                self._link_up.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _fetcher(self) -> None:
        while True:
            await self._fetch.wait()
            self._fetch.clear()
            await self._link_up.wait()
            try:
                await self._send_core(p.FetchWork(known=list(self.active)))
            except websockets.ConnectionClosed:
                pass

    # ------------------------------------------------------------------ poke port
    async def _on_poke(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            data = await asyncio.wait_for(reader.readexactly(p.POKE_SIZE), 5)
            if p.check_poke(self.secret, data):
                self._fetch.set()
            else:
                log.warning("poke from %s refused: bad or stale authentication", peer)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
            log.warning("poke from %s refused: incomplete", peer)
        finally:
            writer.close()

    # ------------------------------------------------------------------ run
    async def serve(self, stop: asyncio.Event) -> None:
        gc.set_threshold(*GC_THRESHOLDS)
        self.reload_crl()
        base = self._build_context()
        base.sni_callback = self._sni
        client_sock = bind_socket(self.bind_host, self.port, "switch")
        poke_sock = bind_socket(self.bind_host, self.port + 1, "poke")
        server = await ws_create_server(
            lambda _req: AgentConnection(self), sock=client_sock, ssl=base, use_aiofastnet=False,
            max_frame_size=self.max_message_bytes, read_buffer_init_size=1024,
            enable_auto_ping=True, auto_ping_idle_timeout=HEARTBEAT * 2, auto_ping_reply_timeout=30,
            websocket_handshake_timeout=10, ssl_handshake_timeout=15)
        poke_server = await asyncio.start_server(self._on_poke, sock=poke_sock)
        log.info("switch %s listening: wss %s:%d (agents), poke tcp %s:%d (core)", self.name, self.bind_host,
                 self.port, self.bind_host, self.port + 1)
        tasks = [asyncio.create_task(c) for c in (self._core_link(), self._flusher(), self._fetcher(), self._acker(),
                                                   self._watch_crl())]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            server.close()
            poke_server.close()
            for conn in list(self.conns.values()):
                conn.close(WSCloseCode.GOING_AWAY, "switch stopping")


def pid_file(root: Path, name: str) -> Path:
    return root / "run" / f"{name}.pid"


def write_pid(root: Path, name: str) -> None:
    f = pid_file(root, name)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(str(os.getpid()))
