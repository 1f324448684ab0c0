"""The Core's pure instruction ledger: its transitions, and (hypothesis) random interleavings of
issues, answer batches (duplicates, untargeted devices, strangers, late and unknown instructions),
reordered and repeated deliveries of batches, window expiries and Core restarts, driven against the
real response store on SQLite. Invariants: each answer is committed at most once, an ended
instruction's counts never change again, every targeted device ends in exactly one final state,
and the ledger's hint equals the database's count of open targets."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy.pool import StaticPool

from quanta import protocol as p
from quanta.db import store, tables
from quanta.protocol.core_ledger import (ALL_ANSWERED, LATE, REFUSED, WINDOW_CLOSED, CoreLedger, Finish,
                                         LedgerError, Phase, Recount)

DEVICES = [f"d{i}" for i in range(6)]
STATUSES = ["success", "nocontent", "error", "notapplicable"]


def _item(iid: int, expires_at: float = 100.0) -> p.WorkItem:
    return p.WorkItem(instruction=p.SignedInstruction(body=b"", signature=b""), id=iid, expires_at=expires_at,
                      devices=None)


def _answer(dev: str, iid: int, status: str = "success") -> p.DeviceResponse:
    return p.DeviceResponse(device_id=dev, response=p.Response(instruction_id=iid, status=status))  # type: ignore[arg-type]


# ------------------------------------------------------------------ transitions
def test_an_ended_instruction_cannot_be_opened_again() -> None:
    ledger = CoreLedger()
    ledger.open(_item(1), 3)
    assert ledger.phase(1) is Phase.ACTIVE and 1 in ledger and ledger.unanswered(1) == 3
    assert ledger.close(1) is True and ledger.phase(1) is Phase.ENDED
    assert ledger.close(1) is False  # closing twice says so
    with pytest.raises(LedgerError, match="instruction 1: ended -> active"):
        ledger.open(_item(1), 3)
    assert ledger.phase(2) is None


def test_sort_counts_only_active_instructions_from_this_link() -> None:
    ledger = CoreLedger()
    ledger.open(_item(1), 2)
    answers = [_answer("a", 1), _answer("b", 2), _answer("c", 3), _answer("x", 1)]
    out = ledger.sort(answers, link="sw", refused_devices={"x"}, statuses={2: "finished"})
    assert [a.device_id for a in out.count] == ["a"]
    assert [(h.kind, h.answer.device_id) for h in out.held] == [(LATE, "b"), (REFUSED, "c"), (REFUSED, "x")]
    assert "had already ended (finished)" in out.held[0].reason and "unknown" in out.held[1].reason
    assert "not connected through switch 'sw'" in out.held[2].reason


def test_the_hint_never_finishes_without_the_database() -> None:
    ledger = CoreLedger()
    ledger.open(_item(1), 2)
    assert ledger.committed({1: 1}) == [] and ledger.unanswered(1) == 1
    assert ledger.committed({1: 1}) == [Recount(1)]  # apparently done: the database decides
    assert ledger.recounted(1, 1) == []  # it was not
    assert ledger.committed({1: -1}) == [Recount(1)]  # the driver could not tell
    assert ledger.recounted(1, 0) == [Finish(1, ALL_ANSWERED)]
    assert ledger.committed({9: 5}) == []  # not active here: nothing to do


def test_due_names_closed_windows() -> None:
    ledger = CoreLedger()
    ledger.open(_item(1, expires_at=10), 1)
    ledger.open(_item(2, expires_at=20), 1)
    assert ledger.due(15) == [Finish(1, WINDOW_CLOSED)]


# ------------------------------------------------------------ property-based
class LedgerAgainstTheStore(RuleBasedStateMachine):
    """The Core's shell, reduced to its rules: the ledger decides, the real store writes."""

    def __init__(self) -> None:
        super().__init__()
        self.engine = sa.create_engine("sqlite://", poolclass=StaticPool)
        tables.responses.create_all(self.engine)
        self.ledger = CoreLedger()
        self.next_id = 1
        self.targets: dict[int, set[str]] = {}
        self.ended: dict[int, dict[str, int]] = {}  # instruction -> its counts when it ended
        self.sent: list[p.ResponseBatch] = []  # batches a Switch has sent (it may send each again)
        self.on_link = set(DEVICES[:5])  # d5 never said hello through this link

    # ---------------------------------------------------------- the shell
    def _finish(self, iid: int) -> None:
        if self.ledger.close(iid):
            store.expire(self.engine, iid)
            self.ended[iid] = store.state_counts(self.engine, iid)

    def _apply(self, effects: list[Finish | Recount]) -> None:
        for e in effects:
            if isinstance(e, Recount):
                self._apply(self.ledger.recounted(e.instruction_id, store.unanswered(self.engine, e.instruction_id)))
            else:
                assert e.why != ALL_ANSWERED or store.unanswered(self.engine, e.instruction_id) == 0
                self._finish(e.instruction_id)

    def _ingest(self, batch: p.ResponseBatch) -> None:
        strangers = self.ledger.strangers(batch.responses, self.on_link)
        statuses = {i: "finished" for i in self.ledger.not_active(batch.responses) if i in self.ended}
        out = self.ledger.sort(batch.responses, link="sw", refused_devices=strangers, statuses=statuses)
        for h in out.held:  # held: from a stranger, or for an instruction not active here
            if h.answer.device_id in strangers:
                assert h.kind == REFUSED
            else:
                assert h.answer.response.instruction_id not in self.ledger
                assert h.kind == (LATE if h.answer.response.instruction_id in self.ended else REFUSED)
        moved = store.ingest_counted(self.engine, [
            dict(instruction_id=a.response.instruction_id, device_id=a.device_id, state=a.response.status,
                 columns=[], rows=[], error=None) for a in out.count])
        self._apply(self.ledger.committed(moved))

    # ---------------------------------------------------------------- rules
    @rule(devices=st.sets(st.sampled_from(DEVICES)), online=st.sets(st.sampled_from(DEVICES)))
    def issue(self, devices: set[str], online: set[str]) -> None:
        iid, self.next_id = self.next_id, self.next_id + 1
        targets = {d: d in online for d in devices}
        existed = store.insert_targets(self.engine, iid, targets, 1e12)
        assert existed == 0
        self.targets[iid] = devices
        self.ledger.open(_item(iid, expires_at=float(iid)), len(targets))
        if not targets:
            self._finish(iid)  # "no devices in scope"

    @precondition(lambda self: self.next_id > 1)
    @rule(data=st.data())
    def answer(self, data: st.DataObject) -> None:
        ids = st.integers(min_value=1, max_value=self.next_id + 1)  # may name an unknown instruction
        answers = data.draw(st.lists(st.builds(_answer, st.sampled_from(DEVICES), ids, st.sampled_from(STATUSES)),
                                     max_size=8))
        batch = p.ResponseBatch(batch_id=len(self.sent) + 1, responses=answers)
        self.sent.append(batch)
        self._ingest(batch)

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def resend(self, data: st.DataObject) -> None:
        """The Switch re-sends an unacknowledged batch (after a reconnect), in any order."""
        self._ingest(data.draw(st.sampled_from(self.sent)))

    @rule(now=st.floats(min_value=0, max_value=20))
    def window_closes(self, now: float) -> None:
        for f in self.ledger.due(now):
            self._finish(f.instruction_id)

    @rule()
    def core_restarts(self) -> None:
        """State rebuilt from the database: active instructions and their open counts."""
        active = [i for i in self.ledger]
        self.ledger = CoreLedger()
        effects = []
        for iid in active:
            self.ledger.open(_item(iid, expires_at=float(iid)), None)
            effects += self.ledger.recounted(iid, store.unanswered(self.engine, iid))
        self._apply(effects)

    # ----------------------------------------------------------- invariants
    @invariant()
    def ended_counts_stay_final(self) -> None:
        for iid, counts in self.ended.items():
            assert store.state_counts(self.engine, iid) == counts, iid
            assert set(counts) <= set(p.FINAL_STATES), counts
            assert sum(counts.values()) == len(self.targets[iid])  # one final state per target

    @invariant()
    def the_hint_equals_the_database(self) -> None:
        for iid in self.ledger:
            hint = self.ledger.unanswered(iid)
            assert hint is None or hint == store.unanswered(self.engine, iid), iid

    @invariant()
    def one_row_per_target_and_none_for_strangers(self) -> None:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(tables.results.c.instruction_id, tables.results.c.device_id)).all()
        assert len(rows) == len(set(rows)) == sum(len(t) for t in self.targets.values())


TestLedgerAgainstTheStore = LedgerAgainstTheStore.TestCase
TestLedgerAgainstTheStore.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
