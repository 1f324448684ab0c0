"""The Responses store at scale (issue 14): on PostgreSQL ``results`` is partitioned by day of
expiry; partitions are made ahead and on demand (concurrently too), the purge drops ended days
whole, an instruction spanning partitions reads back complete, every write stays idempotent per
(instruction, device) through the COPY paths, and responses_0004 converts an existing table (and
back) with its data. The SQLite half of the migration is checked too."""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic import command

from quanta.db import alembic_config, make_engine, migrate, normalise_url, partitions, store

DAY = partitions.DAY


@pytest.fixture
def pg() -> Iterator[str]:
    """A database of this test's own (quanta_store_<random>) on QUANTA_TEST_PG_URL, dropped after."""
    server = os.environ.get("QUANTA_TEST_PG_URL")
    if not server:
        pytest.skip("the partitioned Responses store is PostgreSQL's: set QUANTA_TEST_PG_URL "
                    "(e.g. postgresql://root@127.0.0.1:5432/test) to test it")
    name = f"quanta_store_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(normalise_url(server), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')  # generated above, never input
    try:
        yield sa.engine.make_url(normalise_url(server)).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        admin.dispose()


def _engine(url: str) -> sa.Engine:
    migrate(url, "responses")
    return make_engine(url)


def _partitions(engine: sa.Engine) -> set[str]:
    with engine.connect() as c:
        return {r[0] for r in c.exec_driver_sql(
            "SELECT k.relname FROM pg_inherits i JOIN pg_class k ON k.oid = i.inhrelid "
            "WHERE i.inhparent = 'results'::regclass")}


def _tables(engine: sa.Engine) -> set[str]:
    with engine.connect() as c:
        return {r[0] for r in c.exec_driver_sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def _rows(engine: sa.Engine, iid: int) -> list[tuple]:
    with engine.connect() as c:
        return [tuple(r) for r in c.exec_driver_sql(
            "SELECT device_id, state, expires_at, tableoid::regclass::text FROM results "
            "WHERE instruction_id = %(i)s ORDER BY device_id", {"i": iid})]


def _answer(iid: int, dev: str, state: str = "success", error: str | None = None) -> dict:
    return dict(instruction_id=iid, device_id=dev, state=state, columns=["Device", "N"], rows=[[dev, 1]], error=error)


def test_partitions_made_ahead_and_on_demand_concurrently(pg: str) -> None:
    engine = _engine(pg)
    today = int(time.time() // DAY)
    made = _partitions(engine)
    ahead = {partitions.name(d) for d in range(today - 1, today + partitions.AHEAD_DAYS + 1)}
    assert ahead | {partitions.PAST, partitions.NEVER} == made  # by the migration
    with engine.connect() as c:
        assert c.exec_driver_sql("SELECT relkind FROM pg_class WHERE relname = 'results'").scalar() == "p"
        names = {r[0] for r in c.exec_driver_sql(
            f"SELECT indexname FROM pg_indexes WHERE tablename = '{partitions.name(today)}'")}
    assert names == {f"{partitions.name(today)}_pkey", f"ix_results_state_d{today}", f"ix_results_expires_at_d{today}",
                     f"ix_results_device_d{today}"}

    far = (today + 40) * DAY + 7.5
    store.insert_targets(engine, 1, {"a": True, "b": False}, far)  # on demand: the day of its expiry
    assert partitions.name(today + 40) in _partitions(engine)
    assert {r[3] for r in _rows(engine, 1)} == {partitions.name(today + 40)}
    assert partitions.ensure(engine, [far]) == []  # again: nothing to do

    # several Cores making the same new days at once: each made once, nobody fails
    days = [(today + 100 + k) * DAY for k in range(3)]
    errors: list[BaseException] = []
    made_by: list[list[str]] = []
    start = threading.Barrier(4)

    def core() -> None:
        e = make_engine(pg)
        try:
            start.wait()
            made_by.append(partitions.ensure(e, days))
        except BaseException as x:  # noqa: BLE001 - reported below
            errors.append(x)
        finally:
            e.dispose()

    threads = [threading.Thread(target=core) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(n for m in made_by for n in m) == sorted(partitions.name(today + 100 + k) for k in range(3))
    # the purge loop makes the days ahead again from the clock's today, whatever ``now`` it is given
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.exec_driver_sql(f'ALTER TABLE results DETACH PARTITION "{partitions.name(today + 3)}"')
        c.exec_driver_sql(f'DROP TABLE "{partitions.name(today + 3)}"')
    store.purge_expired(engine, now=0.0)
    assert partitions.name(today + 3) in _partitions(engine)
    engine.dispose()


def test_purge_drops_ended_days_whole_and_keeps_live_ones(pg: str) -> None:
    engine = _engine(pg)
    now = time.time()
    today = int(now // DAY)
    store.insert_targets(engine, 1, {f"old-{i}": True for i in range(300)}, (today - 3) * DAY + 10)
    store.insert_targets(engine, 2, {f"old2-{i}": True for i in range(20)}, (today - 3) * DAY + 20)
    store.insert_targets(engine, 3, {"boundary": True}, now - 5)  # today: ends later
    store.insert_targets(engine, 4, {"live": True}, now + 3600)
    store.insert_targets(engine, 5, {"never": True}, None)
    store.insert_targets(engine, 6, {"nan": True}, math.nan)
    store.insert_targets(engine, 7, {"before-1970": True}, -math.inf)  # a careless clock
    assert _rows(engine, 5)[0][2:] == (math.inf, partitions.NEVER)
    assert _rows(engine, 6)[0][2:] == (math.inf, partitions.NEVER)
    assert _rows(engine, 7)[0][3] == partitions.PAST
    deleted: list[int] = []

    @sa.event.listens_for(engine, "after_cursor_execute")
    def count(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("DELETE"):
            deleted.append(cursor.rowcount)

    assert store.purge_expired(engine) == 300 + 20 + 1 + 1
    assert partitions.name(today - 3) not in _partitions(engine) | _tables(engine)  # dropped whole
    assert sum(deleted) == 2  # row by row: only the boundary day's row and the pre-1970 one
    assert {partitions.name(today), partitions.NEVER, partitions.PAST} <= _partitions(engine)
    for iid in (1, 2, 3, 7):
        assert store.state_counts(engine, iid) == {}
    assert [store.state_counts(engine, i) for i in (4, 5, 6)] == [{"pending": 1}] * 3
    assert store.purge_expired(engine) == 0
    # an interrupted DETACH ... CONCURRENTLY (left "detach pending") is finished by the next purge
    store.insert_targets(engine, 8, {"x": True}, (today - 2) * DAY)
    with engine.connect() as c:
        c.exec_driver_sql("UPDATE pg_inherits SET inhdetachpending = true WHERE inhrelid = %(t)s::regclass",
                          {"t": partitions.name(today - 2)})
        c.commit()
    assert store.purge_expired(engine) == 1
    assert partitions.name(today - 2) not in _tables(engine)
    engine.dispose()


def test_an_instruction_spanning_partitions_reads_back_complete(pg: str) -> None:
    engine = _engine(pg)
    today = int(time.time() // DAY)
    first = [f"dev-{i:04d}" for i in range(0, 300)]
    later = [f"dev-{i:04d}" for i in range(300, 500)]  # re-issued with a later expiry: new devices only
    assert store.insert_targets(engine, 9, dict.fromkeys(first, True), (today + 1) * DAY + 5) == 0
    assert store.insert_targets(engine, 9, dict.fromkeys(first + later, True), (today + 2) * DAY + 5) == 300
    where = {r[3] for r in _rows(engine, 9)}
    assert where == {partitions.name(today + 1), partitions.name(today + 2)}
    assert len(_rows(engine, 9)) == 500
    store.mark_sent(engine, 9, first + later)
    assert store.ingest_counted(engine, [_answer(9, d) for d in first + later]) == {9: 500}  # one COPY batch
    assert store.state_counts(engine, 9) == {"success": 500} and store.unanswered(engine, 9) == 0
    total, page = store.page_result_rows(engine, 9, 0, 1000)
    assert total == 500 and [r["device_id"] for r in page] == first + later
    assert [r["device_id"] for r in store.iter_results(engine, 9, batch=64)] == first + later
    assert [r["device_id"] for r in store.page_results(engine, 9, 295, 10)] == (first + later)[295:305]
    assert store.answered_by_device(engine, [9], ["dev-0001", "dev-0499"]) == {"dev-0001": [9], "dev-0499": [9]}
    engine.dispose()


@pytest.mark.parametrize("batch", [store.COPY_MIN, 1], ids=["copy", "executemany"])
def test_every_write_stays_idempotent_per_instruction_and_device(pg: str, batch: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The same outcome whichever path a batch takes (COPY from COPY_MIN answers, else executemany)."""
    copies: list[str] = []
    real_copy = store._copy

    def spy(c: sa.Connection, sql: str, rows):  # type: ignore[no-untyped-def]
        copies.append(sql.split()[1])
        return real_copy(c, sql, rows)

    monkeypatch.setattr(store, "_copy", spy)
    engine = _engine(pg)
    devs = [f"d{i:03d}" for i in range(store.COPY_MIN)]
    now = time.time()
    store.insert_targets(engine, 1, dict.fromkeys(devs, True), now + 3600)
    assert store.insert_targets(engine, 1, dict.fromkeys(devs + ["late"], True), now + 5 * DAY) == len(devs)
    assert len(_rows(engine, 1)) == len(devs) + 1  # a retry with another expiry: no second row
    answers = [_answer(1, d) for d in devs]
    answers[:0] = [_answer(1, "zz-stranger"), _answer(1, "x" * 300)]  # not targeted; longer than any id
    answers.append(_answer(1, devs[0], state="error", error="a later duplicate"))  # the first one wins

    def commit(rows: list[dict]) -> dict[int, int]:
        if batch == 1:  # one answer at a time: the executemany path, as the Core's fallback takes
            got: dict[int, int] = {}
            for r in rows:
                for k, v in store.ingest_counted(engine, [r]).items():
                    got[k] = got.get(k, 0) + v
            return got
        return store.ingest_counted(engine, rows)

    assert copies == ["quanta_stage_targets"] * 2  # both issues: targets through COPY
    copies.clear()
    assert commit(answers) == {1: len(devs)}
    assert commit(answers) == {1: 0}  # the duplicate commit: nothing moves
    assert copies == (["quanta_stage_answers"] * 2 if batch > 1 else [])  # the path this case is about
    with engine.connect() as c:
        dup = c.exec_driver_sql("SELECT instruction_id, device_id, count(*) FROM results "
                                "GROUP BY instruction_id, device_id HAVING count(*) > 1").all()
    assert dup == []
    assert store.state_counts(engine, 1) == {"success": len(devs), "pending": 1}
    assert store.page_results(engine, 1, 0, 1)[0]["error"] is None

    # two Cores issuing the same instruction at once, with different expiries: one row a device
    errors: list[BaseException] = []

    def issue(expiry: float) -> None:
        e = make_engine(pg)
        try:
            store.insert_targets(e, 3, dict.fromkeys(devs, True), expiry)
        except BaseException as x:  # noqa: BLE001
            errors.append(x)
        finally:
            e.dispose()

    threads = [threading.Thread(target=issue, args=(now + k * DAY,)) for k in range(1, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(_rows(engine, 3)) == len(devs)
    assert len({r[2] for r in _rows(engine, 3)}) == 1  # all from one issue
    engine.dispose()


def test_a_bad_answer_refuses_its_batch_alone_on_both_paths(pg: str) -> None:
    """NUL in text, or a state too long for its column: the batch is refused (the Core then stores
    its answers one by one and holds the bad one); nothing of it is written, the next batch is."""
    engine = _engine(pg)
    devs = [f"d{i:03d}" for i in range(store.COPY_MIN)]
    store.insert_targets(engine, 1, dict.fromkeys(devs, True), time.time() + 3600)
    for bad in (dict(error="nul\x00"), dict(state="s" * 17), dict(device_id="nul\x00")):
        for rows in ([{**_answer(1, devs[0]), **bad}], [{**_answer(1, d), **bad} if d == devs[5] else _answer(1, d)
                                                         for d in devs]):
            with pytest.raises(sa.exc.DBAPIError):
                store.ingest_counted(engine, rows)
            assert store.state_counts(engine, 1) == {"pending": len(devs)}
    assert store.ingest_counted(engine, [_answer(1, d) for d in devs]) == {1: len(devs)}
    engine.dispose()


def _old_rows(today: int) -> list[dict]:
    rows = []
    for k, expiry in enumerate([(today - 5) * DAY + 1, (today + 2) * DAY + 1, (today + 30) * DAY + 1, None]):
        for i in range(50):
            rows.append(dict(instruction_id=k + 1, device_id=f"d{i}", state="success", columns=["A"], rows=[[i]],
                             error=None, updated_at=1.5, expires_at=expiry))
    return rows


def _read_all(engine: sa.Engine) -> list[tuple]:
    with engine.connect() as c:
        return [tuple(r) for r in c.exec_driver_sql(
            "SELECT instruction_id, device_id, state, CAST(columns AS TEXT), CAST(rows AS TEXT), error, updated_at, "
            "expires_at FROM results ORDER BY instruction_id, device_id")]


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_migration_converts_an_existing_table_and_back(request: pytest.FixtureRequest, tmp_path, backend: str) -> None:
    url = request.getfixturevalue("pg") if backend == "postgresql" else f"sqlite:///{tmp_path / 'r.db'}"
    cfg = alembic_config(url, "responses")
    command.upgrade(cfg, "responses_0003")
    engine = make_engine(url)
    today = int(time.time() // DAY)
    rows = _old_rows(today)
    sql = store._driver_sql(engine, "INSERT INTO results VALUES (:i, :d, :s, :c, :r, :e, :t, :x)", json_params=("c", "r"))
    with engine.begin() as c:
        c.exec_driver_sql(sql, [dict(i=r["instruction_id"], d=r["device_id"], s=r["state"], c='["A"]',
                                     r=f"[[{r['rows'][0][0]}]]", e=None, t=r["updated_at"], x=r["expires_at"])
                                for r in rows])
    before = _read_all(engine)
    assert len(before) == 200 and sum(1 for r in before if r[7] is None) == 50

    command.upgrade(cfg, "heads")
    after = _read_all(engine)
    assert after == [r[:7] + ((math.inf,) if r[7] is None else (r[7],)) for r in before]  # None: never
    if backend == "postgresql":
        have = _partitions(engine)
        assert {partitions.name(today - 5), partitions.name(today + 30), partitions.NEVER} <= have
        assert {r[3] for r in _rows(engine, 3)} == {partitions.name(today + 30)}
        with engine.connect() as c:
            pk = c.exec_driver_sql("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                                   "WHERE conrelid = 'results'::regclass AND contype = 'p'").scalar()
            assert pk == "PRIMARY KEY (instruction_id, device_id, expires_at)"
            assert c.exec_driver_sql("SELECT to_regclass('results_unpartitioned')").scalar() is None
    # the store works on the converted table: a purge, then new targets and answers
    assert store.purge_expired(engine) == 50
    store.insert_targets(engine, 1, {"d0": True, "new": True}, time.time() + 60)
    assert store.state_counts(engine, 1) == {"pending": 2}

    command.downgrade(cfg, "responses_0003")
    back = _read_all(engine)
    assert [r for r in back if r[0] != 1] == [r for r in before if r[0] != 1]  # NULL again for "never"
    if backend == "postgresql":
        with engine.connect() as c:
            assert c.exec_driver_sql("SELECT relkind FROM pg_class WHERE relname = 'results'").scalar() == "r"
            assert c.exec_driver_sql("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'results%%' AND tablename <> 'results'").scalar() == 0
            pk = c.exec_driver_sql("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                                   "WHERE conrelid = 'results'::regclass AND contype = 'p'").scalar()
            assert pk == "PRIMARY KEY (instruction_id, device_id)"
    command.upgrade(cfg, "heads")  # and up again
    assert len(_read_all(engine)) == len(back)
    engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_mark_sent_counts_each_open_row_once(request: pytest.FixtureRequest, tmp_path, backend: str) -> None:
    url = request.getfixturevalue("pg") if backend == "postgresql" else f"sqlite:///{tmp_path / 'r.db'}"
    engine = _engine(url)
    store.insert_targets(engine, 1, {"a": True, "b": False, "c": True}, time.time() + 60)
    store.ingest(engine, [_answer(1, "c")])
    # repeats, strangers, an answered device and names no device can have: only a and b move
    assert store.mark_sent(engine, 1, ["a", "a", "b", "c", "stranger", "x" * 300, "'; DROP TABLE results; --"]) == 2
    assert store.state_counts(engine, 1) == {"sent": 2, "success": 1}
    assert store.mark_sent(engine, 1, ["a", "b"]) == 0  # already sent
    engine.dispose()


def test_answers_reach_a_partition_attached_by_hand(pg: str) -> None:
    """A careless operator's own partition (not named by quanta.db.partitions): the batch UPDATE is
    then planned on every partition, and its rows are answered all the same."""
    engine = _engine(pg)
    devs = [f"d{i:03d}" for i in range(store.COPY_MIN)]
    with engine.begin() as c:
        c.exec_driver_sql("CREATE TABLE \"results_by hand\" (LIKE results INCLUDING DEFAULTS)")
        c.exec_driver_sql("ALTER TABLE results ATTACH PARTITION \"results_by hand\" "
                          "FOR VALUES FROM ('100000000000000') TO ('100000086400000')")
        c.exec_driver_sql("INSERT INTO results (instruction_id, device_id, state, updated_at, expires_at) "
                          "SELECT 1, d, 'sent', 0, 100000000000005 FROM unnest(%(d)s::text[]) AS d", {"d": devs})
    assert store.ingest_counted(engine, [_answer(1, d) for d in devs]) == {1: len(devs)}
    assert store.state_counts(engine, 1) == {"success": len(devs)}
    engine.dispose()


def test_a_new_partition_gets_statistics_so_a_batch_of_answers_is_found_by_key(pg: str) -> None:
    """A fresh database's first big question: its day's partition has no statistics yet, and the
    planner took it for a few rows and read it whole once for every staged answer (19 s a batch of
    2,000 in 50,000 targets). Writing the targets analyses it; a small question does not."""
    e = _engine(pg)
    n, exp = 5000, time.time() + 3600
    store.insert_targets(e, 1, {f"d{i:05d}": True for i in range(partitions.ANALYZE_FROM - 1)}, exp)
    part = partitions.partition_of(partitions.stored_expiry(exp))

    def known() -> float:
        with e.connect() as c:
            return float(c.exec_driver_sql("SELECT reltuples FROM pg_class WHERE relname = %(n)s",
                                           {"n": part}).scalar_one())
    assert known() < partitions.ANALYZE_FROM - 1  # below the threshold: not analysed (-1: never)
    store.insert_targets(e, 2, {f"d{i:05d}": True for i in range(n)}, exp)
    assert known() >= n
    with e.begin() as c:
        c.exec_driver_sql(store._STAGE_ANSWERS)
        c.exec_driver_sql("INSERT INTO quanta_stage_answers SELECT 2, 'd' || lpad(g::text, 5, '0'), 'success', "
                          "'[]', '[]', NULL FROM generate_series(0, 1999) g")
        where = partitions.holding(c, [2])
        c.exec_driver_sql("SET LOCAL enable_hashjoin = off")
        c.exec_driver_sql("SET LOCAL enable_mergejoin = off")
        plan = "\n".join(r[0] for r in c.exec_driver_sql(
            "EXPLAIN UPDATE results SET state = a.s FROM quanta_stage_answers a WHERE results.instruction_id = a.i "
            f"AND results.device_id = a.d AND {store._OPEN_BY_KEY} AND {where}"))
    # each staged answer's row found through an index on (device, instruction), never a scan of
    # the partition for each answer
    cond = [ln for ln in plan.splitlines() if "Index Cond:" in ln]
    assert "Index Scan using" in plan and cond and "= a.d" in cond[0] and "= a.i" in cond[0], plan
    # and the answers go in at the Core's rate, every one counted
    rows = [{"instruction_id": 2, "device_id": f"d{i:05d}", "state": "success", "columns": [], "rows": [],
             "error": None} for i in range(n)]
    started = time.perf_counter()
    for k in range(0, n, 2000):
        store.ingest_counted(e, rows[k:k + 2000])
    assert store.state_counts(e, 2) == {"success": n}
    assert time.perf_counter() - started < 30  # 2.5 batches of 19 s each before; well under 1 s now
    e.dispose()
