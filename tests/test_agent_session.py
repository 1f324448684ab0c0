"""The agent's protocol behaviour (:mod:`quanta.protocol.agent_session`): a large answer ends its
instruction with an error instead of a frame the Switch refuses, with real agents and a real Switch."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conftest import Server
from quanta import protocol as p
from quanta.agent.journal import FileStore
from quanta.client import ConsumerClient
from quanta.pki import Pki, Signer
from quanta.protocol import Response
from quanta.protocol.agent_session import (RESEND_AFTER, Acked, AgentSession, Backoff, Close, Judged, Stop,
                                          LocalProtocolError, Run, Send, State, bounded)
from quanta.signing import Verifier

# ~20,000 rows of ~100 bytes: over the Switch's 1 MiB frame limit, inside the row and memory limits.
LARGE = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000) "
         "SELECT x AS N, hex(zeroblob(48)) AS Pad FROM c;")
SMALL = "@x = Agent.GetSummary();"


def test_bounded_replaces_only_what_is_over_the_limit() -> None:
    r = Response(instruction_id=3, status="success", columns=["A"], rows=[["x" * 100]] * 100, elapsed_ms=2.0)
    assert bounded(r, 1 << 20) is r
    e = bounded(r, 1000)
    assert e.status == "error" and e.instruction_id == 3 and e.rows == [] and e.elapsed_ms == 2.0
    assert re.fullmatch(r"result too large: \d+ bytes, limit 1000", e.error or ""), e.error


def test_a_large_answer_is_an_error_and_the_connection_stays(server: Server) -> None:
    names = ("big", "small1", "small2")
    for n in names:
        server.enroll(n)
        server.start_agent(n)
    server.wait_online(set(names))
    with ConsumerClient.for_data_dir(server.root) as api:
        iid = api.issue(LARGE, devices=["big"], instruction_ttl=60)["id"]
        status = api.wait(iid, 60)
        assert status["status"] == "finished" and status["states"] == {"error": 1}, status
        (result,) = api.all_results(iid)
        m = re.fullmatch(r"result too large: (\d+) bytes, limit (\d+)", result["error"] or "")
        assert m and int(m.group(1)) > 20_000 * 100 and int(m.group(2)) == 1024 * 1024, result
        # The same connection answers the next question, as do the other devices.
        iid2 = api.issue(SMALL, instruction_ttl=30)["id"]
        status2 = api.wait(iid2, 30)
        assert status2["status"] == "finished" and status2["states"] == {"success": 3}, status2
    log = server.log_text()
    closed = [line for line in log.splitlines() if "closing agent connection" in line and "device big:" in line]
    assert not closed, closed  # never closed by the Switch
    agent_log = server.agent_log("big")
    assert agent_log.count("connected to switch") == 1 and "no connection to switch" not in agent_log, agent_log
    assert f"instruction {iid}: result too large" in agent_log


# ============================================================================ property-based
# AgentSession driven by random interleavings of deliveries (duplicates, reorderings, forged,
# tampered and expired ones), completions, acks, cancels, reconnects, crashes that rebuild the
# session from the journal file, the clock, and hostile bytes. Invariants: an instruction runs at
# most once per journal; every response is sent until acked (all of them on each welcome); an
# acked response is never sent again; no frame over the Switch's limit; nothing raises.
T0 = 1_800_000_000.0
IDS = [1, 2, 3]
EXPIRED_IDS = [101, 102]
HELLO = p.Hello(device_id="dev", fqdn="dev", os="x", agent_version="x")
_KEYS: dict[str, object] = {}


def _keys() -> tuple[Verifier, Signer, Signer]:
    if not _KEYS:
        root = Path(tempfile.mkdtemp(prefix="quanta-session-keys-"))
        ours, theirs = Pki(root / "ours"), Pki(root / "theirs")
        ours.create("localhost")
        theirs.create("localhost")
        _KEYS.update(verifier=Verifier.from_file(ours.signing_pub), signer=Signer.from_file(ours.signing_key),
                     foreign=Signer.from_file(theirs.signing_key))
    return _KEYS["verifier"], _KEYS["signer"], _KEYS["foreign"]  # type: ignore[return-value]


def _body(iid: int, expires_at: float) -> bytes:
    return p.encode_body(p.InstructionBody(id=iid, name="q", kind="question", payload="SELECT 1;", parameters={},
                                           issued_at=T0, expires_at=expires_at))


def _deliver(body: bytes, signature: bytes) -> bytes:
    return p.encode(p.Deliver(instruction=p.SignedInstruction(body=body, signature=signature)))


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.verifier, signer, foreign = _keys()
        self.dir = Path(tempfile.mkdtemp(prefix="quanta-session-"))
        self.path = self.dir / "journal.msgpack"
        self.store = FileStore(self.path)
        self.session = AgentSession(self.store, self.verifier, Backoff(1, 60))
        self.now = T0
        self.frames: dict[str, bytes] = {}
        for i in IDS:
            body = _body(i, T0 + 600)
            self.frames[f"valid {i}"] = _deliver(body, signer.sign(body))
            tampered = body.replace(b"SELECT 1;", b"SELECT 2;")
            self.frames[f"tampered {i}"] = _deliver(tampered, signer.sign(body))
            self.frames[f"foreign {i}"] = _deliver(body, foreign.sign(body))
        for i in EXPIRED_IDS:
            body = _body(i, T0 - 1)
            self.frames[f"expired {i}"] = _deliver(body, signer.sign(body))
        self.runs: dict[int, int] = {}  # Run effects per instruction, over every session of this journal
        self.running: set[int] = set()  # run by the current session, not completed yet
        self.responded: set[int] = set()  # instructions with a response sent at least once
        self.acked: set[int] = set()
        self.limit = p.Welcome(switch="", heartbeat_seconds=0).max_message_bytes
        self.cancelled: list[int] = []

    def teardown(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ effects
    def _take(self, effects: list) -> list:  # type: ignore[type-arg]
        for e in effects:
            if isinstance(e, Run):
                self.runs[e.body.id] = self.runs.get(e.body.id, 0) + 1
                self.running.add(e.body.id)
                assert e.body.id in IDS, e  # never an expired, tampered or foreign instruction
            elif isinstance(e, Send) and isinstance(e.message, p.Response):
                iid = e.message.instruction_id
                assert iid not in self.acked, f"acked response {iid} sent again"
                assert len(p.encode(e.message)) <= max(self.limit, 4096)
                self.responded.add(iid)
            elif isinstance(e, Acked):
                self.acked.update(e.instruction_ids)
            elif isinstance(e, Stop):  # a Cancel: the shell stops those payloads if they run
                assert set(e.instruction_ids) <= set(self.cancelled), e
            else:
                assert isinstance(e, (Send, Close, Judged)), e
        return effects

    # ------------------------------------------------------------------ connection
    @initialize()
    def start(self) -> None:
        self.connect()
        self.welcome(1 << 20)

    @rule(limit=st.sampled_from([0, 4096, 50_000, 1 << 20]))
    def reconnect(self, limit: int) -> None:
        if self.session.state is not State.CONNECTING:
            self.lose()
        self.connect()
        self.welcome(limit)

    @precondition(lambda self: self.session.state is State.CONNECTING)
    @rule()
    def connect(self) -> None:
        assert self._take(self.session.connected(HELLO, self.now)) == [Send(HELLO)]

    @precondition(lambda self: self.session.state is State.AWAITING_WELCOME)
    @rule(limit=st.sampled_from([0, 4096, 50_000, 1 << 20]))
    def welcome(self, limit: int) -> None:
        self.limit = limit
        out = self._take(self.session.receive(p.encode(p.Welcome(switch="s", heartbeat_seconds=60,
                                                                 max_message_bytes=limit)), self.now))
        resent = {e.message.instruction_id for e in out if isinstance(e, Send)}
        unacked = {e.instruction_id for e in self.store.values() if e.response is not None and not e.acked}
        assert resent == unacked  # every unacknowledged response goes again on a welcome
        assert unacked <= self.responded - self.acked

    @precondition(lambda self: self.session.state in (State.AWAITING_WELCOME, State.READY))
    @rule()
    def lose(self) -> None:
        retry = self.session.lost("connection lost", self.now)
        assert retry.delay > 0

    @rule()
    def crash_and_restart(self) -> None:
        """The agent process dies (runs in flight are lost); a new one reads the journal file."""
        self.store.close()
        self.store = FileStore(self.path)
        self.session = AgentSession(self.store, self.verifier, Backoff(1, 60))
        self.running.clear()
        self.connect()
        self.welcome(1 << 20)

    # ------------------------------------------------------------------ from the Switch
    @rule(which=st.sampled_from(sorted([f"valid {i}" for i in IDS] * 3) + [f"tampered {i}" for i in IDS]
                                + [f"foreign {i}" for i in IDS] + [f"expired {i}" for i in EXPIRED_IDS]))
    def deliver(self, which: str) -> None:
        self._take(self.session.receive(self.frames[which], self.now))

    @rule(ids=st.lists(st.sampled_from(IDS + [999, -1, 2**63 - 1]), max_size=4))
    def ack(self, ids: list[int]) -> None:
        self._take(self.session.receive(p.encode(p.ResponseAck(instruction_ids=ids)), self.now))

    @rule(ids=st.lists(st.sampled_from(IDS), max_size=3))
    def cancel(self, ids: list[int]) -> None:
        self.cancelled = ids
        self._take(self.session.receive(p.encode(p.Cancel(instruction_ids=ids)), self.now))

    @rule(data=st.one_of(st.binary(max_size=64), st.sampled_from([
        b"", b"\xc1", msgspec.msgpack.encode({"type": "deliver", "instruction": 5}),
        msgspec.msgpack.encode({"type": "response_ack", "instruction_ids": ["x"]}),
        msgspec.msgpack.encode({"type": "welcome", "switch": 1}),
        msgspec.msgpack.encode({"type": "response_ack", "instruction_ids": [2**64 - 1]}),
        p.encode(p.Deliver(instruction=p.SignedInstruction(body=b"\x00" * 10, signature=b"\x01" * 64)))])))
    def hostile(self, data: bytes) -> None:
        out = self._take(self.session.receive(data, self.now))  # never raises
        if self.session.state is State.CONNECTING:
            assert out == []

    @precondition(lambda self: self.session.state is State.READY)
    @rule()
    def second_welcome(self) -> None:
        out = self.session.receive(p.encode(p.Welcome(switch="s", heartbeat_seconds=60)), self.now)
        assert [type(e) for e in out] == [Close]

    # ------------------------------------------------------------------ the agent
    @precondition(lambda self: bool(self.running))
    @rule(data=st.data(), large=st.booleans())
    def complete(self, data: st.DataObject, large: bool) -> None:
        iid = data.draw(st.sampled_from(sorted(self.running)))
        self.running.discard(iid)
        rows = [["x" * 100]] * (2000 if large else 1)
        self._take(self.session.completed(p.Response(instruction_id=iid, status="success", columns=["A"],
                                                     rows=rows), self.now))

    @rule(dt=st.floats(0, 2 * RESEND_AFTER))
    def tick(self, dt: float) -> None:
        self.now += dt
        out = self._take(self.session.tick(self.now))
        if self.session.state is State.READY:  # everything unacked for RESEND_AFTER went again
            resent = {e.message.instruction_id for e in out if isinstance(e, Send)}
            overdue = {e.instruction_id for e in self.store.values()
                       if e.response is not None and not e.acked and self.now - e.sent_at >= RESEND_AFTER}
            assert not overdue and resent <= self.responded

    @rule()
    def forbidden(self) -> None:
        """A shell bug is named, never silently accepted."""
        if self.session.state is not State.CONNECTING:
            try:
                self.session.connected(HELLO, self.now)
            except LocalProtocolError as e:
                assert "not allowed in state" in str(e)
            else:
                raise AssertionError("connected twice accepted")

    # ------------------------------------------------------------------ invariants
    @invariant()
    def at_most_once(self) -> None:
        assert all(n == 1 for n in self.runs.values()), self.runs

    @invariant()
    def acked_stay_acked(self) -> None:
        for i in self.acked:
            e = self.store.get(i)
            assert e is None or e.acked


SessionMachine.TestCase.settings = settings(max_examples=int(os.environ.get("QUANTA_HYPOTHESIS", "200")),
                                            stateful_step_count=50, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])
test_agent_session_properties = SessionMachine.TestCase
