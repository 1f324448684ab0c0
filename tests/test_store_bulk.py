"""The responses store on SQLite: target rows, deliveries and the fleet read as one statement over a
JSON array (``store.SQLITE_BULK``)
and the ``executemany`` kept for SQLite libraries older than 3.38 must store the same rows, count
the same moves and refuse the same things, whatever the answers hold. The module constant is
switched here, per test, to run the older path on this machine's newer library."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from quanta.db import make_engine, migrate, store

HOSTILE = [
    'quote " and backslash \\ and \\u0000 as text',
    "newline\nand tab\t and \r carriage",
    "unicode: é ø 漢字 🚀 and a zero-width \u200b joiner",
    "nul in a cell: \x00 (cells may hold one)",
    "json lookalike: [1, 2, {\"a\": null}]",
    "sql lookalike: '); DROP TABLE results; --",
    "x" * 10_000,
]


@pytest.fixture(params=[True, False], ids=["json_each", "executemany"])
def engine(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> sa.Engine:
    if request.param and sqlite3.sqlite_version_info < (3, 38, 0):
        pytest.skip(f"SQLite {sqlite3.sqlite_version} has no ->> (3.38): only the executemany path runs here")
    monkeypatch.setattr(store, "SQLITE_BULK", request.param)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    migrate(url, "responses")
    return make_engine(url)


def _row(iid: int, dev: str, state: str = "success", **kw: object) -> dict:
    return dict(instruction_id=iid, device_id=dev, state=state, columns=kw.get("columns", ["Device", "Data"]),
                rows=kw.get("rows", [[dev, "x"]]), error=kw.get("error"))


def test_targets_are_inserted_once_and_the_existing_count_is_returned(engine: sa.Engine) -> None:
    targets = {f"d{i:05d}": i % 3 != 0 for i in range(3000)}
    assert store.insert_targets(engine, 7, targets, time.time() + 60) == 0
    assert store.insert_targets(engine, 7, {**targets, "late": True}, time.time() + 60) == 3000  # a retry
    counts = store.state_counts(engine, 7)
    assert counts == {"pending": 2000 + 1, "offline": 1000}, counts


def test_hostile_answers_are_stored_exactly_as_sent(engine: sa.Engine) -> None:
    devs = [f"dev-{i}" for i in range(len(HOSTILE))]
    store.insert_targets(engine, 1, {d: True for d in devs}, time.time() + 60)
    rows = [_row(1, d, columns=["Col \"1\"", "c\\2"], rows=[[v, 1, -2.5, None, True, 2 ** 62]], error=v if i % 2 else None)
            for i, (d, v) in enumerate(zip(devs, HOSTILE))]
    assert store.ingest_counted(engine, rows) == {1: len(devs)}
    with engine.connect() as c:
        got = {r.device_id: r for r in c.execute(sa.text(
            "SELECT device_id, state, columns, rows, error FROM results WHERE instruction_id = 1"))}
    for i, (d, v) in enumerate(zip(devs, HOSTILE)):
        r = got[d]
        assert r.state == "success"
        assert json.loads(r.columns) == ["Col \"1\"", "c\\2"]
        assert json.loads(r.rows) == [[v, 1, -2.5, None, True, 2 ** 62]]
        assert r.error == (v if i % 2 else None)


def test_only_open_targeted_rows_move_and_the_count_is_exact(engine: sa.Engine) -> None:
    store.insert_targets(engine, 2, {"a": True, "b": True, "c": False, "d": True}, time.time() + 60)
    assert store.mark_sent(engine, 2, ["a", "b", "stranger"]) == 2
    assert store.ingest_counted(engine, [_row(2, "a")]) == {2: 1}
    moved = store.ingest_counted(engine, [
        _row(2, "a", "error", error="second answer of a final device"),   # final stays final
        _row(2, "stranger"),                                               # never targeted: nothing
        _row(2, "b", "nocontent"), _row(2, "b", "error", error="dup"),     # first of two wins
        _row(2, "c"),                                                      # offline -> answered
        _row(99, "a"),                                                     # unknown instruction
    ])
    assert moved == {2: 2, 99: 0}, moved
    assert store.state_counts(engine, 2) == {"success": 2, "nocontent": 1, "pending": 1}
    assert store.mark_sent(engine, 2, ["a", "b", "c", "d"]) == 1  # only the one still pending
    with engine.connect() as c:
        n = c.execute(sa.text("SELECT count(*) FROM results")).scalar_one()
        err = c.execute(sa.text("SELECT error FROM results WHERE device_id = 'b'")).scalar_one()
    assert n == 4 and err is None


def test_a_large_batch_in_random_order_moves_every_row_once(engine: sa.Engine) -> None:
    import random

    devs = [f"sim-{i:06d}" for i in range(5000)]
    store.insert_targets(engine, 3, {d: True for d in devs}, time.time() + 60)
    order = devs * 2  # every device twice
    random.Random(5).shuffle(order)
    total = sum(store.ingest_counted(engine, [_row(3, d) for d in order[k:k + 2000]]).get(3, 0)
                for k in range(0, len(order), 2000))
    assert total == 5000
    assert store.state_counts(engine, 3) == {"success": 5000}


def test_a_device_id_with_a_nul_is_neither_cut_short_nor_confused(engine: sa.Engine) -> None:
    """The protocol refuses control characters in device ids; the store does not rely on it."""
    store.insert_targets(engine, 4, {"a\x00b": True, "a": True}, time.time() + 60)
    assert store.mark_sent(engine, 4, ["a\x00b"]) == 1
    assert store.ingest_counted(engine, [_row(4, "a\x00b")]) == {4: 1}
    assert store.state_counts(engine, 4) == {"success": 1, "pending": 1}



def test_the_whole_fleet_is_read_as_targets_with_who_is_online(engine: sa.Engine) -> None:
    from quanta.protocol import DeviceInfo

    migrate(str(engine.url), "master")
    ids = [f"t-{i:04d}" for i in range(1500)] + ['odd "quoted" \\ id é']
    store.register_devices(engine, [(d, f"{i + 1:x}") for i, d in enumerate(ids)])
    online = ids[::3]
    assert store.devices_online(engine, "sw", [DeviceInfo(device_id=d, fqdn="f", os="o", agent_version="1",
                                                          tags={}, address="") for d in online]) == []
    assert store.target_devices(engine, None) == {d: d in set(online) for d in ids}


def test_deliveries_find_each_row_by_its_key_not_by_scanning_the_open_rows(tmp_path: Path) -> None:
    """A delivery report names a few devices of an instruction with many open rows: each
    statement of mark_sent must look its rows up by the (instruction, device) key. With the ids in a
    subquery SQLite preferred ix_results_state and read every pending row of the instruction per
    report (7.5 ms for 10 ids with 50,000 rows open, against 1.1 ms by the key)."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    migrate(url, "responses")
    eng = make_engine(url)
    store.insert_targets(eng, 1, {f"d{i:05d}": True for i in range(5000)}, time.time() + 60)
    params = {"sqlite_bulk": (1.0, 1, '["d00001"]'), "sqlite": {"t": 1.0, "i": 1, "d": "d00001"}}
    with eng.connect() as c:
        for name, prm in params.items():
            plan = " / ".join(r[3] for r in c.exec_driver_sql("EXPLAIN QUERY PLAN " + store._MARK_SENT_SQL[name], prm))
            assert "USING INDEX sqlite_autoindex_results_1 (instruction_id=? AND device_id=?)" in plan, (name, plan)
            assert "ix_results_state" not in plan, (name, plan)
    assert store.mark_sent(eng, 1, [f"d{i:05d}" for i in range(0, 5000, 7)] + ["stranger"]) == len(range(0, 5000, 7))
    assert store.state_counts(eng, 1) == {"sent": len(range(0, 5000, 7)), "pending": 5000 - len(range(0, 5000, 7))}


def test_delivery_reports_of_hostile_device_ids_move_exactly_their_own_rows(engine: sa.Engine) -> None:
    """The ids of a Delivered go into a JSON array (or, with a NUL, an executemany): quotes,
    backslashes, JSON and SQL lookalikes and long ids each match their own row and nothing else."""
    ids = HOSTILE + ["plain"]
    store.insert_targets(engine, 5, {d: True for d in ids}, time.time() + 60)
    reported = HOSTILE[::2] + ["not targeted", "json lookalike: [1, 2"]  # the last: a prefix of a real id
    assert store.mark_sent(engine, 5, reported) == len(HOSTILE[::2])
    with engine.connect() as c:
        got = dict(c.execute(sa.text("SELECT device_id, state FROM results WHERE instruction_id = 5")).all())
    assert got == {d: "sent" if d in HOSTILE[::2] else "pending" for d in ids}
    assert store.mark_sent(engine, 5, reported) == 0  # a repeated report moves nothing again
