"""The device and purge queries at fleet size, on SQLite and PostgreSQL: 50,000 devices in one
DevicesOnline (more than PostgreSQL's 65,535 bind parameters if sent as one IN), only enrolled
devices registered, scoped targeting equal to the whole fleet filtered, and a bounded purge."""

from __future__ import annotations

import random
import time

import pytest
import sqlalchemy as sa

from quanta.db import make_engine, migrate, store, tables
from quanta.protocol import DeviceInfo

FLEET = 50_000


def _master(db_url: str) -> sa.Engine:
    migrate(db_url, "master")
    return make_engine(db_url)


def _responses(db_url: str) -> sa.Engine:
    migrate(db_url, "responses")
    return make_engine(db_url)


def _info(device_id: str, **kw: str) -> DeviceInfo:
    return DeviceInfo(device_id=device_id, fqdn=kw.get("fqdn", f"{device_id}.example"), os=kw.get("os", "Linux"),
                      agent_version="1", tags={"site": "paris"}, address=kw.get("address", "10.0.0.1"))


def _online(engine: sa.Engine) -> dict[str, bool]:
    with engine.connect() as c:
        return {r[0]: bool(r[1]) for r in c.execute(sa.select(tables.devices.c.device_id, tables.devices.c.online))}


def test_fifty_thousand_devices_online_offline_and_targeted(db_url: str) -> None:
    engine = _master(db_url)
    names = [f"dev-{i:05d}" for i in range(FLEET)]
    store.register_devices(engine, [(n, f"s{i:x}") for i, n in enumerate(names)])
    strangers = [f"stranger-{i}" for i in range(16_000)]  # 66,000 ids: over PostgreSQL's 65,535 binds
    refused = store.devices_online(engine, "switch-1", [_info(n) for n in names] + [_info(s) for s in strangers])
    assert refused == strangers
    online = _online(engine)
    assert len(online) == FLEET and all(online.values())  # every enrolled device, no stranger
    fleet = store.target_devices(engine, None)
    assert fleet == dict.fromkeys(names, True)
    assert store.target_devices(engine, names) == fleet  # a scope of the whole fleet, in chunks
    half = names[::2]
    store.devices_offline(engine, "switch-1", half + strangers)
    assert store.target_devices(engine, names) == {n: i % 2 == 1 for i, n in enumerate(names)}
    assert store.target_devices(engine, half) == dict.fromkeys(half, False)
    store.devices_offline(engine, "switch-1", None)
    assert not any(_online(engine).values())


def test_unknown_inventory_only_revoked_and_malformed_devices_are_refused_and_not_created(db_url: str) -> None:
    engine = _master(db_url)
    store.register_devices(engine, [("good", "s1"), ("gone", "s2"), ("twice", "s3"), ("careless", "s4")])
    store.mark_revoked(engine, "gone")
    with engine.begin() as c:  # imported by an Integrate connector: known, never enrolled
        c.execute(tables.devices.insert().values(device_id="cmdb-only", fqdn="cmdb.example", os="Windows", tags={},
                                                 source="cmdb"))
    before = {d["device_id"]: d for d in store.list_devices(engine)}
    hostile = [
        _info("good"),
        _info("gone"),  # revoked
        _info("cmdb-only"),  # inventory-only
        _info("nobody"),  # never enrolled (e.g. a server or interaction certificate's name)
        _info("x" * 256),  # longer than any device id
        _info("nul\x00id"),  # PostgreSQL refuses NUL in text
        _info("careless", fqdn="f" * 256),  # enrolled, but its hello does not fit the table
        _info("careless", os="Linux\x00"),
        _info("twice", fqdn="first.example"),
        _info("twice", fqdn="second.example"),  # the same device twice in one message: the last wins
        _info(""),
    ]
    refused = store.devices_online(engine, "switch-1", hostile)
    assert refused == ["gone", "cmdb-only", "nobody", "x" * 256, "nul\x00id", "careless", "careless", ""]
    after = {d["device_id"]: d for d in store.list_devices(engine)}
    assert set(after) == set(before)  # nothing created
    assert after["good"]["online"] and after["good"]["switch"] == "switch-1"
    assert (after["good"]["tags"], after["good"]["address"], after["good"]["fqdn"]) == (
        {"site": "paris"}, "10.0.0.1", "good.example")
    assert after["twice"]["online"] and after["twice"]["fqdn"] == "second.example"
    for untouched in ("gone", "cmdb-only", "careless"):
        assert after[untouched] == before[untouched], untouched
    # a revoked device is never targeted, an inventory-only one neither
    assert store.target_devices(engine, None) == {"good": True, "twice": True, "careless": False}
    # offline reports with ids that cannot be devices change nothing and do not fail
    store.devices_offline(engine, "switch-1", ["x" * 256, "nul\x00id", "", "twice"])
    assert store.target_devices(engine, None) == {"good": True, "twice": False, "careless": False}


def test_a_device_revoked_meanwhile_does_not_come_back_online(db_url: str) -> None:
    """The update repeats the enrolment condition, so a revocation that lands between the lookup
    and the update (another writer) wins."""
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite has one writer: no revocation can land inside the announcing transaction")
    engine = _master(db_url)
    other = make_engine(db_url)
    store.register_devices(engine, [("late", "s1")])
    fired = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def revoke_first(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("UPDATE DEVICES") and not fired:
            fired.append(True)
            store.mark_revoked(other, "late")

    try:
        assert store.devices_online(engine, "switch-1", [_info("late")]) == []  # enrolled when looked up
    finally:
        other.dispose()
    assert fired
    assert _online(engine) == {"late": False}


def _mixed_fleet(engine: sa.Engine) -> dict[str, bool]:
    """Devices of every kind the targeting rule distinguishes; returns the expected whole-fleet targets."""
    now = time.time()
    rows = []
    expected: dict[str, bool] = {}
    for i in range(12_000):  # more than two IN chunks
        kind = i % 6
        d = f"m-{i:05d}"
        row = dict(device_id=d, tags={}, online=False, revoked=False, cert_serial=f"s{i}", source=None, first_seen=None)
        if kind == 0:  # enrolled, online
            row.update(online=True, first_seen=now)
            expected[d] = True
        elif kind == 1:  # enrolled, offline (never connected)
            expected[d] = False
        elif kind == 2:  # revoked
            row.update(revoked=True, online=True, first_seen=now)
        elif kind == 3:  # inventory-only: imported, never enrolled nor connected
            row.update(cert_serial=None, source="cmdb")
        elif kind == 4:  # imported, then enrolled
            row.update(source="cmdb")
            expected[d] = False
        else:  # imported, and seen by an agent once, but never enrolled (no serial): it cannot
            # come online any more (devices_online refuses it), so it is not targeted
            row.update(cert_serial=None, source="cmdb", first_seen=now, online=True)
        rows.append(row)
    with engine.begin() as c:
        c.execute(tables.devices.insert(), rows)
    return expected


def test_scoped_targets_equal_the_whole_fleet_filtered(db_url: str) -> None:
    engine = _master(db_url)
    expected = _mixed_fleet(engine)
    fleet = store.target_devices(engine, None)
    assert fleet == expected
    names = [f"m-{i:05d}" for i in range(12_000)]
    rnd = random.Random(10)
    scopes = [
        [],
        names,
        names[:1],
        rnd.sample(names, 7_000) + ["unknown", "m-00000", "m-00000"],  # strangers and repeats
        ["m-00002", "m-00003"],  # revoked, inventory-only: nothing
        ["nul\x00", "x" * 300, "m-00006"],  # names that cannot be devices are not looked up
    ]
    for scope in scopes:
        wanted = set(scope)
        assert store.target_devices(engine, scope) == {d: o for d, o in fleet.items() if d in wanted}


def _expired_rows(engine: sa.Engine, n: int, expires_at: float, instruction_id: int) -> None:
    with engine.begin() as c:
        c.execute(tables.results.insert(), [dict(instruction_id=instruction_id, device_id=f"d{i}", state="success",
                                                 updated_at=0.0, expires_at=expires_at) for i in range(n)])


def test_purge_deletes_in_bounded_chunks(db_url: str) -> None:
    engine = _responses(db_url)
    now = time.time()
    _expired_rows(engine, 12_001, now - 10, 1)
    _expired_rows(engine, 300, now + 3600, 2)  # still within its response TTL
    deletes: list[int] = []

    @sa.event.listens_for(engine, "after_cursor_execute")
    def count(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("DELETE"):
            deletes.append(cursor.rowcount)

    assert store.purge_expired(engine, now=0.0) == 0  # an explicit time is that time (not "now")
    assert store.purge_expired(engine, chunk=5000, budget=0) == 5000  # out of time after one chunk
    assert store.purge_expired(engine, chunk=5000, budget=60) == 7001
    assert deletes == [0, 5000, 5000, 2001]  # one transaction per chunk, none larger
    assert store.state_counts(engine, 1) == {} and store.state_counts(engine, 2) == {"success": 300}
    assert store.purge_expired(engine) == 0


def test_purge_finds_expired_rows_through_the_index(db_url: str) -> None:
    engine = _responses(db_url)
    q = sa.select(tables.results.c.instruction_id).where(tables.results.c.expires_at < 1.0)
    sql = str(q.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
    with engine.connect() as c:
        if engine.dialect.name == "sqlite":
            plan = " ".join(str(r[-1]) for r in c.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
        else:  # an empty table would be scanned anyway: ask whether the index can serve the query
            c.exec_driver_sql("SET enable_seqscan = off")
            plan = " ".join(r[0] for r in c.exec_driver_sql(f"EXPLAIN {sql}"))
    assert "ix_results_expires_at" in plan, plan
