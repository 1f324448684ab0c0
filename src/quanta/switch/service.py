"""The Switch: holds agents' ``wss`` connections (mutual TLS), delivers instructions to the
connected devices in scope, streams their responses to the Core in batches, and reports who is
online.

Per connection the Switch keeps one small listener object; messages are decoded by
:mod:`quanta.protocol`. A connection that misbehaves (malformed frame, oversized message, text
frame, anything before its hello, a hello for another device than its certificate names) is
closed with a logged reason; nothing else is affected. So is a frame with reserved bits set, and
an upgrade to another WebSocket version than 13 is refused (426). At the open-file limit new
connections are refused at once (see ``quanta.runtime.SheddingListener``). Refusals an attacker
can repeat at line rate (connections at the limit, bad pokes) are logged once per
REFUSAL_LOG_INTERVAL with a count.
"""

from __future__ import annotations

import asyncio
from collections import Counter
import gc
import logging
import os
import ssl
import sys
import time
import uuid
from http import HTTPStatus
from pathlib import Path
from typing import Any

import msgspec
import tenacity
from cryptography import x509
from picows import (WSCloseCode, WSError, WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, WSUpgradeResponse,
                    WSUpgradeResponseWithListener, ws_connect, ws_create_server)

from quanta import metrics
from quanta import protocol as p
from quanta.protocol import switch_batches as sb
from quanta.protocol.switch_batches import ACK_IDLE, ACK_MAX_DELAY, DELIVERED_HOLD, FLUSH_INTERVAL  # noqa: F401
from quanta.protocol.switch_batches import (Announce, ReportDelivered, ReportOffline, ReportTags, SendBatch,
                                            SwitchBatches)
from quanta.protocol.switch_state import FANOUT_SLICE, CancelTo, DeliverTo, Effect, FanOut, SwitchState
from quanta.internal import SWITCH_TO_CORE, Credentials, credential, link_headers, poke_key
from quanta.pki import Pki, client_context, peer_device
from quanta.switch.tls import TicketKeys, lean_tls
from quanta.runtime import LISTEN_BACKLOG, HeapReleaser, LogEvery, SheddingListener, bind_socket
from quanta.settings import core_link_max_bytes, poke_port

log = logging.getLogger("quanta.switch")

HELLO_TIMEOUT = 10.0
# A connection must finish its TLS handshake within TLS_HANDSHAKE_TIMEOUT of being accepted, and its
# WebSocket upgrade within UPGRADE_TIMEOUT after that, or the Switch closes it: a device that
# connects and stalls (or a flood of half-open connections) holds a descriptor that long, no longer.
TLS_HANDSHAKE_TIMEOUT = 15.0
UPGRADE_TIMEOUT = 10.0
HEARTBEAT = 60.0
# Liveness without a timer per connection (picows' auto-ping runs a task per connection, ~2 KiB
# each): every frame, pings included, stamps the connection with the Switch's sweep tick; every
# SWEEP seconds one pass pings the connections silent for two ticks and closes those silent for
# STALE_TICKS (an agent that answers no ping within a minute or more is gone).
SWEEP = HEARTBEAT / 2
STALE_TICKS = 5
NO_TAGS: dict[str, str] = {}  # shared by every device that reports no tags; never mutated
# Batching of answers towards the Core, the devices' ResponseAcks once the Core committed them,
# and the reports of deliveries: the pure rules and their timings (FLUSH_INTERVAL, DELIVERED_HOLD,
# ACK_IDLE, ACK_MAX_DELAY) are quanta.protocol.switch_batches'; this shell keeps the timers.
# Answers first: waking every device to acknowledge costs about as much CPU as the question itself
# did, so the acknowledgements wait until answers pause (an unacknowledged agent only resends after
# 30 s), and go ACK_SLICE per loop turn, so acknowledging never stalls reading answers.
ACK_SLICE = 256
# The link to the Core is dialled again with exponential back-off from LINK_RETRY_MIN up to
# LINK_RETRY_MAX, plus up to LINK_RETRY_JITTER at random (so Switches do not all dial a restarted
# Core at once); the back-off starts again once a link stayed up LINK_STABLE seconds. Failures are
# logged once per REFUSAL_LOG_INTERVAL with a count, not once per attempt.
LINK_RETRY_MIN = 0.2
LINK_RETRY_MAX = 5.0
LINK_RETRY_JITTER = 0.25
LINK_STABLE = 10.0
# Tens of thousands of long-lived connection objects make every full (generation 2) garbage
# collection a pause of a few hundred ms, and each question's responses (held until the Core
# acknowledges them) promote enough objects to trigger one every few questions. Full collections
# are made rarer; young cyclic garbage is still collected as before.
GC_THRESHOLDS = (10_000, 20, 1_000)
# Refusals that an attacker (or a fleet at the open-file limit) can cause at line rate are logged
# once per interval with a count: agent connections refused at the descriptor limit, bad pokes,
# device answers refused for their content.
REFUSAL_LOG_INTERVAL = 10.0
CLOSE_LOG_KINDS = 64  # kinds of close reason logged apart; more are logged as 'other'
POKE_TIMEOUT = 5.0
AT_LIMIT = ("each is reset at once: raise the open-file limit (ulimit -n; fs.file-max for ENFILE) "
            "or add Switches")
# Memory freed after a flood (connections refused or dropped by the thousand) goes back to the
# system once this much of the C heap is free; checked every MEMORY_CHECK seconds.
RELEASE_FREE_BYTES = 64 << 20
MEMORY_CHECK = 10.0
WEBSOCKET_VERSION = "13"  # RFC 6455; picows also accepts the drafts' 7 and 8, the Switch does not


class AgentConnection(WSListener):
    __slots__ = ("switch", "transport", "device_id", "serial", "info", "peer", "seen", "_cn", "_hello_timer")

    def __init__(self, switch: Switch) -> None:
        self.switch = switch
        self.transport: WSTransport | None = None
        self.device_id: str | None = None
        self.serial = 0
        self._cn = ""
        self.info: p.DeviceInfo | None = None
        self.peer: tuple[Any, ...] = ("?", 0)  # (address, port): the transport's own tuple, not a copy
        self.seen = switch.tick  # the sweep tick of the last frame received
        self._hello_timer: asyncio.TimerHandle | None = None

    # picows callbacks -------------------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        # The upgrade's header dictionaries stay referenced by the transport for the connection's
        # life; nothing reads them after the upgrade, and they are ~2 KiB of every connection.
        transport.request.headers.clear()
        transport.response.headers.clear()
        under = transport.underlying_transport
        peer = under.get_extra_info("peername")
        self.peer = peer or ("?", 0)
        ssl_obj = under.get_extra_info("ssl_object")
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        if not der:  # cannot happen with CERT_REQUIRED, but never trust a path we did not test
            self.close(WSCloseCode.POLICY_VIOLATION, "no client certificate")
            return
        # once more here, not only in the handshake: a resumed TLS session skips verification
        self.serial, self._cn, refusal = peer_device(der)
        if refusal is not None:
            self.close(WSCloseCode.POLICY_VIOLATION, f"{refusal} (serial {self.serial:x})")
            return
        if self.serial in self.switch.revoked_serials:
            self.close(WSCloseCode.POLICY_VIOLATION, "certificate revoked")
            return
        self._hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT, self._hello_timeout)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.seen = self.switch.tick
        self.switch.frames_in += 1
        if frame.rsv1 or frame.rsv2 or frame.rsv3:  # no extension is negotiated (RFC 6455 §5.2)
            self.close(WSCloseCode.PROTOCOL_ERROR, "reserved bits set in a frame (no extension was negotiated)")
            return
        t = frame.msg_type
        if t is WSMsgType.BINARY:
            if not frame.fin:
                self.close(WSCloseCode.UNSUPPORTED_DATA, "fragmented messages are not accepted")
                return
            try:
                msg = p.decode_from_agent(frame.get_payload_as_memoryview())
            except p.ResponseRefused as e:  # one message refused, not the connection: see ResponseRefused
                if self.device_id is None:
                    self.close(WSCloseCode.PROTOCOL_ERROR, "response before hello")
                    return
                self.switch.refused_response(self, e)
                return
            except p.ProtocolError as e:
                self.close(WSCloseCode.PROTOCOL_ERROR, str(e))
                return
            if isinstance(msg, p.Response):
                if self.device_id is None:
                    self.close(WSCloseCode.PROTOCOL_ERROR, "response before hello")
                    return
                self.switch.on_response(self.device_id, msg, frame.payload_size)
            elif isinstance(msg, p.TagReport):
                if self.device_id is None:
                    self.close(WSCloseCode.PROTOCOL_ERROR, "tags before hello")
                    return
                self.switch.on_tags(self, msg, frame.payload_size)
            else:
                self.on_hello(msg)
        elif t is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        elif t is WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())
        elif t is WSMsgType.PONG:
            pass  # an answer to the sweep's ping: ``seen`` is stamped above
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
        # Held for the connection's life, so shared where the fleet repeats itself: the device id is
        # the certificate's CN object, the OS and agent version strings and an empty tag map are
        # one object per distinct value.
        self.device_id = self._cn
        share = self.switch.share
        self.info = p.DeviceInfo(device_id=self._cn, fqdn=hello.fqdn, os=share(hello.os),
                                 agent_version=share(hello.agent_version), tags=hello.tags or NO_TAGS,
                                 address=str(self.peer[0]))
        self.switch.on_hello(self)

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.send(WSMsgType.BINARY, data)
            self.switch.frames_out += 1

    def close(self, code: WSCloseCode, reason: str) -> None:
        self.switch.note_close(code, reason, f"from {self.peer[0]}:{self.peer[1]}, device "
                               f"{self.device_id or self._cn or '?'}: {reason}")
        if self.transport is not None:
            self.transport.send_close(code, p.close_reason(reason))
            self.transport.disconnect()

    def _hello_timeout(self) -> None:
        self._hello_timer = None
        if self.device_id is None:
            self.close(WSCloseCode.POLICY_VIOLATION, f"no hello within {HELLO_TIMEOUT:.0f}s")


class Switch:
    """One Switch process. ``name``/``host``/``port`` come from its SwitchConfiguration row."""

    def __init__(self, *, name: str, host: str, port: int, bind_host: str, pki: Pki, core_url: str,
                 secret: bytes | Credentials, max_message_bytes: int) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.bind_host = bind_host
        self.pki = pki
        self.core_url = core_url
        self.secret = secret
        self.max_message_bytes = max_message_bytes
        self.incarnation = uuid.uuid4().hex
        self.tick = 0  # advanced by the liveness sweep every SWEEP seconds
        self._common: dict[str, str] = {}  # one object per distinct OS / agent version string
        self.conns: dict[str, AgentConnection] = {}
        # Who is ready and who is given what: the pure rules (quanta.protocol.switch_state); this
        # class is the shell that turns their effects into frames.
        self.state = SwitchState()
        self._frames: dict[int, bytes] = {}  # instruction -> its Deliver frame, encoded once
        self._fanout = FanOut()  # the Delivers still to be written, a slice per loop turn (_pump)
        self._pump_handle: asyncio.Handle | None = None
        self.revoked_serials: set[int] = set()
        # What goes to the Core (devices on- and offline, answers in batches, deliveries) and the
        # acknowledgements owed to devices: the pure rules (quanta.protocol.switch_batches).
        self.batches = SwitchBatches(max_message_bytes)
        self._flush_wake = asyncio.Event()  # the flush may be due sooner than the flusher sleeps
        self._flushing = False  # the flusher is sending a flush's messages (see _flush_now)
        self._ack_wake = asyncio.Event()
        self._fetch = asyncio.Event()
        self._link: Any = None
        self._link_up = asyncio.Event()
        self._tls: ssl.SSLContext | None = None
        self._tickets: TicketKeys | None = None
        self._crl_mtime = 0.0
        self.stats = {"connects": 0, "responses": 0, "closed_bad_input": 0, "refused_responses": 0}
        # read by quanta.metrics.SwitchCollector when /metrics is scraped; plain ints on the hot path
        self.frames_in = 0
        self.frames_out = 0
        self.closes: Counter[str] = Counter()  # connections closed by the Switch, by close code
        self._close_logs: dict[str, LogEvery] = {}  # one rate-limited log per kind of reason
        self._batch_sent: dict[int, float] = {}  # batch id -> when it went to the Core
        self.refused = LogEvery(log, REFUSAL_LOG_INTERVAL, "agent connections refused")
        self.bad_pokes = LogEvery(log, REFUSAL_LOG_INTERVAL, "poke refused")
        self.refused_answers = LogEvery(log, REFUSAL_LOG_INTERVAL, "device answer refused")
        self.link_failures = LogEvery(log, REFUSAL_LOG_INTERVAL, "core link down")
        self._link_failed = 0  # attempts failed since the last link
        self._link_bug: str | None = None  # the unexpected failure last logged with its traceback

    # ------------------------------------------------------------------ TLS / CRL
    def _build_context(self) -> ssl.SSLContext:
        ctx = self.pki.server_context(require_client_cert=True)
        lean_tls(ctx)
        return ctx

    def _load_revoked(self) -> None:
        crl = x509.load_pem_x509_crl(self.pki.crl.read_bytes())
        self.revoked_serials = {r.serial_number for r in crl}

    def reload_crl(self) -> None:
        """Apply a new CRL without a restart: to handshakes, to new connections and to live ones.

        The CRL is added to the live context's certificate store, where OpenSSL checks a client
        certificate against the issuer's CRL with the latest ``thisUpdate`` (``Pki.write_crl`` makes
        each one later than the last). Every new connection is also checked against the revoked
        serials before its first frame is read (``on_ws_connected``), and live connections of
        newly revoked devices are closed here.
        """
        self._crl_mtime = self.pki.crl.stat().st_mtime
        if self._tls is not None:
            self._tls.load_verify_locations(cafile=str(self.pki.crl))
        self._load_revoked()
        for conn in list(self.conns.values()):
            if conn.serial in self.revoked_serials:
                conn.close(WSCloseCode.POLICY_VIOLATION, "certificate revoked")
        log.info("CRL loaded: %d revoked certificates", len(self.revoked_serials))

    def share(self, value: str) -> str:
        """The one object for a value many devices report (bounded: a device names its own OS)."""
        got = self._common.get(value)
        if got is None:
            if len(self._common) >= 4096:
                return value
            got = self._common[value] = value
        return got

    def sweep(self) -> None:
        """One liveness pass: ping the quiet connections, close the silent ones."""
        self.tick += 1
        for conn in list(self.conns.values()):
            idle = self.tick - conn.seen
            if idle >= STALE_TICKS:
                conn.close(WSCloseCode.GOING_AWAY, f"no traffic for {idle * SWEEP:.0f}s")
            elif idle >= 2 and conn.transport is not None and not conn.transport.is_disconnected:
                conn.transport.send_ping()

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP)
            self.sweep()
            if self._tickets is not None:
                self._tickets.refresh()

    async def _release_memory(self) -> None:
        heap = HeapReleaser(RELEASE_FREE_BYTES)
        while True:
            await asyncio.sleep(MEMORY_CHECK)
            released = heap.check()
            if released is not None:
                log.info("returned %.0f MiB of freed memory to the system (%d connections)",
                         released / (1 << 20), len(self.conns))

    async def _watch_crl(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                if self.pki.crl.stat().st_mtime != self._crl_mtime:
                    self.reload_crl()
            except Exception:
                log.exception("could not reload the CRL; keeping the previous one")

    # ------------------------------------------------------------------ agent events
    def note_close(self, code: WSCloseCode, reason: str, detail: str) -> None:
        """A connection this Switch closes: counted by close code, and logged once per interval per kind
        of reason (the text before any detail), so a flood of bad connections is a few lines, not one each."""
        self.closes[code.name] += 1
        kind = reason.split("(")[0].split(":")[0].strip()[:60] or code.name
        logger = self._close_logs.get(kind)
        if logger is None:
            if len(self._close_logs) >= CLOSE_LOG_KINDS:
                kind, logger = "other", self._close_logs.setdefault(
                    "other", LogEvery(log, REFUSAL_LOG_INTERVAL, "closing agent connection"))
            else:
                logger = self._close_logs[kind] = LogEvery(log, REFUSAL_LOG_INTERVAL, "closing agent connection")
        logger.note(kind, detail)

    def on_hello(self, conn: AgentConnection) -> None:
        assert conn.device_id is not None and conn.info is not None
        old = self.conns.get(conn.device_id)
        if old is not None and old is not conn:
            old.device_id = None  # its disconnect must not unregister the new connection
            old.close(WSCloseCode.POLICY_VIOLATION, "replaced by a newer connection of the same device")
        self.conns[conn.device_id] = conn
        self.stats["connects"] += 1
        conn.send(p.encode(p.Welcome(switch=self.name, heartbeat_seconds=HEARTBEAT,
                                     max_message_bytes=self.max_message_bytes)))
        # A new connection: nothing is delivered to it until the Core has said which active
        # instructions this device already answered (OnlineAck; see SwitchState).
        self.state.hello(conn.device_id)
        if self.batches.device_online(conn.info, time.monotonic()):
            self._flush_wake.set()

    def on_disconnected(self, conn: AgentConnection) -> None:
        dev = conn.device_id
        if dev is not None and self.conns.get(dev) is conn:
            del self.conns[dev]
            self.state.gone(dev)
            if self.batches.device_offline(dev, time.monotonic()):
                self._flush_wake.set()

    def _announce(self, infos: list[p.DeviceInfo]) -> p.DevicesOnline:
        """The DevicesOnline for these devices, numbered: each waits for its OnlineAck."""
        return p.DevicesOnline(devices=infos, seq=self.state.announce(i.device_id for i in infos))

    def on_online_ack(self, ack: p.OnlineAck) -> None:
        """The Core's word on the devices of one announcement: close the refused, deliver the rest
        what is due."""
        self._apply(self.state.online_ack(ack.seq, ack.answered, ack.refused))

    def _apply(self, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, DeliverTo):
                self._fanout.add(e)  # written by _pump, FANOUT_SLICE per loop turn
            elif isinstance(e, CancelTo):
                frame = p.encode(p.Cancel(instruction_ids=[e.instruction_id]))
                for dev in e.devices:
                    conn = self.conns.get(dev)
                    if conn is not None:
                        conn.send(frame)
            else:
                for dev in e.devices:
                    conn = self.conns.get(dev)
                    if conn is not None:
                        conn.close(WSCloseCode.POLICY_VIOLATION, "device refused by the core: not enrolled, or revoked")
        if self._fanout and self._pump_handle is None:
            self._pump()

    def _pump(self) -> None:
        """Write the next FANOUT_SLICE Deliver frames (quanta.protocol.switch_state.FanOut), and
        again on the next turn of the loop while some are left, so that what arrived meanwhile
        (the first answers above all) is read in between. An instruction cancelled or ended
        meanwhile has no frame any more, and its remaining devices are not given it."""
        self._pump_handle = None
        now = time.monotonic()
        conns = self.conns
        ms = metrics.switch_milestones
        for iid, devices, first, _last in self._fanout.take(FANOUT_SLICE, self._frames):
            frame = self._frames[iid]
            if first:
                ms.mark(iid, "first_deliver")
            sent = []
            for dev in devices:
                conn = conns.get(dev)
                if conn is not None:
                    conn.send(frame)
                    sent.append(dev)
            if sent:
                ms.again(iid, "last_deliver")
                # their 'sent' is reported DELIVERED_HOLD later, unless they answer first
                if self.batches.delivered(iid, sent, now):
                    self._flush_wake.set()
        if self._fanout:
            self._pump_handle = asyncio.get_running_loop().call_soon(self._pump)

    def on_tags(self, conn: AgentConnection, report: p.TagReport, size: int) -> None:
        """A device's tags changed: kept as its connection's (a relink announces them), and reported
        to the Core coalesced (see SwitchBatches.tags_changed: at most once a second per device)."""
        assert conn.info is not None
        conn.info = msgspec.structs.replace(conn.info, tags=report.tags or NO_TAGS)
        if self.batches.tags_changed(conn.info, size, time.monotonic()):
            self._flush_wake.set()

    def on_response(self, device_id: str, resp: p.Response, size: int) -> None:
        ms = metrics.switch_milestones
        if resp.instruction_id == ms.instruction_id:
            now = time.time()
            ms.mark(resp.instruction_id, "first_answer", now)
            ms.again(resp.instruction_id, "last_answer", now)
        self.state.answered(device_id, resp.instruction_id)
        self.stats["responses"] += 1
        if self.batches.answered(device_id, resp, size, time.monotonic()) and not self._flush_now():
            self._flush_wake.set()

    def refused_response(self, conn: AgentConnection, refused: p.ResponseRefused) -> None:
        """A device's answer that does not fit the protocol's bounds: recorded as that device's
        ``error`` for the instruction (so it is final, acknowledged and never re-sent), and logged
        once per REFUSAL_LOG_INTERVAL with a count."""
        assert conn.device_id is not None
        self.stats["refused_responses"] += 1
        self.refused_answers.note("out of the protocol's bounds", f"device {conn.device_id} at {conn.peer[0]}:"
                                  f"{conn.peer[1]}, instruction {refused.response.instruction_id}: {refused.reason}")
        self.on_response(conn.device_id, refused.response, len(p.encode(refused.response)))

    # ------------------------------------------------------------------ core events
    def on_work(self, work: p.Work) -> None:
        for item in work.items:
            metrics.switch_milestones.start(item.id, "work")
            if item.id not in self._frames:
                self._frames[item.id] = p.encode(p.Deliver(instruction=item.instruction))
        effects = self.state.work(work.items, work.active, time.time())
        self._apply(effects)
        gone = [i for i in self._frames if i not in self.state]
        for iid in gone:
            del self._frames[iid]
        self.batches.ended(gone)
        for e in effects:
            if isinstance(e, DeliverTo):
                log.info("instruction %d: delivering to %d connected devices", e.instruction_id, len(e.devices))

    def on_batch_ack(self, ack: p.BatchAck) -> None:
        sent = self._batch_sent.pop(ack.batch_id, None)
        if sent is not None:
            metrics.switch_batch_latency.observe(time.monotonic() - sent)
        if self.batches.batch_acked(ack.batch_id, time.monotonic()):
            # answers gathered while the batch awaited its acknowledgement: left to the flusher, which
            # runs after the turn's other callbacks, so under load the next batch gathers what they
            # read too (flushing them here at once measured slower at 10,000 devices: smaller batches)
            self._flush_wake.set()
        if self.batches.acks_pending():
            self._ack_wake.set()

    async def _acker(self) -> None:
        """Send the ResponseAcks the Core's commits made due (see SwitchBatches.take_acks), ACK_SLICE
        per loop turn, once answers pause."""
        while True:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            while (due := self.batches.acks_at()) is not None:
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)  # answers first: see ACK_IDLE
                    continue
                for a in self.batches.take_acks(now, ACK_SLICE):
                    conn = self.conns.get(a.device_id)
                    if conn is not None:  # gone: its next connection sends the answer again
                        conn.send(p.encode(p.ResponseAck(instruction_ids=a.instruction_ids)))
                await asyncio.sleep(0)

    def on_cancel(self, cancel: p.Cancel) -> None:
        self._apply(self.state.cancel(cancel.instruction_ids))
        for iid in cancel.instruction_ids:
            self._frames.pop(iid, None)
        self.batches.ended(cancel.instruction_ids)

    # ------------------------------------------------------------------ core link
    async def _send_core(self, msg: Any) -> None:
        link = self._link
        if link is None:
            raise LinkClosed("no link to the core")
        link.send(p.encode(msg))
        await link.drained()

    def _to_core(self, e: sb.Effect) -> Any:
        if isinstance(e, SendBatch):
            return e.batch
        if isinstance(e, Announce):
            return self._announce(e.devices)
        if isinstance(e, ReportOffline):
            return p.DevicesOffline(device_ids=e.device_ids)
        if isinstance(e, ReportTags):
            return p.DeviceTags(devices=e.devices)
        assert isinstance(e, ReportDelivered), e
        return p.Delivered(instruction_id=e.instruction_id, device_ids=e.device_ids)

    async def _flusher(self) -> None:
        """Sleep until SwitchBatches has something due (``flush_at``), or an event may have made it
        due sooner (``_flush_wake``); flush only what is due. Nothing is due while the link is down,
        and an idle Switch does not wake."""
        while True:
            due = self.batches.flush_at()
            now = time.monotonic()
            if due is None or due > now:
                try:
                    await asyncio.wait_for(self._flush_wake.wait(), None if due is None else due - now)
                except asyncio.TimeoutError:
                    pass
                self._flush_wake.clear()
                continue
            self._flush_wake.clear()
            await self._flush_once()

    async def _flush_once(self) -> None:
        self._flushing = True
        try:
            for e in self.batches.flush(time.monotonic()):
                self._note_sent(e)
                await self._send_core(self._to_core(e))
        except LinkClosed:
            pass  # the unacknowledged batches go again on the next link (SwitchBatches.link_up)
        finally:
            self._flushing = False

    def _note_sent(self, e: sb.Effect) -> None:
        if isinstance(e, SendBatch):
            self._batch_sent.setdefault(e.batch.batch_id, time.monotonic())
            ms = metrics.switch_milestones
            latest = ms.instruction_id
            if any(r.response.instruction_id == latest for r in e.batch.responses):
                ms.mark(latest, "first_batch")
                ms.again(latest, "last_batch")

    def _flush_now(self) -> bool:
        """Flush what is due *in this turn of the event loop*, from the callback that made it due (an
        answer on an idle link: the first answers of a question; a full batch), rather than waking the
        flusher task: that wake runs only after every other callback of the turn, and with thousands of
        devices answering at once a turn reads hundreds of answers first (tens of ms; see
        docs/benchmarks.md, "where the first answer's time goes"). Done only when the link takes
        the messages at once (open, not paused by flow control, no send of the flusher's under way, so
        the order of the messages is the flush's own); True if flushed, False to leave it to the
        flusher."""
        link = self._link
        if self._flushing or link is None or not self._link_up.is_set() or not link.writable():
            return False
        now = time.monotonic()
        due = self.batches.flush_at()
        if due is None or due > now:
            return False
        for e in self.batches.flush(now):
            self._note_sent(e)
            link.send(p.encode(self._to_core(e)))
        return True

    async def _core_link(self) -> None:
        """Keep a link to the Core: dial, link, serve it until it drops, and dial again with
        back-off (see LINK_RETRY_MIN); the back-off starts again after a stable link."""
        while True:
            retrying = tenacity.AsyncRetrying(
                retry=tenacity.retry_if_exception_type(Exception),
                wait=tenacity.wait_exponential(multiplier=LINK_RETRY_MIN, min=LINK_RETRY_MIN, max=LINK_RETRY_MAX)
                + tenacity.wait_random(0, LINK_RETRY_JITTER),
                before_sleep=self._link_retry)
            async for attempt in retrying:
                with attempt:
                    await self._link_once()

    def _link_retry(self, rs: tenacity.RetryCallState) -> None:
        e = rs.outcome.exception() if rs.outcome is not None else None
        delay = rs.next_action.sleep if rs.next_action is not None else 0.0
        self._link_failed += 1
        reason = _link_reason(e)
        if e is not None and not isinstance(e, LINK_DOWN) and reason != self._link_bug:
            self._link_bug = reason  # a bug, not an outage: its traceback once, until the next link
            log.error("core link failed unexpectedly; linking again", exc_info=e)
        self.link_failures.note(reason, f"{self.core_url}; attempt {rs.attempt_number}, "
                                                 f"retrying in {delay:.1f}s")

    async def _link_once(self) -> None:
        """One link to the Core, until it drops. Returns after a link that stayed up LINK_STABLE
        seconds; raises (one of LINK_DOWN) after a failure or a short-lived link, to back off."""
        headers = {"Authorization": f"Bearer {credential(self.secret, SWITCH_TO_CORE)}"}
        tls = client_context(self.pki.ca_crt) if self.core_url.startswith("wss:") else None
        up_since: float | None = None
        try:
            transport, link = await asyncio.wait_for(ws_connect(  # the whole dial: TCP, TLS and upgrade
                lambda: CoreLink(self), self.core_url, ssl_context=tls,
                extra_headers=link_headers(self.pki.root, self.core_url, headers),
                max_frame_size=core_link_max_bytes(self.max_message_bytes), websocket_handshake_timeout=LINK_OPEN,
                enable_auto_ping=True, auto_ping_idle_timeout=LINK_PING_IDLE, auto_ping_reply_timeout=LINK_PING_REPLY),
                LINK_OPEN)
            assert isinstance(link, CoreLink)
            try:
                self._link = link
                link.send(p.encode(p.SwitchHello(name=self.name, host=self.host, port=self.port,
                                                 incarnation=self.incarnation)))
                # Work first: its ``active`` drops what ended while the link was down, before the
                # OnlineAck makes the devices ready (SwitchState gives nothing until it arrives).
                link.send(p.encode(p.FetchWork(known=[])))
                # Everyone again, and every connection waits for this announcement's OnlineAck:
                # acknowledgements of earlier ones were lost with the old link. Then the batches
                # not acknowledged (the Core dedups), after the announcement of their devices.
                # No await between the list and link_up, which drops what was gathered: a hello
                # after them is gathered anew.
                seq = self.state.relinked()
                everyone = p.DevicesOnline(devices=[c.info for c in self.conns.values() if c.info is not None],
                                           seq=seq)
                again = self.batches.link_up()
                link.send(p.encode(everyone))
                for e in again:
                    link.send(p.encode(e.batch))
                self._link_up.set()
                self._flush_wake.set()
                up_since = time.monotonic()
                failed, self._link_failed, self._link_bug = self._link_failed, 0, None
                log.info("linked to core at %s%s", self.core_url,
                         f" after {failed} failed attempts" if failed else "")
                await transport.wait_disconnected()
                raise link.why_closed()
            finally:
                self._link = None
                if not transport.is_disconnected:  # stopping (cancelled): say so to the Core
                    transport.send_close(WSCloseCode.GOING_AWAY, b"switch stopping")
                    transport.disconnect()
        except LINK_DOWN:
            if up_since is not None and time.monotonic() - up_since >= LINK_STABLE:
                log.warning("core link down (%s); linking again", _link_reason(sys.exc_info()[1]))
                return  # a fresh back-off
            raise
        finally:
            self._link_up.clear()
            self.batches.link_lost()

    async def _fetcher(self) -> None:
        while True:
            await self._fetch.wait()
            self._fetch.clear()
            await self._link_up.wait()
            try:
                await self._send_core(p.FetchWork(known=self.state.active_ids()))
            except LinkClosed:
                pass

    # ------------------------------------------------------------------ poke port
    async def _on_poke(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        try:
            problem = await self._read_poke(reader)
        finally:
            writer.close()
        if problem is None:
            self._fetch.set()
        else:
            self.bad_pokes.note(problem, f"from {peer[0]}:{peer[1]}")

    async def _read_poke(self, reader: asyncio.StreamReader) -> str | None:
        """Read one poke: None if it is good, else what is wrong with it."""
        try:
            data = await asyncio.wait_for(reader.readexactly(p.POKE_SIZE), POKE_TIMEOUT)
        except asyncio.IncompleteReadError as e:
            return f"wrong size ({len(e.partial)} bytes)" if e.partial else "closed without a poke"
        except asyncio.TimeoutError:
            return f"incomplete after {POKE_TIMEOUT:.0f}s"
        except OSError as e:
            return f"connection error ({e.strerror or e})"
        return p.poke_problem(poke_key(self.secret), data)

    # ------------------------------------------------------------------ run
    async def serve(self, stop: asyncio.Event) -> None:
        gc.set_threshold(*GC_THRESHOLDS)
        self._tls = self._build_context()
        self._tls.num_tickets = 1  # an agent offers only its latest ticket
        self._tickets = TicketKeys(self._tls, self.pki.root / "ticket.secret")
        self._tickets.refresh()
        self.reload_crl()
        pokes = poke_port(self.port)
        # At the open-file limit the agent port refuses what it cannot take (see SheddingListener).
        # The poke port is uvloop's (libuv keeps a spare descriptor for the same purpose).
        client_sock = SheddingListener.adopt(bind_socket(self.bind_host, self.port, "switch"),
                                             lambda reason: self.refused.note(reason, AT_LIMIT))
        poke_sock = bind_socket(self.bind_host, pokes, "poke")
        server = await ws_create_server(
            self._upgrade, sock=client_sock, backlog=LISTEN_BACKLOG, ssl=self._tls, use_aiofastnet=True,
            max_frame_size=self.max_message_bytes, read_buffer_init_size=1024,
            enable_auto_ping=False, enable_auto_pong=False,  # liveness: see SWEEP
            websocket_handshake_timeout=UPGRADE_TIMEOUT, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        poke_server = await asyncio.start_server(self._on_poke, sock=poke_sock, backlog=LISTEN_BACKLOG)
        log.info("switch %s listening: wss %s:%d (agents), poke tcp %s:%d (core)", self.name, self.bind_host,
                 self.port, self.bind_host, pokes)
        tasks = [asyncio.create_task(c) for c in (self._core_link(), self._flusher(), self._fetcher(), self._acker(),
                                                   self._watch_crl(), self._sweeper(), self._release_memory())]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            if self._pump_handle is not None:
                self._pump_handle.cancel()
            server.close()
            poke_server.close()
            self.refused.close()
            self.bad_pokes.close()
            self.refused_answers.close()
            self.link_failures.close()
            for conn in list(self.conns.values()):
                conn.close(WSCloseCode.GOING_AWAY, "switch stopping")

    def _upgrade(self, request: WSUpgradeRequest) -> AgentConnection | WSUpgradeResponseWithListener:
        """The listener for a WebSocket upgrade, or its refusal (RFC 6455 §4.4: version 13 only)."""
        versions = request.headers.getall("Sec-WebSocket-Version", [])
        if versions != [WEBSOCKET_VERSION]:
            log.warning("upgrade refused: Sec-WebSocket-Version %s (this Switch speaks %s only)",
                        ", ".join(repr(v) for v in versions) or "missing", WEBSOCKET_VERSION)
            refusal = WSUpgradeResponse.create_error_response(
                HTTPStatus.UPGRADE_REQUIRED, b"unsupported WebSocket version",
                {"Sec-WebSocket-Version": WEBSOCKET_VERSION})
            return WSUpgradeResponseWithListener(refusal, None)
        return AgentConnection(self)


class LinkClosed(ConnectionError):
    """The link to the Core is closed (by the Core, the network, or this end)."""


LINK_OPEN = 10.0  # seconds for a dial of the Core (TCP connect, TLS and the WebSocket upgrade)
LINK_PING_IDLE = 20.0  # seconds without a frame from the Core before the link pings it
LINK_PING_REPLY = 20.0  # seconds the Core has to answer that ping before the link is dropped


class CoreLink(WSListener):
    """The Switch's end of its link to the Core (a picows client connection, like the agents' on the
    other side): decodes the Core's messages into the Switch's ``on_*`` handlers as frames arrive,
    sends at once (``send``), and follows the transport's flow control (``pause_writing`` /
    ``resume_writing``) so that a caller can tell whether a message goes out without waiting
    (``writable``) and wait for the drain (``drained``). A frame the protocol does not allow ends
    the link with the reason kept for ``why_closed``."""

    def __init__(self, switch: Switch) -> None:
        self.switch = switch
        self.transport: WSTransport | None = None
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._error: BaseException | None = None
        self._closed = False
        self._close_from_core: tuple[Any, str] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._closed = True
        self._resumed.set()  # a drain waiter sees the closed link

    def pause_writing(self) -> None:
        self._resumed.clear()

    def resume_writing(self) -> None:
        self._resumed.set()

    def writable(self) -> bool:
        """A message sent now goes out without waiting: open, not paused by flow control."""
        return not self._closed and self._resumed.is_set()

    def send(self, data: bytes) -> None:
        if self._closed or self.transport is None:
            raise LinkClosed("the link to the core is closed")
        self.transport.send(WSMsgType.BINARY, data)

    async def drained(self) -> None:
        """Wait until the transport takes more (at once when not paused); LinkClosed if it closed."""
        await self._resumed.wait()
        if self._closed:
            raise LinkClosed("the link to the core is closed")

    def _fail(self, code: WSCloseCode, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if self.transport is not None:
            self.transport.send_close(code, p.close_reason(str(error)))
            self.transport.disconnect()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        t = frame.msg_type
        if t is WSMsgType.BINARY:
            if not frame.fin:
                self._fail(WSCloseCode.UNSUPPORTED_DATA, p.ProtocolError("fragmented message from core"))
                return
            try:
                msg = p.decode_from_core(frame.get_payload_as_memoryview())
            except p.ProtocolError as e:
                self._fail(WSCloseCode.PROTOCOL_ERROR, e)
                return
            sw = self.switch
            try:
                if isinstance(msg, p.Work):
                    sw.on_work(msg)
                elif isinstance(msg, p.BatchAck):
                    sw.on_batch_ack(msg)
                elif isinstance(msg, p.Cancel):
                    sw.on_cancel(msg)
                elif isinstance(msg, p.OnlineAck):
                    sw.on_online_ack(msg)
            except Exception as e:  # a bug, not the Core's fault: the back-off logs its traceback once
                self._fail(WSCloseCode.INTERNAL_ERROR, e)
        elif t is WSMsgType.CLOSE:
            self._close_from_core = (frame.get_close_code(), frame.get_close_message().decode("utf-8", "replace"))
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        elif t is WSMsgType.PONG:
            pass  # unsolicited: picows answers pings (auto-pong) and takes the pongs of its own pings
        else:
            self._fail(WSCloseCode.UNSUPPORTED_DATA, p.ProtocolError(f"{t.name.lower()} frame from core"))

    def why_closed(self) -> BaseException:
        """Why the link ended: the protocol error this end found, the Core's close, or the network."""
        if self._error is not None:
            return self._error
        if self._close_from_core is not None:
            code, reason = self._close_from_core
            return LinkClosed(f"closed by the core ({int(code)}: {reason or 'no reason'})")
        return LinkClosed("the connection to the core was lost")


LINK_DOWN = (OSError, WSError, asyncio.TimeoutError, p.ProtocolError)


def _link_reason(e: BaseException | None) -> str:
    """A failed link's cause in a few words: the first line of the error (the count in the
    rate-limited log line is by this)."""
    if e is None:
        return "unknown"
    text = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def pid_file(root: Path, name: str) -> Path:
    return root / "run" / f"{name}.pid"


def write_pid(root: Path, name: str) -> None:
    f = pid_file(root, name)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(str(os.getpid()))
