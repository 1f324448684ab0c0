"""The Switch's pure delivery bookkeeping: unit tests of its rules, and (hypothesis) random
interleavings of hellos, disconnects, announcements, the Core's acknowledgements (naming what each
device already answered, refusing some), Work, answers, cancels, relinks and Switch restarts.

Invariants: nothing is given to a device before the Core's OnlineAck made it ready, nor to one
that is not connected; nothing is given twice on one connection; nothing is given to a device that
answered it through this Switch or that the Core said had answered it; and every ready device in
scope that has not answered holds every active instruction (nothing is forgotten)."""

from __future__ import annotations

import time

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from quanta import protocol as p
from quanta.protocol.switch_batches import (ACK_IDLE, ACK_MAX_DELAY, DELIVERED_HOLD, FLUSH_INTERVAL, MAX_BATCH,
                                            AckDevice, Announce, ReportDelivered, ReportOffline, SendBatch,
                                            SwitchBatches)
from quanta.protocol.switch_state import (EARLY_IDS, FANOUT_SLICE, CancelTo, DeliverTo, FanOut, Readiness, Refuse,
                                          SwitchState)

DEVICES = [f"d{i}" for i in range(5)]


def _item(iid: int, devices: list[str] | None = None, expires_at: float = 1e12) -> p.WorkItem:
    return p.WorkItem(instruction=p.SignedInstruction(body=b"", signature=b""), id=iid, expires_at=expires_at,
                      devices=devices)


def _ready(state: SwitchState, *devices: str) -> None:
    for d in devices:
        state.hello(d)
    state.online_ack(state.announce(devices), {}, [])


def test_nothing_is_given_before_the_core_acknowledges_the_device() -> None:
    s = SwitchState()
    assert s.work([_item(1)], [1], now=0) == [DeliverTo(1, [])]
    s.hello("a")
    assert s.readiness("a") is Readiness.UNREADY
    seq = s.announce(["a"])
    assert s.online_ack(seq, {}, []) == [DeliverTo(1, ["a"])]
    assert s.readiness("a") is Readiness.READY


def test_what_the_core_says_was_answered_is_not_given_again() -> None:
    s = SwitchState()
    s.work([_item(1), _item(2)], [1, 2], now=0)
    s.hello("a")
    assert s.online_ack(s.announce(["a"]), {"a": [1]}, []) == [DeliverTo(2, ["a"])]


def test_answers_reported_before_their_work_arrives_are_kept() -> None:
    s = SwitchState()  # a restarted Switch: the devices are back before the Core's Work
    s.hello("a")
    s.online_ack(s.announce(["a"]), {"a": [7]}, [])
    assert s.work([_item(7), _item(8)], [7, 8], now=0) == [DeliverTo(7, []), DeliverTo(8, ["a"])]


def test_refused_devices_are_closed_and_given_nothing() -> None:
    s = SwitchState()
    s.work([_item(1)], [1], now=0)
    s.hello("ghost")
    s.hello("a")
    assert s.online_ack(s.announce(["ghost", "a"]), {}, ["ghost"]) == [Refuse(["ghost"]), DeliverTo(1, ["a"])]
    assert s.readiness("ghost") is None


def test_a_relink_makes_everyone_wait_for_the_new_acknowledgement() -> None:
    s = SwitchState()
    _ready(s, "a")
    seq = s.relinked()
    assert s.readiness("a") is Readiness.UNREADY
    assert s.work([_item(1)], [1], now=0) == [DeliverTo(1, [])]
    assert s.online_ack(seq - 1, {}, []) == []  # an acknowledgement of the old link: nobody
    assert s.online_ack(seq, {}, []) == [DeliverTo(1, ["a"])]


def test_after_a_relink_nothing_is_given_until_the_cores_work() -> None:
    """An instruction that ended while the link was down (its Cancel lost with the link) is never
    given after the relink: the OnlineAck names answers only to the Core's active instructions,
    so a device that lost its journal would run it again."""
    s = SwitchState()
    s.work([_item(1), _item(2)], [1, 2], now=0)
    _ready(s, "a")  # given 1 and 2 on this connection
    s.hello("a")  # a new connection (its journal lost) while the link is down
    seq = s.relinked()
    assert s.online_ack(seq, {"a": [2]}, []) == []  # ready, but nothing given yet
    assert s.readiness("a") is Readiness.READY
    assert s.work([], [2], now=0) == []  # 1 ended meanwhile; 2 the Core says "a" answered
    s.hello("b")
    assert s.online_ack(s.announce(["b"]), {}, []) == [DeliverTo(2, ["b"])]


def test_answers_before_their_work_are_remembered_within_a_bound() -> None:
    """A restarted Switch hears journalled answers before the Core's Work: the device is not given
    that instruction when it arrives. A device answering thousands of instructions nobody asked
    makes the Switch remember at most EARLY_IDS of them, and each Work forgets the inactive."""
    s = SwitchState()
    _ready(s, "a", "b")
    s.answered("a", 7)
    for iid in range(100, 100 + 2 * EARLY_IDS):  # hostile: answers to instructions never asked
        s.answered("b", iid)
    assert len(s._answered_early) == EARLY_IDS
    assert s.work([_item(7)], [7], now=0) == [DeliverTo(7, ["b"])]
    assert list(s._answered_early) == []  # nothing else is active: forgotten


def test_scope_expiry_and_cancel() -> None:
    s = SwitchState()
    _ready(s, "a", "b", "c")
    [given] = s.work([_item(1, ["a", "b", "zz"]), _item(2, expires_at=5)], [1, 2], now=10)
    assert isinstance(given, DeliverTo) and given.instruction_id == 1 and sorted(given.devices) == ["a", "b"]
    s.answered("a", 1)
    assert s.cancel([1, 99]) == [CancelTo(1, ["b"])]  # "a" answered: nothing to cancel there
    assert 1 not in s and s.active_ids() == []


def test_a_new_connection_of_a_device_is_given_again_what_it_did_not_answer() -> None:
    s = SwitchState()
    _ready(s, "a")
    assert s.work([_item(1)], [1], now=0) == [DeliverTo(1, ["a"])]
    s.hello("a")  # reconnected: the old connection's delivery may never have arrived
    assert s.online_ack(s.announce(["a"]), {}, []) == [DeliverTo(1, ["a"])]


# ------------------------------------------------------------ property-based
class SwitchAgainstACore(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = SwitchState()
        self.connected: set[str] = set()
        self.connection = dict.fromkeys(DEVICES, 0)  # device -> its connection number
        self.given: set[tuple[str, int, int]] = set()  # (device, connection, instruction)
        self.core_answered: dict[int, set[str]] = {}  # committed at the Core
        self.told: dict[str, set[int]] = {}  # what the Core's ack said each ready device had answered
        self.switch_answered: dict[int, set[str]] = {}  # answered through this Switch
        self.pending_acks: list[tuple[int, list[str]]] = []  # announcements the Core has not answered
        self.scopes: dict[int, list[str] | None] = {}
        self.next_id = 1
        self.waiting: dict[str, int] = {}  # the model's own view: device -> announcement it waits for
        self.ready: set[str] = set()
        self.stale = False  # relinked, no Work since

    def _apply(self, effects: list) -> None:  # type: ignore[type-arg]
        for e in effects:
            if isinstance(e, DeliverTo):
                assert not (self.stale and e.devices), "given after a relink, before the Core's Work"
                for d in e.devices:
                    assert d in self.connected, "given to a device that is not connected"
                    assert self.state.readiness(d) is Readiness.READY, "given before the Core's acknowledgement"
                    key = (d, self.connection[d], e.instruction_id)
                    assert key not in self.given, "given twice on one connection"
                    assert d not in self.switch_answered.get(e.instruction_id, set())
                    assert e.instruction_id not in self.told.get(d, set()), "given after the Core said answered"
                    self.given.add(key)
            elif isinstance(e, Refuse):
                for d in e.devices:
                    self._disconnect(d)

    def _disconnect(self, d: str) -> None:
        self.connected.discard(d)
        self.ready.discard(d)
        self.waiting.pop(d, None)
        self.state.gone(d)

    @rule(d=st.sampled_from(DEVICES))
    def hello(self, d: str) -> None:
        self.connected.add(d)
        self.connection[d] += 1
        self.told.pop(d, None)
        self.ready.discard(d)
        self.waiting[d] = 0
        self.state.hello(d)

    @precondition(lambda self: self.connected)
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        self._disconnect(data.draw(st.sampled_from(sorted(self.connected))))

    @rule()
    def announce(self) -> None:
        waiting = sorted(self.waiting)
        seq = self.state.announce(waiting)
        self.waiting.update(dict.fromkeys(waiting, seq))
        self.pending_acks.append((seq, waiting))

    @rule(data=st.data(), refuse=st.booleans())
    def announce_and_core_acknowledges(self, data: st.DataObject, refuse: bool) -> None:
        """The common case: the Core answers an announcement before anything else happens."""
        self.announce()
        self.pending_acks.insert(0, self.pending_acks.pop())
        self._acknowledge(0, refuse)

    @precondition(lambda self: self.pending_acks)
    @rule(data=st.data(), refuse=st.booleans())
    def core_acknowledges(self, data: st.DataObject, refuse: bool) -> None:
        self._acknowledge(data.draw(st.integers(0, len(self.pending_acks) - 1)), refuse)

    def _acknowledge(self, index: int, refuse: bool) -> None:
        seq, devices = self.pending_acks.pop(index)
        answered = {d: sorted(i for i, ds in self.core_answered.items() if d in ds) for d in devices}
        refused = [d for d in devices if refuse and d == "d4"]
        for d in devices:
            if self.waiting.get(d) == seq and d not in refused:  # the acknowledgement it waits for
                del self.waiting[d]
                self.ready.add(d)
                self.told[d] = set(answered[d])
        self._apply(self.state.online_ack(seq, {d: a for d, a in answered.items() if a}, refused))

    @rule(scope=st.none() | st.lists(st.sampled_from(DEVICES + ["stranger"]), max_size=4))
    def work(self, scope: list[str] | None) -> None:
        iid, self.next_id = self.next_id, self.next_id + 1
        self.scopes[iid] = scope
        effects = self.state.work([_item(iid, scope)], [*self.state.active_ids(), iid], now=0)
        self.stale = False
        self._apply(effects)

    @precondition(lambda self: self.given)
    @rule(data=st.data())
    def device_answers(self, data: st.DataObject) -> None:
        d, conn, iid = data.draw(st.sampled_from(sorted(self.given)))
        if d in self.connected and conn == self.connection[d]:
            self.state.answered(d, iid)
            self.switch_answered.setdefault(iid, set()).add(d)
            self.core_answered.setdefault(iid, set()).add(d)  # committed (the order is free here)

    @precondition(lambda self: self.state.active_ids())
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        iid = data.draw(st.sampled_from(self.state.active_ids()))
        for e in self.state.cancel([iid]):
            assert isinstance(e, CancelTo)
            assert not set(e.devices) & self.switch_answered.get(iid, set())

    @rule(die=st.integers(0, 7))
    def relink(self, die: int) -> None:
        if die:  # one time in eight: a relink makes everyone wait again, so it must stay rare
            return
        seq = self.state.relinked()
        self.stale = True
        self.ready.clear()
        self.waiting = dict.fromkeys(self.connected, seq)
        self.pending_acks = [(seq, sorted(self.connected))]

    @rule(die=st.integers(0, 7))
    def switch_restarts(self, die: int) -> None:
        """Every connection is lost with the Switch; the devices say hello to the new one."""
        if die:
            return
        active = self.state.active_ids()  # the Core still holds these: its Work brings them back
        self.state = SwitchState()
        self.stale = False
        self.switch_answered.clear()
        self.pending_acks.clear()
        for d in list(self.connected):
            self.connected.discard(d)
            self.hello(d)
        self._apply(self.state.work([_item(i, self.scopes[i]) for i in active], active, now=0))

    @invariant()
    def readiness_follows_the_acknowledgements(self) -> None:
        for d in DEVICES:
            want = None if d not in self.connected else Readiness.READY if d in self.ready else Readiness.UNREADY
            assert self.state.readiness(d) is want, d

    @invariant()
    def ready_devices_hold_every_instruction_due(self) -> None:
        if self.stale:  # until the relink's first Work
            return
        for iid in self.state.active_ids():
            scope = self.scopes[iid]
            for d in self.connected:
                if self.state.readiness(d) is not Readiness.READY or (scope is not None and d not in scope):
                    continue
                if d in self.switch_answered.get(iid, set()) or iid in self.told.get(d, set()):
                    continue
                assert (d, self.connection[d], iid) in self.given, (d, iid)


TestSwitchAgainstACore = SwitchAgainstACore.TestCase
TestSwitchAgainstACore.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ================================================================= SwitchBatches
# What the Switch owes the Core and its devices (quanta.protocol.switch_batches): unit tests of its
# rules, then (hypothesis) random interleavings of answers (duplicates included), flushes at random
# times, the Core's batch acknowledgements (reordered, repeated, unknown), link losses and relinks.
def _resp(iid: int, rows: int = 0) -> p.Response:
    return p.Response(instruction_id=iid, status="success", columns=["A"], rows=[["x" * 10]] * rows)


def _batches(effects: list) -> list[p.ResponseBatch]:  # type: ignore[type-arg]
    return [e.batch for e in effects if isinstance(e, SendBatch)]


def _linked(limit: int = 1 << 20) -> SwitchBatches:
    b = SwitchBatches(limit)
    assert b.link_up() == []
    return b


def test_an_idle_link_sends_an_answer_at_once_and_a_busy_one_gathers() -> None:
    b = _linked()
    assert b.flush_at() is None
    assert b.answered("a", _resp(1), 10, now=0.0) is True  # no batch awaits an ack: at once
    [first] = _batches(b.flush(0.0))
    assert [r.device_id for r in first.responses] == ["a"] and b.unacked() == [first.batch_id]
    assert b.answered("b", _resp(1), 10, now=0.001) is False  # a batch awaits its ack: gather
    assert b.answered("c", _resp(1), 10, now=0.005) is False
    assert b.flush_at() is None and b.flush(60.0) == []  # no timer: however long the Core takes
    assert b.batch_acked(first.batch_id, now=61) is True  # the ack: what gathered goes at once
    [second] = _batches(b.flush(61))
    assert [r.device_id for r in second.responses] == ["b", "c"]


def test_answers_that_fill_a_batch_go_while_another_awaits_its_ack() -> None:
    """A slow Core is sent full batches, not a queue of small ones: one batch in flight that is
    not full at most, the others full (by count, or by bytes)."""
    b = _linked(limit=MAX_BATCH * 10)
    b.answered("a", _resp(1), 10, now=0)
    [first] = _batches(b.flush(0))
    for i in range(MAX_BATCH - 1):
        assert b.answered(f"d{i}", _resp(1), 1, now=1) is False
    assert b.answered("last", _resp(1), 1, now=1) is True  # the MAX_BATCH-th gathered: full
    [full] = _batches(b.flush(1))
    assert len(full.responses) == MAX_BATCH and b.unacked() == [first.batch_id, full.batch_id]
    assert b.answered("x", _resp(1), MAX_BATCH * 6, now=2) is False
    assert b.answered("y", _resp(1), MAX_BATCH * 6, now=2) is True  # over max_message_bytes gathered
    assert [[r.device_id for r in x.responses] for x in _batches(b.flush(2))] == [["x"], ["y"]]
    assert b.batch_acked(first.batch_id, now=3) is False  # nothing gathered: nothing to send


def test_batches_are_cut_by_size_and_count_but_hold_at_least_one_answer() -> None:
    b = _linked(limit=100)
    for i in range(5):
        b.answered(f"d{i}", _resp(1), 40, now=0)
    b.answered("big", _resp(1), 500, now=0)  # over the limit alone: a batch of its own
    sizes = [len(x.responses) for x in _batches(b.flush(0))]
    assert sizes == [2, 2, 1, 1]
    b = _linked()
    for i in range(MAX_BATCH + 1):
        b.answered(f"d{i}", _resp(1), 1, now=0)
    assert [len(x.responses) for x in _batches(b.flush(0))] == [MAX_BATCH, 1]


def test_a_device_is_acknowledged_only_what_the_core_committed() -> None:
    b = _linked()
    b.answered("a", _resp(1), 10, now=0)
    [batch] = _batches(b.flush(0))
    b.answered("a", _resp(2), 10, now=0.9)  # gathers while batch 1 awaits its ack
    assert b.take_acks(now=100, limit=10) == []
    assert b.batch_acked(999, now=1) is False
    assert b.batch_acked(batch.batch_id, now=1) is True  # batch 2, with a's answer to 2, goes now
    b.flush(1)  # not acknowledged: a is owed only its answer to 1
    assert b.acks_at() == 0.9 + ACK_IDLE and b.take_acks(now=1.1, limit=10) == []  # answers first
    assert b.take_acks(now=1.15, limit=10) == [AckDevice("a", [1])]
    b.batch_acked(batch.batch_id, now=3)  # a repeated ack changes nothing
    assert b.take_acks(now=100, limit=10) == [] and b.acks_at() is None


def test_acknowledgements_wait_while_answers_keep_arriving_for_at_most_the_max_delay() -> None:
    b = _linked()
    b.answered("a", _resp(1), 10, now=0)
    [batch] = _batches(b.flush(0))
    b.answered("b", _resp(1), 10, now=0.1)
    b.batch_acked(batch.batch_id, now=0.2)
    assert b.acks_at() == 0.1 + ACK_IDLE
    for k in range(round(ACK_MAX_DELAY / 0.2)):  # answers keep coming, 0.3 s to 0.1 s past the max:
        t = 0.3 + 0.2 * k  # the acknowledgement waits, up to the max (t by index: no summed drift)
        b.answered("c", _resp(1), 10, now=t)
        assert b.take_acks(now=t, limit=10) == []
    assert b.acks_at() == 0.2 + ACK_MAX_DELAY
    assert b.take_acks(now=0.2 + ACK_MAX_DELAY, limit=10) == [AckDevice("a", [1])]


def test_unacknowledged_batches_go_again_after_a_relink_and_nothing_while_down() -> None:
    b = _linked(limit=10)  # each answer fills a batch: three in flight
    for i in range(3):
        b.answered("a", _resp(i), 10, now=i)
        b.flush(i + 0.5)
    sent = b.unacked()
    assert len(sent) == 3
    b.batch_acked(sent[1], now=4)
    b.link_lost()
    assert b.answered("b", _resp(9), 10, now=5) is False and b.flush_at() is None and b.flush(99) == []
    assert b.device_online(p.DeviceInfo(device_id="c", fqdn="", os="", agent_version=""), now=5) is False
    again = b.link_up()
    assert [x.batch.batch_id for x in again] == [sent[0], sent[2]]  # in the order first sent
    out = b.flush(6)  # what gathered while down; the on-line devices were in the relink's announcement
    assert not any(isinstance(e, Announce) for e in out)
    assert [r.device_id for x in _batches(out) for r in x.responses] == ["b"]


def test_deliveries_are_reported_after_the_hold_unless_answered() -> None:
    b = _linked()
    assert b.delivered(1, ["a", "b", "c"], now=0) is True
    b.delivered(1, ["d"], now=0.5)
    b.answered("b", _resp(1), 10, now=0.1)
    assert _batches(b.flush(0.1))
    assert b.flush_at() == DELIVERED_HOLD
    assert b.flush(DELIVERED_HOLD) == [ReportDelivered(1, ["a", "c"])]
    assert b.flush_at() == 0.5 + DELIVERED_HOLD
    assert b.flush(0.5 + DELIVERED_HOLD) == [ReportDelivered(1, ["d"])] and b.flush_at() is None


def test_devices_on_and_offline_gather_and_go_before_answers() -> None:
    b = _linked()
    info = p.DeviceInfo(device_id="a", fqdn="", os="", agent_version="")
    assert b.device_online(info, now=0) is True
    assert b.device_offline("z", now=0.001) is False  # one deadline for both
    assert b.flush(0.001) == []
    b.answered("a", _resp(1), 10, now=0.002)  # an answer takes them along at once
    out = b.flush(0.002)
    assert [type(e) for e in out] == [Announce, ReportOffline, SendBatch]
    assert out[0] == Announce([info]) and out[1] == ReportOffline(["z"])


def test_draining_acknowledgements_is_linear() -> None:
    """The ack drain walks each queued acknowledgement once (the former drain re-scanned the queue:
    1.1 s at 50,000 acks). 200,000 acks in slices of 256 take well under a second when linear."""
    b = _linked()
    n = 200_000
    for i in range(n):
        b.answered(f"d{i}", _resp(1), 1, now=0)
    for batch in _batches(b.flush(0)):
        b.batch_acked(batch.batch_id, now=0)
    t0 = time.perf_counter()
    got = 0
    while turn := b.take_acks(now=10, limit=256):
        assert len(turn) <= 256
        got += len(turn)
    assert got == n and time.perf_counter() - t0 < 2.0


class BatchesAgainstACore(RuleBasedStateMachine):
    """The Switch's batching against a Core that acknowledges batches in any order, repeats or
    loses acknowledgements, and a link that drops. Invariants: every answer is, at every moment,
    waiting, in a batch the Core has not acknowledged, or owed/acknowledged to its device (nothing
    is lost); a device is acknowledged only answers the Core committed; every batch not
    acknowledged goes again after a relink; batches keep their bounds; nothing goes while the link
    is down; and after a flush at ``now`` nothing is due at or before ``now`` (no busy loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.b = SwitchBatches(200)
        self.now = 0.0
        self.linked = False
        self.answers: list[tuple[str, int]] = []  # every answer given to the Switch
        self.in_flight: dict[int, p.ResponseBatch] = {}  # sent on the current link, not acknowledged
        self.committed: set[tuple[str, int]] = set()
        self.acked_to_device: set[tuple[str, int]] = set()
        self.core_acked: list[int] = []  # acknowledgements the Core sent, perhaps not delivered yet
        self.deadline: float | None = None  # when the shell's flusher would wake, as it last learnt

    def _woken(self, sooner: bool) -> None:
        """An event said whether the flush is due sooner; if it said not, the deadline the
        shell sleeps towards must still be the earliest (else an answer would wait for nothing)."""
        due = self.b.flush_at()
        if not sooner and due is not None:
            assert self.deadline is not None and due >= self.deadline, (due, self.deadline)
        if sooner or self.deadline is None or (due is not None and due < self.deadline):
            self.deadline = due

    def _take(self, effects: list) -> None:  # type: ignore[type-arg]
        for e in effects:
            assert self.linked, "sent while the link is down"
            if isinstance(e, SendBatch):
                rs = e.batch.responses
                assert 1 <= len(rs) <= MAX_BATCH
                assert len(rs) == 1 or sum(len(r.response.rows) * 10 + 10 for r in rs) <= 200
                self.in_flight[e.batch.batch_id] = e.batch

    @rule(d=st.sampled_from(DEVICES), iid=st.integers(1, 4), rows=st.sampled_from([0, 0, 1, 30]))
    def answer(self, d: str, iid: int, rows: int) -> None:
        self.answers.append((d, iid))  # the same answer may come twice (a device resends it)
        self._woken(self.b.answered(d, _resp(iid, rows), rows * 10 + 10, self.now))

    @rule(dt=st.sampled_from([0.0, 0.001, FLUSH_INTERVAL, ACK_IDLE, 1.0]))
    def flush(self, dt: float) -> None:
        self.now += dt
        self._take(self.b.flush(self.now))
        due = self.b.flush_at()
        assert due is None or due > self.now, "due again at once after a flush"
        self.deadline = due

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def core_commits(self, data: st.DataObject) -> None:
        batch_id = data.draw(st.sampled_from(sorted(self.in_flight)))
        batch = self.in_flight.pop(batch_id)
        self.committed.update((r.device_id, r.response.instruction_id) for r in batch.responses)
        self.core_acked.append(batch_id)

    @precondition(lambda self: self.core_acked)
    @rule(data=st.data(), again=st.booleans())
    def ack_arrives(self, data: st.DataObject, again: bool) -> None:
        i = data.draw(st.integers(0, len(self.core_acked) - 1))
        batch_id = self.core_acked[i] if again else self.core_acked.pop(i)
        if self.linked:
            self._woken(self.b.batch_acked(batch_id, self.now))

    @rule(batch_id=st.integers(-5, 10**6))
    def hostile_ack(self, batch_id: int) -> None:
        if self.linked and batch_id not in self.b.unacked():
            before = self.b.unacked()
            assert self.b.batch_acked(batch_id, self.now) is False and self.b.unacked() == before

    @rule(d=st.sampled_from(DEVICES), iid=st.integers(1, 4))
    def delivered(self, d: str, iid: int) -> None:
        self._woken(self.b.delivered(iid, [d], self.now))

    @rule(d=st.sampled_from(DEVICES), online=st.booleans())
    def device_comes_or_goes(self, d: str, online: bool) -> None:
        info = p.DeviceInfo(device_id=d, fqdn=d, os="", agent_version="")
        self._woken(self.b.device_online(info, self.now) if online else self.b.device_offline(d, self.now))

    @rule(limit=st.sampled_from([1, 3, 256]), dt=st.sampled_from([0.0, ACK_IDLE, ACK_MAX_DELAY]))
    def send_acks(self, limit: int, dt: float) -> None:
        self.now += dt
        for a in self.b.take_acks(self.now, limit):
            for iid in a.instruction_ids:
                assert (a.device_id, iid) in self.committed, "acknowledged before the Core committed it"
                self.acked_to_device.add((a.device_id, iid))

    @rule()
    def link_lost(self) -> None:
        self.linked = False
        self.b.link_lost()
        self.in_flight.clear()  # lost with the link, as are the Core's acknowledgements in flight
        self.core_acked.clear()

    @precondition(lambda self: not self.linked)
    @rule()
    def link_up(self) -> None:
        self.linked = True
        again = self.b.link_up()
        assert [e.batch.batch_id for e in again] == self.b.unacked()
        self._take(again)
        self.deadline = self.b.flush_at()  # the shell wakes its flusher on every new link

    @invariant()
    def nothing_is_lost(self) -> None:
        held: dict[tuple[str, int], int] = {}
        owed = set(self.acked_to_device)
        for batch in self.b._unacked.values():
            for r in batch.responses:
                held[(r.device_id, r.response.instruction_id)] = 1
        for r in self.b._responses:
            held[(r.device_id, r.response.instruction_id)] = 1
        for d, ids in self.b._acks.items():
            owed.update((d, i) for i in ids)
        if self.b._draining is None:  # (while draining, the rest of the walk is in the iterator)
            for a in self.answers:
                assert a in held or a in owed, a

    @invariant()
    def acks_are_due_only_when_owed(self) -> None:
        assert (self.b.acks_at() is None) or self.b.acks_pending() or self.b._ack_since is not None


TestBatchesAgainstACore = BatchesAgainstACore.TestCase
TestBatchesAgainstACore.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ------------------------------------------------------------------ FanOut: the Delivers in slices
def test_fanout_hands_out_slices_in_order_and_ends_each_effect() -> None:
    f = FanOut()
    f.add(DeliverTo(1, [f"a{i}" for i in range(5)]))
    f.add(DeliverTo(2, ["b0", "b1"]))
    assert len(f) == 7
    assert f.take(3, {1, 2}) == [(1, ["a0", "a1", "a2"], True, False)]
    assert f.take(3, {1, 2}) == [(1, ["a3", "a4"], False, True), (2, ["b0"], True, False)]
    assert f.take(3, {1, 2}) == [(2, ["b1"], False, True)]
    assert not f and len(f) == 0 and f.take(3, {1, 2}) == []


def test_fanout_effect_that_fits_is_handed_out_whole_without_a_copy() -> None:
    devices = ["a", "b"]
    f = FanOut()
    f.add(DeliverTo(1, devices))
    [(iid, part, first, last)] = f.take(FANOUT_SLICE, {1})
    assert (iid, first, last) == (1, True, True) and part is devices


def test_fanout_drops_the_rest_of_an_instruction_cancelled_midway() -> None:
    f = FanOut()
    f.add(DeliverTo(1, ["a", "b", "c", "d"]))
    f.add(DeliverTo(2, ["x"]))
    assert f.take(2, {1, 2}) == [(1, ["a", "b"], True, False)]
    # instruction 1 cancelled (or ended) between two loop turns: c and d are not given it
    assert f.take(2, {2}) == [(2, ["x"], True, True)]
    assert not f


def test_fanout_ignores_empty_effects_and_a_zero_budget() -> None:
    f = FanOut()
    f.add(DeliverTo(1, []))
    assert not f
    f.add(DeliverTo(1, ["a"]))
    assert f.take(0, {1}) == [] and len(f) == 1
    assert f.take(-5, {1}) == [] and len(f) == 1
