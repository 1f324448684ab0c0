"""quanta.metrics.Milestones: the first time of each event for the latest instruction, exported on
/metrics; only the start of a newer instruction moves it, so no answer a device sends can."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from quanta.metrics import Milestones


def test_records_each_event_once_for_the_latest_instruction_only() -> None:
    m = Milestones("x", ("work", "first_answer"))
    assert not m.due("work")  # nothing started yet
    m.start(7, "work", now=1.0)
    m.mark(7, "first_answer", now=2.0)
    m.mark(7, "first_answer", now=3.0)  # a second answer: the first stays
    assert m.times == {"work": 1.0, "first_answer": 2.0}
    assert not m.due("first_answer")


def test_answers_for_other_instructions_change_nothing() -> None:
    m = Milestones("x", ("work", "first_answer"))
    m.start(7, "work", now=1.0)
    for iid in (8, 6, 2**62, -1):  # never sent, older, absurd: a flood from a hostile device
        m.mark(iid, "first_answer", now=5.0)
    assert m.instruction_id == 7 and m.times == {"work": 1.0}
    assert m.due("first_answer")


def test_a_newer_instruction_starts_afresh_and_an_older_start_is_ignored() -> None:
    m = Milestones("x", ("work", "first_answer"))
    m.start(7, "work", now=1.0)
    m.mark(7, "first_answer", now=2.0)
    m.start(9, "work", now=4.0)
    assert m.instruction_id == 9 and m.times == {"work": 4.0}
    m.start(8, "work", now=5.0)  # an older instruction's Work arriving late
    assert m.instruction_id == 9 and m.times == {"work": 4.0}


def test_exported_as_gauges() -> None:
    reg = CollectorRegistry()
    m = Milestones("x", ("work", "first_answer"))
    reg.register(m)
    assert b"quanta_x_milestone" not in generate_latest(reg)
    m.start(3, "work", now=100.5)
    text = generate_latest(reg).decode()
    assert "quanta_x_milestone_instruction 3.0" in text
    assert 'quanta_x_milestone_seconds{event="work"} 100.5' in text
    assert 'event="first_answer"' not in text
