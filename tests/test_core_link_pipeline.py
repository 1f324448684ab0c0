"""A Response Stack's Core recounts every instruction it committed answers to, however the answers
were written, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

from quanta import protocol as p
from quanta.core.stacks import StackCore
from quanta.db import store
from test_core_containment import Link, _answer, _while_the_writer_is_busy
from test_core_counter import _setup


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
