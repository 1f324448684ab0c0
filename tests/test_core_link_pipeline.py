"""What a Switch link's messages cost each other at the Core, on SQLite and PostgreSQL: a batch the
database takes nothing of fails alone (the other batches of its group are acknowledged), delivery
reports are written after the answers and never over one, a write retried after an outage
recounts what it touched, and a Response Stack's Core recounts every instruction it committed
answers to, however the answers were written."""

from __future__ import annotations

import asyncio
import threading

import msgspec
import sqlalchemy as sa

from quanta import protocol as p
from quanta.core.service import BatchNotStored
from quanta.core.stacks import StackCore
from quanta.db import store
from test_core_containment import Link, _answer, _core, _while_the_writer_is_busy
from test_core_counter import _setup


def _refuse_every_write_of(engine: sa.Engine, device: str) -> None:
    """The database refuses any change to ``device``'s row, even the ``error`` that replaces an
    answer it refused: the batch cannot be committed at all."""
    with engine.begin() as c:
        if engine.dialect.name == "postgresql":
            c.exec_driver_sql(
                "CREATE OR REPLACE FUNCTION quanta_test_refuse() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'refused by the test trigger'; END $$ LANGUAGE plpgsql")
            c.exec_driver_sql(f"CREATE TRIGGER refuse BEFORE UPDATE ON results FOR EACH ROW "
                              f"WHEN (OLD.device_id = '{device}') EXECUTE FUNCTION quanta_test_refuse()")
        else:
            c.exec_driver_sql(f"CREATE TRIGGER refuse BEFORE UPDATE ON results WHEN OLD.device_id = '{device}' "
                              "BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END")


def test_a_batch_that_cannot_be_stored_fails_alone_and_is_not_acknowledged(db_url: str) -> None:
    """Two Switches' batches in one group; the database takes nothing of one of them: that batch
    fails (its link's reader ends, so its Switch keeps it and sends it again on its next link),
    the other is committed and acknowledged, and the re-sent batch still ends the instruction."""
    engine = _setup(db_url, ["a", "b", "stuck"])

    async def run() -> None:
        core = await _core(engine)
        _refuse_every_write_of(engine, "stuck")
        bad, good = Link("sw-bad", {"a", "stuck"}), Link("sw-good", {"b"})
        gate = threading.Event()
        busy = core._db.submit(gate.wait, 20)  # the writer is busy: both batches join one group
        tasks = [asyncio.create_task(core.handle(bad, p.ResponseBatch(batch_id=1, responses=[
                     _answer("a"), _answer("stuck")]))),
                 asyncio.create_task(core.handle(good, p.ResponseBatch(batch_id=5, responses=[_answer("b")])))]
        while core._group is None or len(core._group.batches) < 2:
            assert not any(t.done() for t in tasks)
            await asyncio.sleep(0.005)
        gate.set()
        outcome = await asyncio.gather(*tasks, return_exceptions=True)
        assert busy.result() is True
        assert isinstance(outcome[0], BatchNotStored) and "batch 1 could not be stored" in str(outcome[0])
        assert isinstance(outcome[0].__cause__, sa.exc.DatabaseError)
        assert "refused by the test trigger" in str(outcome[0].__cause__)
        assert outcome[1] is None
        assert bad.acks() == [] and good.acks() == [5]
        assert 7 in core.active  # "stuck" is still open
        states = {r["device_id"]: r["state"] for r in store.page_results(engine, 7, 0, 10)}
        assert states == {"a": "success", "b": "success", "stuck": "pending"}  # "a" was stored alone
        # the database takes "stuck" again; its Switch sends the batch again on its next link: the
        # instruction ends with it ("a", committed before, counts nothing the second time)
        with engine.begin() as c:
            c.exec_driver_sql("DROP TRIGGER refuse ON results" if engine.dialect.name == "postgresql"
                              else "DROP TRIGGER refuse")
        again = Link("sw-bad", {"a", "stuck"})
        await core.handle(again, p.ResponseBatch(batch_id=1, responses=[_answer("a"), _answer("stuck")]))
        assert again.acks() == [1]
        assert 7 not in core.active
        await core.stop()

    asyncio.run(run())
    assert store.state_counts(engine, 7) == {"success": 3}


def test_deliveries_are_written_after_the_answers_and_never_over_one(db_url: str) -> None:
    engine = _setup(db_url, ["a", "b", "c"])
    hostile = ["ghost", "a' OR '1'='1", "b\\", '["c"]', "x" * 10_000, ""]

    async def run() -> None:
        core = await _core(engine)
        link = Link(devices={"a", "b", "c"})
        await core.handle(link, p.Delivered(instruction_id=7, device_ids=["a", "b", *hostile]))
        await core.handle(link, p.Delivered(instruction_id=99, device_ids=["a", "b", "c"]))  # not active here
        other = Link("sw-other", devices={"elsewhere"})
        await core.handle(other, p.Delivered(instruction_id=7, device_ids=["c"]))  # not a device of that link
        # nothing is written on the link's reader: the answer that comes next is first
        assert store.state_counts(engine, 7) == {"pending": 3}
        await core.ingest(link, p.ResponseBatch(batch_id=1, responses=[_answer("a")]))
        await core.write_deliveries()
        await core.stop()

    asyncio.run(run())
    states = {r["device_id"]: r["state"] for r in store.page_results(engine, 7, 0, 10)}
    assert states == {"a": "success", "b": "sent", "c": "pending"}
    assert store.state_counts(engine, 99) == {}


def test_a_delivery_gathered_before_the_end_is_not_written_after_it(db_url: str) -> None:
    engine = _setup(db_url, ["a", "away"])
    store.devices_offline(engine, "sw", ["away"])

    async def run() -> None:
        core = await _core(engine)
        link = Link(devices={"a", "away"})
        await core.handle(link, p.Delivered(instruction_id=7, device_ids=["away"]))
        await core.ingest(link, p.ResponseBatch(batch_id=1, responses=[_answer("a")]))
        await core.finish(7, "gather window closed")
        before = store.state_counts(engine, 7)
        await core.write_deliveries()
        assert store.state_counts(engine, 7) == before and "sent" not in before
        await core.stop()

    asyncio.run(run())


def test_a_response_stack_recounts_what_a_group_commit_answered(db_url: str) -> None:
    """A Response Stack's Core counts only its own answers; what it commits in a group (several
    Switch batches in one transaction) must still be recounted, so that the Core that commits the
    last open target, on whichever stack, ends the instruction."""
    engine = _setup(db_url, ["a", "b", "c"])

    async def run() -> None:
        core = StackCore(engine, engine, b"s" * 32, follow_interval=3600)  # turns are taken below
        await core.start()
        await core.issue(7)
        # another stack's Core commits c's answer to the shared database
        store.ingest_counted(engine, [dict(instruction_id=7, device_id="c", state="success", columns=["X"],
                                           rows=[[1]], error=None)])
        links = [Link(f"sw-{k}", devices={"a", "b"}) for k in range(2)]
        await _while_the_writer_is_busy(core, [(links[0], p.ResponseBatch(batch_id=1, responses=[_answer("a")])),
                                               (links[1], p.ResponseBatch(batch_id=1, responses=[_answer("b")]))])
        assert 7 in core.active  # its own count: one still open
        await core.follow()
        assert 7 not in core.active  # the recount found none open
        await core.stop()

    asyncio.run(run())
    assert store.state_counts(engine, 7) == {"success": 3}


def _outage_once_on_the_error_row(engine: sa.Engine) -> None:
    """The database goes away once, while the Core writes the ``error`` row that replaces an answer
    it refused: after the answer before it in the same batch was committed alone."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as c:
            c.exec_driver_sql("CREATE SEQUENCE quanta_test_once")
            c.exec_driver_sql(
                "CREATE OR REPLACE FUNCTION quanta_test_outage() RETURNS trigger AS $$ BEGIN "
                "IF nextval('quanta_test_once') = 1 THEN "  # a sequence is not rolled back
                "RAISE EXCEPTION 'the test outage' USING ERRCODE = '08006'; END IF; RETURN NEW; END $$ "
                "LANGUAGE plpgsql")
            c.exec_driver_sql("CREATE TRIGGER outage BEFORE UPDATE ON results FOR EACH ROW "
                              "WHEN (NEW.state = 'error') EXECUTE FUNCTION quanta_test_outage()")
        return
    calls = []

    def once() -> int:
        calls.append(1)
        if len(calls) == 1:  # raised in a user function: sqlite3.OperationalError, as an outage is
            raise RuntimeError("the test outage")
        return 0

    sa.event.listen(engine, "connect", lambda dbapi, _rec: dbapi.create_function("quanta_test_once", 0, once))
    engine.dispose()  # the connections made from now on have the function
    with engine.begin() as c:
        c.exec_driver_sql("CREATE TRIGGER outage BEFORE UPDATE ON results WHEN NEW.state = 'error' "
                          "BEGIN SELECT quanta_test_once(); END")


def test_a_write_retried_after_an_outage_recounts_so_the_instruction_still_ends(db_url: str, caplog) -> None:  # type: ignore[no-untyped-def]
    """The batch is refused whole (one bad answer), so its answers are written one by one; the
    first is committed, then the database goes away. The retry finds that answer already answered
    (it counts 0 for it): without a recount the Core would wait for a device that has answered."""
    engine = _setup(db_url, ["a", "bad"])

    async def run() -> None:
        core = await _core(engine)
        _outage_once_on_the_error_row(engine)
        link = Link(devices={"a", "bad"})
        bad = _answer("bad", rows=[[msgspec.msgpack.Ext(1, b"x")]])
        await asyncio.wait_for(core.ingest(link, p.ResponseBatch(batch_id=1, responses=[_answer("a"), bad])), 30)
        assert link.acks() == [1]
        assert 7 not in core.active  # both devices are final: the recount ended it
        await core.stop()

    asyncio.run(run())
    assert "database unavailable during _write_group" in caplog.text
    assert store.state_counts(engine, 7) == {"success": 1, "error": 1}
