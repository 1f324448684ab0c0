"""The data plane's pure classes composed, in memory, with no sockets: real ``AgentSession``s over
journals that survive (or not) a crash, a Switch made of ``SwitchState`` and ``SwitchBatches``,
and a Core made of ``CoreLedger`` over a "database" (dicts this test keeps). Between them, every
message is encoded and decoded with the real codec and travels on FIFO connections (as TCP
does), advanced in random interleavings; a connection or link that drops loses what was in flight
(the Core may still receive a prefix of what a dying link carried).

Hypothesis drives: issues of questions and actions, deliveries in any interleaving, duplicates
(agents resend, Switches resend batches), reconnects, dropped connections and links, agent crashes
with the state rebuilt from the journal (or the journal lost), Switch crashes (state rebuilt from
nothing, devices and link reconnect), Core restarts (ledger rebuilt from the database), windows
closing, cancels, and hostile input: an unenrolled device with a valid certificate, garbage
frames, a hello for another device, answers out of the protocol's bounds, answers for unknown or
untargeted instructions.

Invariants: each instruction runs at most once per device for each life of its journal, and never
once its answer is committed (journal lost included: the Switch is told what was answered); each
answer is committed at most once and is one that device sent; a device is acknowledged only
answers the Core committed or held; the ledger's live count equals the database's; ended counts
never change; no row for any device that is not targeted. At the end everything is healed and
run to quiescence: every targeted device that could answer has exactly one committed answer, and
once the windows close every targeted device is in exactly one final state."""

from __future__ import annotations

import os
from collections import Counter, deque
from dataclasses import dataclass, field

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from quanta import protocol as p
from quanta.agent.journal import MemoryStore
from quanta.protocol.agent_session import (RESEND_AFTER, Acked, AgentSession, Backoff, Close, Entry, Judged, Run,
                                          Send, State, Stop)
from quanta.protocol.core_ledger import ALL_ANSWERED, LATE, REFUSED, WINDOW_CLOSED, CoreLedger, Finish, Recount
from quanta.protocol.switch_batches import (ACK_MAX_DELAY, DELIVERED_HOLD, AckDevice, Announce, ReportDelivered,
                                            ReportOffline, SendBatch, SwitchBatches)
from quanta.protocol.switch_state import CancelTo, DeliverTo, Refuse, SwitchState
from quanta.signing import Signer, Verifier

T0 = 1_800_000_000.0
EXPIRES = T0 + 10**6  # windows close only when a rule closes them
AGENTS = ["d0", "d1", "d2"]
ABSENT = "d9"  # enrolled, never connected: its instructions stay active until their window closes
ENROLLED = [*AGENTS, ABSENT]
GHOST = "ghost"  # a certificate of the CA, never enrolled
SWITCH = "sw"
MAX_MESSAGE = 1 << 20
ANSWER_STATES = ("success", "nocontent", "error", "notapplicable")
OPEN_STATES = ("pending", "sent", "offline")
TO_STATE = {"success": "success", "nocontent": "nocontent", "error": "error", "notapplicable": "notapplicable",
            "notimplemented": "notapplicable"}
_ENC = msgspec.msgpack.Encoder()
_ENTRY = msgspec.msgpack.Decoder(Entry)


def _keys() -> tuple[Signer, Verifier]:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return Signer(pem), Verifier(pub)


SIGNER, VERIFIER = _keys()


# ============================================================================ the agent's journal
class Journal(MemoryStore):
    """The agent's journal as its file behaves: entries live in memory (mutated in place, as
    FileStore's are), and only what was ``put`` survives a crash."""

    __slots__ = ("disk",)

    def __init__(self) -> None:
        super().__init__()
        self.disk: dict[int, bytes] = {}

    def put(self, entry: Entry) -> None:
        super().put(entry)
        self.disk[entry.instruction_id] = _ENC.encode(entry)

    def remove(self, instruction_ids: list[int]) -> None:
        super().remove(instruction_ids)
        for i in instruction_ids:
            self.disk.pop(i, None)

    def reopened(self) -> Journal:
        j = Journal()
        j.disk = dict(self.disk)
        j.entries = {i: _ENTRY.decode(b) for i, b in self.disk.items()}
        return j


# ============================================================================ connections
class Conn:
    """One agent connection: FIFO both ways; closing it loses what is in flight."""

    _n = 0

    def __init__(self, cert: str) -> None:
        Conn._n += 1
        self.n = Conn._n
        self.cert = cert  # the device its certificate names
        self.device: str | None = None  # set by the Switch at its hello
        self.up: deque[bytes] = deque()  # agent -> Switch
        self.down: deque[bytes] = deque()  # Switch -> agent
        self.open = True


class Link:
    def __init__(self) -> None:
        self.to_core: deque[bytes] = deque()
        self.to_switch: deque[bytes] = deque()


@dataclass
class Agent:
    name: str
    journal: Journal
    session: AgentSession
    life: int = 0  # the journal's life: a new one each time it is lost
    conn: Conn | None = None
    running: list[int] = field(default_factory=list)


# ============================================================================ the "database"
@dataclass
class Database:
    instructions: dict[int, dict] = field(default_factory=dict)  # id -> item, kind, status, targets
    results: dict[tuple[int, str], str] = field(default_factory=dict)  # (instruction, device) -> state
    answers: dict[tuple[int, str], p.Response] = field(default_factory=dict)  # committed content
    commits: Counter = field(default_factory=Counter)
    held: list[tuple[str, int, str]] = field(default_factory=list)  # (kind, instruction, device)
    online: dict[str, str | None] = field(default_factory=dict)  # device -> its Switch, None: offline
    last_switch: dict[str, str] = field(default_factory=dict)

    def unanswered(self, iid: int) -> int:
        return sum(1 for (i, _), s in self.results.items() if i == iid and s not in ANSWER_STATES)

    def counts(self, iid: int) -> dict[str, int]:
        return dict(Counter(s for (i, _), s in self.results.items() if i == iid))

    def ingest(self, answers: list[p.DeviceResponse]) -> dict[int, int]:
        """store.ingest_counted: only a row still open moves (a duplicate, a late answer, an
        untargeted device change nothing)."""
        moved: dict[int, int] = {}
        for a in answers:
            key = (a.response.instruction_id, a.device_id)
            moved.setdefault(key[0], 0)
            if self.results.get(key) in OPEN_STATES:
                self.results[key] = TO_STATE[a.response.status]
                self.answers[key] = a.response
                self.commits[key] += 1
                moved[key[0]] += 1
        return moved

    def expire(self, iid: int) -> None:
        for key, s in self.results.items():
            if key[0] == iid and s in ("pending", "sent"):
                self.results[key] = "expired"

    def mark_sent(self, iid: int, devices: list[str]) -> None:
        for d in devices:
            if self.results.get((iid, d)) in ("pending", "offline"):
                self.results[(iid, d)] = "sent"

    def answered_by_device(self, iids: list[int], devices: list[str]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for d in devices:
            got = [i for i in iids if self.results.get((i, d)) in ANSWER_STATES]
            if got:
                out[d] = got
        return out


# ============================================================================ the Core's shell
class CoreShell:
    """quanta.core.service.Core reduced to its rules: the ledger decides, the dicts are written."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.ledger = CoreLedger()
        self.link: Link | None = None
        self.link_devices: set[str] = set()
        self.ended: dict[int, dict[str, int]] = {}  # counts of each instruction this Core ended

    def start(self) -> None:
        effects: list[Finish | Recount] = []
        for iid, ins in self.db.instructions.items():
            if ins["status"] == "active":
                self.ledger.open(ins["item"], None)
                effects += self.ledger.recounted(iid, self.db.unanswered(iid))
        self._apply(effects)

    def send(self, msg: object) -> None:
        if self.link is not None:
            self.link.to_switch.append(p.encode(msg))

    # ------------------------------------------------------------ issuing
    def issue(self, iid: int, kind: str, scope: list[str] | None) -> None:
        body = p.encode_body(p.InstructionBody(id=iid, name=f"i{iid}", kind=kind, payload="x", parameters={},  # type: ignore[arg-type]
                                               issued_at=T0, expires_at=EXPIRES))
        item = p.WorkItem(instruction=p.SignedInstruction(body=body, signature=SIGNER.sign(body)), id=iid,
                          expires_at=EXPIRES, devices=scope)
        targets = [d for d in ENROLLED if scope is None or d in scope]  # store.target_devices: enrolled only
        for d in targets:
            self.db.results[(iid, d)] = "pending" if self.db.online.get(d) else "offline"
        self.db.instructions[iid] = dict(item=item, kind=kind, status="active", targets=set(targets))
        self.ledger.open(item, len(targets))
        if not targets:
            self.finish(iid, "no devices in scope")
        else:  # the poke: the Switch fetches (here: the work pushed over the link, as when a poke fails)
            self.send(p.Work(items=[item], active=list(self.ledger)))

    def finish(self, iid: int, why: str, status: str = "finished") -> bool:
        if not self.ledger.close(iid):
            if self.db.instructions[iid]["status"] != "active":
                return False
        self.db.expire(iid)
        self.db.instructions[iid]["status"] = status
        self.ended[iid] = self.db.counts(iid)
        self.send(p.Cancel(instruction_ids=[iid]))
        return True

    def _apply(self, effects: list[Finish | Recount]) -> None:
        for e in effects:
            if isinstance(e, Recount):
                self._apply(self.ledger.recounted(e.instruction_id, self.db.unanswered(e.instruction_id)))
            else:
                assert e.why != ALL_ANSWERED or self.db.unanswered(e.instruction_id) == 0
                self.finish(e.instruction_id, e.why)

    # ------------------------------------------------------------ the Switch's link
    def switch_connected(self, link: Link) -> None:
        self.link = link
        self.link_devices = set()
        self._switch_offline()

    def switch_disconnected(self) -> None:
        self.link = None
        self.link_devices = set()
        self._switch_offline()

    def _switch_offline(self) -> None:
        for d, sw in self.db.online.items():
            if sw == SWITCH:
                self.db.online[d] = None

    def handle(self, data: bytes) -> None:
        msg = p.decode_from_switch(data)
        if isinstance(msg, p.SwitchHello):
            pass  # the link's first message (switch_connected)
        elif isinstance(msg, p.DevicesOnline):
            refused = [i.device_id for i in msg.devices if i.device_id not in ENROLLED]
            ids = [i.device_id for i in msg.devices if i.device_id in ENROLLED]
            for d in ids:
                self.db.online[d] = self.db.last_switch[d] = SWITCH
            self.link_devices.update(ids)
            answered = self.db.answered_by_device(list(self.ledger), ids) if len(self.ledger) and ids else {}
            if msg.seq:
                self.send(p.OnlineAck(seq=msg.seq, answered=answered, refused=refused))
        elif isinstance(msg, p.DevicesOffline):
            self.link_devices.difference_update(msg.device_ids)
            for d in msg.device_ids:
                if self.db.online.get(d) == SWITCH:
                    self.db.online[d] = None
        elif isinstance(msg, p.FetchWork):
            known = set(msg.known)
            self.send(p.Work(items=[w for i, w in self.ledger.items() if i not in known], active=list(self.ledger)))
        elif isinstance(msg, p.Delivered):
            # Only for an active instruction: a report that crossed the instruction's end would
            # turn a final 'offline' into 'sent' (store.mark_sent moves offline -> sent). This test
            # found it; quanta.core.service.Core.handle needs the same check.
            if msg.instruction_id in self.ledger:
                self.db.mark_sent(msg.instruction_id, msg.device_ids)
        elif isinstance(msg, p.ResponseBatch):
            self.ingest(msg)
        else:
            raise AssertionError(f"unexpected {msg!r}")

    def ingest(self, batch: p.ResponseBatch) -> None:
        answers = batch.responses
        strangers = self.ledger.strangers(answers, self.link_devices)
        refused_devices = {d for d in strangers if self.db.last_switch.get(d) != SWITCH}
        others = self.ledger.not_active(answers)
        statuses = {i: self.db.instructions[i]["status"] for i in others if i in self.db.instructions}
        out = self.ledger.sort(answers, link=SWITCH, refused_devices=refused_devices, statuses=statuses)
        for h in out.held:
            assert h.kind in (LATE, REFUSED)
            self.db.held.append((h.kind, h.answer.response.instruction_id, h.answer.device_id))
        moved = self.db.ingest(out.count)
        self.send(p.BatchAck(batch_id=batch.batch_id))  # committed: only now may the Switch forget them
        self._apply(self.ledger.committed(moved))


# ============================================================================ the Switch's shell
class SwitchShell:
    """quanta.switch.service.Switch reduced to its rules: SwitchState and SwitchBatches decide."""

    def __init__(self, plane: Plane) -> None:
        self.plane = plane
        self.state = SwitchState()
        self.batches = SwitchBatches(MAX_MESSAGE)
        self.conns: dict[str, Conn] = {}
        self.frames: dict[int, bytes] = {}
        self.link: Link | None = None

    @property
    def now(self) -> float:
        return self.plane.now

    def send(self, conn: Conn, msg: object) -> None:
        if conn.open:
            conn.down.append(p.encode(msg))

    # ------------------------------------------------------------ agents
    def on_frame(self, conn: Conn, data: bytes) -> None:
        try:
            msg = p.decode_from_agent(data)
        except p.ResponseRefused as e:  # one message refused: recorded as the device's error
            if conn.device is None:
                self.plane.drop(conn, "response before hello")
            else:
                self.on_response(conn.device, e.response, len(p.encode(e.response)))
            return
        except p.ProtocolError:
            self.plane.drop(conn, "malformed")
            return
        if isinstance(msg, p.Response):
            if conn.device is None:
                self.plane.drop(conn, "response before hello")
            else:
                self.on_response(conn.device, msg, len(data))
        elif conn.device is not None:
            self.plane.drop(conn, "second hello")
        elif msg.device_id != conn.cert:
            self.plane.drop(conn, "hello for another device")
        else:
            self.on_hello(conn, msg)

    def on_hello(self, conn: Conn, hello: p.Hello) -> None:
        dev = conn.device = conn.cert
        old = self.conns.get(dev)
        if old is not None and old is not conn:
            old.device = None  # its disconnect must not unregister the new connection
            self.plane.drop(old, "replaced")
        self.conns[dev] = conn
        self.send(conn, p.Welcome(switch=SWITCH, heartbeat_seconds=60, max_message_bytes=MAX_MESSAGE))
        self.state.hello(dev)
        self.batches.device_online(p.DeviceInfo(device_id=dev, fqdn=hello.fqdn, os=hello.os,
                                                agent_version=hello.agent_version), self.now)

    def on_disconnected(self, conn: Conn) -> None:
        dev = conn.device
        if dev is not None and self.conns.get(dev) is conn:
            del self.conns[dev]
            self.state.gone(dev)
            self.batches.device_offline(dev, self.now)

    def on_response(self, dev: str, resp: p.Response, size: int) -> None:
        self.plane.sent_answers.setdefault((resp.instruction_id, dev), []).append(resp)
        self.state.answered(dev, resp.instruction_id)
        self.batches.answered(dev, resp, size, self.now)

    def apply(self, effects: list) -> None:  # type: ignore[type-arg]
        for e in effects:
            if isinstance(e, DeliverTo):
                sent = []
                for d in e.devices:
                    conn = self.conns.get(d)
                    if conn is not None:
                        conn.down.append(self.frames[e.instruction_id])
                        sent.append(d)
                if sent:
                    self.batches.delivered(e.instruction_id, sent, self.now)
            elif isinstance(e, CancelTo):
                for d in e.devices:
                    conn = self.conns.get(d)
                    if conn is not None:
                        self.send(conn, p.Cancel(instruction_ids=[e.instruction_id]))
            else:
                assert isinstance(e, Refuse)
                for d in e.devices:
                    assert d not in ENROLLED, f"the Core refused enrolled device {d}"
                    conn = self.conns.get(d)
                    if conn is not None:
                        self.plane.drop(conn, "refused by the core")

    # ------------------------------------------------------------ the Core
    def link_up(self, link: Link) -> None:
        self.link = link
        link.to_core.append(p.encode(p.SwitchHello(name=SWITCH, host="h", port=1, incarnation="x")))
        link.to_core.append(p.encode(p.FetchWork(known=[])))
        seq = self.state.relinked()
        infos = [p.DeviceInfo(device_id=d, fqdn=d, os="", agent_version="") for d in self.conns]
        link.to_core.append(p.encode(p.DevicesOnline(devices=infos, seq=seq)))
        for e in self.batches.link_up():
            link.to_core.append(p.encode(e.batch))

    def link_lost(self) -> None:
        self.link = None
        self.batches.link_lost()

    def on_core(self, data: bytes) -> None:
        msg = p.decode_from_core(data)
        if isinstance(msg, p.Work):
            for item in msg.items:
                self.frames.setdefault(item.id, p.encode(p.Deliver(instruction=item.instruction)))
            self.apply(self.state.work(msg.items, msg.active, self.now))
            gone = [i for i in self.frames if i not in self.state]
            for iid in gone:
                del self.frames[iid]
            self.batches.ended(gone)
        elif isinstance(msg, p.BatchAck):
            self.batches.batch_acked(msg.batch_id, self.now)
        elif isinstance(msg, p.Cancel):
            self.apply(self.state.cancel(msg.instruction_ids))
            for iid in msg.instruction_ids:
                self.frames.pop(iid, None)
            self.batches.ended(msg.instruction_ids)
        else:
            assert isinstance(msg, p.OnlineAck)
            self.apply(self.state.online_ack(msg.seq, msg.answered, msg.refused))

    def timers(self) -> None:
        """What the shell's flusher and acker do when their time comes."""
        due = self.batches.flush_at()
        if due is not None and due <= self.now and self.link is not None:
            for e in self.batches.flush(self.now):
                if isinstance(e, SendBatch):
                    msg: object = e.batch
                elif isinstance(e, Announce):
                    msg = p.DevicesOnline(devices=e.devices, seq=self.state.announce(i.device_id for i in e.devices))
                elif isinstance(e, ReportOffline):
                    msg = p.DevicesOffline(device_ids=e.device_ids)
                else:
                    assert isinstance(e, ReportDelivered)
                    msg = p.Delivered(instruction_id=e.instruction_id, device_ids=e.device_ids)
                self.link.to_core.append(p.encode(msg))
        while turn := self.batches.take_acks(self.now, 2):
            for a in turn:
                assert isinstance(a, AckDevice)
                for iid in a.instruction_ids:  # settled by the Core, never merely received
                    assert self.plane.settled((iid, a.device_id)), (iid, a.device_id)
                conn = self.conns.get(a.device_id)
                if conn is not None:
                    self.send(conn, p.ResponseAck(instruction_ids=a.instruction_ids))


# ============================================================================ the machine
HOSTILE_FRAMES = [
    b"", b"\xc1", b"\x00" * 7, msgspec.msgpack.encode({"type": "response", "instruction_id": 2**64 - 1}),
    msgspec.msgpack.encode({"type": "hello", "device_id": "d0\x00", "fqdn": "", "os": "", "agent_version": ""}),
    p.encode(p.Hello(device_id="d1", fqdn="x", os="x", agent_version="x")),  # another device's name (on d0's or ghost's)
]


class Plane(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.db = Database()
        self.core = CoreShell(self.db)
        self.switch = SwitchShell(self)
        self.link: Link | None = None
        self.agents = {d: self._agent(d, Journal()) for d in AGENTS}
        self.ghost: Conn | None = None
        self.next_id = 1
        self.runs: dict[tuple[int, str], list[int]] = {}  # (instruction, device) -> journal lives it ran in
        self.sent_answers: dict[tuple[int, str], list[p.Response]] = {}  # what each device's connection carried
        self.acked: set[tuple[int, str]] = set()  # acknowledged to the agent
        self.forged: set[tuple[int, str]] = set()  # answered by a device that was never asked

    def _agent(self, name: str, journal: Journal, life: int = 0) -> Agent:
        return Agent(name, journal, AgentSession(journal, VERIFIER, Backoff(1, 60)), life)

    # ------------------------------------------------------------ plumbing
    def settled(self, key: tuple[int, str]) -> bool:
        """The Core has committed this answer, or held it (late, refused), or it targets no row
        (an untargeted device's answer, which the store ignores)."""
        return key in self.db.answers or key not in self.db.results or any(h[1:] == key for h in self.db.held)

    def drop(self, conn: Conn, why: str = "") -> None:
        if not conn.open:
            return
        conn.open = False
        conn.up.clear()
        conn.down.clear()
        self.switch.on_disconnected(conn)
        for a in self.agents.values():
            if a.conn is conn:
                a.conn = None
                a.session.lost(why or "lost", self.now)
        if self.ghost is conn:
            self.ghost = None

    def _agent_effects(self, a: Agent, effects: list) -> None:  # type: ignore[type-arg]
        for e in effects:
            if isinstance(e, Run):
                key = (e.body.id, a.name)
                committed = self.db.answers.get(key)  # (a forged answer, columns != ["Run"], ran nothing)
                assert committed is None or committed.columns != ["Run"], f"{key} runs again after its answer was committed"
                lives = self.runs.setdefault(key, [])
                assert a.life not in lives, f"{key} runs twice on one journal"
                lives.append(a.life)
                a.running.append(e.body.id)
            elif isinstance(e, Send):
                if a.conn is not None and a.conn.open:
                    a.conn.up.append(p.encode(e.message))
            elif isinstance(e, Close):
                if a.conn is not None:
                    self.drop(a.conn, e.reason)
            elif isinstance(e, Acked):
                for iid in e.instruction_ids:
                    assert self.settled((iid, a.name)), (iid, a.name)
                    self.acked.add((iid, a.name))
            elif isinstance(e, Stop):
                a.running = [i for i in a.running if i not in e.instruction_ids]
            else:
                assert isinstance(e, Judged), e

    def _link_down(self, to_core: int, to_switch: int) -> None:
        """The link drops: a prefix of what it carried still arrives, the rest is lost."""
        link = self.link
        if link is None:
            return
        for _ in range(min(to_core, len(link.to_core))):
            self.core.handle(link.to_core.popleft())
        for _ in range(min(to_switch, len(link.to_switch))):
            self.switch.on_core(link.to_switch.popleft())
        self.link = None
        self.core.switch_disconnected()
        self.switch.link_lost()

    def _queues(self) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        conns = {id(a.conn): a.conn for a in self.agents.values() if a.conn is not None}
        if self.ghost is not None:
            conns[id(self.ghost)] = self.ghost
        for c in sorted(conns.values(), key=lambda c: c.n):  # type: ignore[union-attr]
            if c.up:
                out.append(("up", c))
            if c.down:
                out.append(("down", c))
        if self.link is not None:
            if self.link.to_core:
                out.append(("to_core", self.link))
            if self.link.to_switch:
                out.append(("to_switch", self.link))
        return out

    def _advance(self, kind: str, where: object) -> None:
        if not getattr(where, {"up": "up", "down": "down"}.get(kind, kind)):
            return  # emptied meanwhile (its connection or link dropped)
        if kind == "up":
            conn: Conn = where  # type: ignore[assignment]
            self.switch.on_frame(conn, conn.up.popleft())
        elif kind == "down":
            conn = where  # type: ignore[assignment]
            data = conn.down.popleft()
            for a in self.agents.values():
                if a.conn is conn:
                    self._agent_effects(a, a.session.receive(data, self.now))
        elif kind == "to_core":
            self.core.handle(where.to_core.popleft())  # type: ignore[attr-defined]
        else:
            self.switch.on_core(where.to_switch.popleft())  # type: ignore[attr-defined]

    def _connect(self, a: Agent) -> None:
        if a.conn is None and a.session.state is State.CONNECTING:
            a.conn = Conn(a.name)
            self._agent_effects(a, a.session.connected(p.Hello(device_id=a.name, fqdn=a.name, os="x",
                                                               agent_version="x"), self.now))

    # ------------------------------------------------------------ rules: the fleet
    @initialize(kind=st.sampled_from(["question", "action"]), progress=st.integers(0, 2))
    def start(self, kind: str, progress: int) -> None:
        """The fleet connects and an instruction to every device is on its way (0), delivered and
        running (1), or answered, committed and acknowledged (2), before the rules start breaking
        things."""
        self.relink()
        for a in self.agents.values():
            self._connect(a)
        self.network_settles(0.05)
        self.issue(kind, None)
        if progress >= 1:
            self.network_settles(0.05)
        if progress >= 2:
            for a in self.agents.values():
                while a.running:
                    self._complete(a, "success")
            self.network_settles(ACK_MAX_DELAY + DELIVERED_HOLD)  # answers committed
            self.network_settles(ACK_MAX_DELAY + DELIVERED_HOLD)  # and acknowledged, once they paused
            assert all((1, d) in self.acked for d in AGENTS), (self.db.results, self.acked)

    @rule(d=st.sampled_from(AGENTS))
    def connect(self, d: str) -> None:
        self._connect(self.agents[d])

    @rule(d=st.sampled_from(AGENTS))
    def connection_drops(self, d: str) -> None:
        conn = self.agents[d].conn
        if conn is not None:
            self.drop(conn, "connection lost")

    @rule(d=st.sampled_from(AGENTS), lose_journal=st.booleans())
    def agent_crashes(self, d: str, lose_journal: bool) -> None:
        """The agent process dies (what it was running is lost); a new one starts from its journal
        file, or from nothing if the file is lost."""
        a = self.agents[d]
        if a.conn is not None:
            conn, a.conn = a.conn, None
            self.drop(conn)
        journal = Journal() if lose_journal else a.journal.reopened()
        self.agents[d] = self._agent(d, journal, a.life + (1 if lose_journal else 0))
        self._connect(self.agents[d])

    @precondition(lambda self: any(a.running for a in self.agents.values()))
    @rule(data=st.data(), status=st.sampled_from(["success", "nocontent", "error"]))
    def agent_completes(self, data: st.DataObject, status: str) -> None:
        self._complete(data.draw(st.sampled_from([a for a in self.agents.values() if a.running])), status)

    def _complete(self, a: Agent, status: str) -> None:
        iid = a.running.pop(0)
        resp = p.Response(instruction_id=iid, status=status, columns=["Run"],  # type: ignore[arg-type]
                          rows=[[len(self.runs[(iid, a.name)])]])  # which run of it this is
        self._agent_effects(a, a.session.completed(resp, self.now))

    @rule(dt=st.sampled_from([0.0, 0.05, DELIVERED_HOLD, ACK_MAX_DELAY + 0.1, RESEND_AFTER + 1]))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        for a in self.agents.values():
            self._agent_effects(a, a.session.tick(self.now))
        self.switch.timers()

    # ------------------------------------------------------------ rules: the network
    @rule(dt=st.sampled_from([0.0, 0.05, ACK_MAX_DELAY + DELIVERED_HOLD]))
    def network_settles(self, dt: float) -> None:
        """Time passes, and every message in flight arrives (round robin over the connections
        and the link), with the Switch's timers, until nothing is in flight: progress, between the
        rules that break things."""
        self.now += dt
        for _ in range(50):
            while queues := self._queues():
                for q in queues:
                    self._advance(*q)
            self.switch.timers()
            if not self._queues():
                break

    @precondition(lambda self: self._queues())
    @rule(data=st.data(), n=st.integers(1, 12))
    def deliver(self, data: st.DataObject, n: int) -> None:
        """Up to n messages, each from a queue drawn at random (FIFO within each connection)."""
        for _ in range(n):
            queues = self._queues()
            if not queues:
                return
            self._advance(*data.draw(st.sampled_from(queues)))

    @rule(to_core=st.integers(0, 3), to_switch=st.integers(0, 3))
    def link_drops(self, to_core: int, to_switch: int) -> None:
        self._link_down(to_core, to_switch)

    @precondition(lambda self: self.link is None)
    @rule()
    def relink(self) -> None:
        self.link = Link()
        self.core.switch_connected(self.link)
        self.switch.link_up(self.link)

    @rule(to_core=st.integers(0, 3))
    def switch_crashes(self, to_core: int) -> None:
        """Every connection and the link die with the Switch; a new one starts from nothing."""
        self._link_down(to_core, 0)
        for a in self.agents.values():
            if a.conn is not None:
                self.drop(a.conn, "switch gone")
        if self.ghost is not None:
            self.drop(self.ghost)
        self.switch = SwitchShell(self)
        self.relink()

    @rule(to_core=st.integers(0, 3))
    def core_restarts(self, to_core: int) -> None:
        """The Core dies (the link with it) and a new one rebuilds its ledger from the database."""
        self._link_down(to_core, 0)
        ended = self.core.ended
        self.core = CoreShell(self.db)
        self.core.ended = ended
        self.core.start()

    # ------------------------------------------------------------ rules: the Core's work
    @precondition(lambda self: self.next_id <= 5)
    @rule(kind=st.sampled_from(["question", "action"]),
          scope=st.none() | st.lists(st.sampled_from([*ENROLLED, GHOST, "nobody"]), max_size=3, unique=True))
    def issue(self, kind: str, scope: list[str] | None) -> None:
        iid, self.next_id = self.next_id, self.next_id + 1
        self.core.issue(iid, kind, scope)

    @precondition(lambda self: len(self.core.ledger))
    @rule(data=st.data(), cancel=st.booleans())
    def window_closes(self, data: st.DataObject, cancel: bool) -> None:
        iid = data.draw(st.sampled_from(sorted(self.core.ledger)))
        self.core.finish(iid, "by request" if cancel else WINDOW_CLOSED, "cancelled" if cancel else "finished")

    # ------------------------------------------------------------ rules: hostile input
    @rule(answer_for=st.integers(0, 8))
    def ghost_connects_and_answers(self, answer_for: int) -> None:
        """A device certificate of the CA that was never enrolled: it may say hello and answer
        anything; the Core refuses it and nothing it says is counted."""
        if self.ghost is None:
            self.ghost = Conn(GHOST)
            self.ghost.up.append(p.encode(p.Hello(device_id=GHOST, fqdn="g", os="g", agent_version="g")))
        self.ghost.up.append(p.encode(p.Response(instruction_id=answer_for, status="success")))

    @rule(d=st.sampled_from(AGENTS), frame=st.sampled_from(HOSTILE_FRAMES) | st.binary(max_size=24))
    def hostile_frame(self, d: str, frame: bytes) -> None:
        """Garbage, a second hello, a hello for another device: the Switch closes that connection."""
        conn = self.agents[d].conn
        if conn is not None:
            conn.up.append(frame)

    @rule(d=st.sampled_from(AGENTS), iid=st.integers(0, 8), bad=st.booleans())
    def device_answers_what_it_was_not_asked(self, d: str, iid: int, bad: bool) -> None:
        """An answer for an unknown or untargeted instruction, or one out of the protocol's bounds
        (a NUL in its error text: the Switch records it as that device's error)."""
        conn = self.agents[d].conn
        if conn is not None:
            self.forged.add((iid, d))
            raw = {"type": "response", "instruction_id": iid, "status": "error", "error": "x\x00y" if bad else "x"}
            conn.up.append(msgspec.msgpack.encode(raw))

    # ------------------------------------------------------------ invariants
    @invariant()
    def the_live_count_equals_the_database(self) -> None:
        for iid in self.core.ledger:
            hint = self.core.ledger.unanswered(iid)
            assert hint is None or hint == self.db.unanswered(iid), (iid, hint, self.db.unanswered(iid))

    @invariant()
    def ended_counts_stay_final(self) -> None:
        for iid, counts in self.core.ended.items():
            assert self.db.counts(iid) == counts, iid
            assert set(counts) <= set(p.FINAL_STATES), counts
            assert sum(counts.values()) == len(self.db.instructions[iid]["targets"])

    @invariant()
    def answers_are_committed_once_and_are_the_devices_own(self) -> None:
        assert all(n == 1 for n in self.db.commits.values()), self.db.commits
        for key, resp in self.db.answers.items():
            assert resp in self.sent_answers.get(key, []), key
        assert {d for _, d in self.db.results} <= set(ENROLLED)
        for (iid, d) in self.db.results:
            assert d in self.db.instructions[iid]["targets"]

    # ------------------------------------------------------------ the end: heal, settle, close
    def teardown(self) -> None:
        if self.link is None:
            self.relink()
        for _ in range(40):
            for a in self.agents.values():
                self._connect(a)
                while a.running:
                    self._complete(a, "success")
            moved = False
            while queues := self._queues():
                moved = True
                for q in queues:
                    self._advance(*q)
            self.now += ACK_MAX_DELAY + DELIVERED_HOLD
            self.switch.timers()
            if not moved and not self._queues() and not any(a.running for a in self.agents.values()):
                if not any(a.session.unacked() for a in self.agents.values()):
                    break
                self.now += RESEND_AFTER  # answers the Switch never acknowledged go again
                for a in self.agents.values():
                    self._agent_effects(a, a.session.tick(self.now))
        for a in self.agents.values():
            assert a.session.state is State.READY, (a.name, a.session.state)
            assert not a.session.unacked(), f"{a.name}: answers never acknowledged"
        # Every targeted device answered every active instruction, unless the one run it had was
        # lost with a crash (journalled as running, never answered: at most once, so never again).
        for iid in list(self.core.ledger):
            for d in sorted(self.db.instructions[iid]["targets"] - {ABSENT}):
                if self.db.results[(iid, d)] in ANSWER_STATES or (iid, d) in self.forged:
                    continue  # (a forged answer may have been refused: it came before the device's hello)
                entry = self.agents[d].journal.get(iid)
                assert entry is not None and entry.response is None and not entry.acked, \
                    (iid, d, self.db.results[(iid, d)], entry)
        for iid in list(self.core.ledger):
            self.core.finish(iid, WINDOW_CLOSED)
        self.ended_counts_stay_final()
        for iid, ins in self.db.instructions.items():
            counts = self.db.counts(iid)
            assert sum(counts.values()) == len(ins["targets"]) and set(counts) <= set(p.FINAL_STATES), (iid, counts)


Plane.TestCase.settings = settings(max_examples=int(os.environ.get("QUANTA_HYPOTHESIS", "200")),
                                   stateful_step_count=60, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_the_data_plane_composed = Plane.TestCase


def test_an_instruction_that_ended_while_the_link_was_down_is_not_given_again() -> None:
    """Found by the machine above: an action answered by every connected device stays active
    (d9 never answers); the Switch restarts (and learns the action again from the Core's Work,
    but not who answered it); the link drops and the Core ends the action meanwhile (its Cancel
    dies with the link); d0 loses its journal and reconnects. The Core's OnlineAck names answers
    only to active instructions, so the Switch must not give d0 what it still holds before the
    new link's Work has dropped it: d0 would run the action a second time."""
    m = Plane()
    m.start("action", 2)
    m.switch_crashes(0)
    for d in AGENTS:
        m.connect(d)
    m.network_settles(0.05)
    assert m.switch.state.active_ids() == [1]
    m.link_drops(0, 0)
    m.core.finish(1, WINDOW_CLOSED)
    m.agent_crashes("d0", lose_journal=True)
    m.network_settles(0.05)
    m.relink()
    m.network_settles(0.05)
    m.network_settles(ACK_MAX_DELAY + DELIVERED_HOLD)
    assert m.runs[(1, "d0")] == [0]  # once, on its first journal
    m.teardown()
