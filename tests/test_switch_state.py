"""The Switch's pure delivery bookkeeping: unit tests of its rules, and (hypothesis) random
interleavings of hellos, disconnects, announcements, the Core's acknowledgements (naming what each
device already answered, refusing some), Work, answers, cancels, relinks and Switch restarts.

Invariants: nothing is given to a device before the Core's OnlineAck made it ready, nor to one
that is not connected; nothing is given twice on one connection; nothing is given to a device that
answered it through this Switch or that the Core said had answered it; and every ready device in
scope that has not answered holds every active instruction (nothing is forgotten)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from quanta import protocol as p
from quanta.protocol.switch_state import CancelTo, DeliverTo, Readiness, Refuse, SwitchState

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

    def _apply(self, effects: list) -> None:  # type: ignore[type-arg]
        for e in effects:
            if isinstance(e, DeliverTo):
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
        self._apply(self.state.work([_item(iid, scope)], [*self.state.active_ids(), iid], now=0))

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
