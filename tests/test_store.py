"""The databases: migrations and the idempotent response path, on SQLite and PostgreSQL."""

import time

import sqlalchemy as sa

from quanta.db import make_engine, migrate, store, tables
from quanta.protocol import DeviceInfo


def _engines(db_url):
    migrate(db_url, "master")
    migrate(db_url, "responses")
    e = make_engine(db_url)
    return e, e


def test_migrations_create_the_declared_schema(db_url):
    master, _ = _engines(db_url)
    names = set(sa.inspect(master).get_table_names())
    assert {t.name for t in tables.master.sorted_tables} | {"results"} <= names
    assert "SwitchConfiguration" in names
    migrate(db_url, "master")  # running again is a no-op
    cols = {c["name"] for c in sa.inspect(master).get_columns("SwitchConfiguration")}
    assert {"Name", "Host", "Port", "Enabled"} <= cols


def test_ingest_is_idempotent_per_instruction_and_device(db_url):
    master, responses = _engines(db_url)
    store.insert_targets(responses, 1, {"a": True, "b": True, "c": False}, time.time() + 3600)
    store.insert_targets(responses, 1, {"a": True, "b": True, "c": False}, time.time() + 3600)  # retry
    assert store.state_counts(responses, 1) == {"pending": 2, "offline": 1}
    assert store.mark_sent(responses, 1, ["a", "b"]) == 2
    row = dict(instruction_id=1, device_id="a", state="success", columns=["X"], rows=[[1]], error=None)
    store.ingest(responses, [row])
    store.ingest(responses, [row, {**row, "state": "error", "error": "late duplicate"}])
    counts = store.state_counts(responses, 1)
    assert counts == {"success": 1, "sent": 1, "offline": 1}
    page = store.page_results(responses, 1, 0, 10)
    assert [r["device_id"] for r in page] == ["a", "b", "c"]
    assert page[0]["rows"] == [[1]] and page[0]["error"] is None
    # an answer from a device that was not targeted is not counted
    store.ingest(responses, [{**row, "device_id": "zzz"}])
    assert sum(store.state_counts(responses, 1).values()) == 3


def test_expiry_gives_every_device_one_final_state(db_url):
    _, responses = _engines(db_url)
    store.insert_targets(responses, 2, {"a": True, "b": True, "c": False}, time.time() + 3600)
    store.mark_sent(responses, 2, ["a"])
    store.ingest(responses, [dict(instruction_id=2, device_id="b", state="nocontent", columns=[], rows=[], error=None)])
    store.expire(responses, 2)
    assert store.state_counts(responses, 2) == {"expired": 1, "nocontent": 1, "offline": 1}
    # a late answer after the window changes nothing
    store.ingest(responses, [dict(instruction_id=2, device_id="a", state="success", columns=[], rows=[], error=None)])
    assert store.state_counts(responses, 2) == {"expired": 1, "nocontent": 1, "offline": 1}


def test_response_ttl_purge(db_url):
    _, responses = _engines(db_url)
    store.insert_targets(responses, 3, {"a": True}, time.time() - 1)
    store.insert_targets(responses, 4, {"a": True}, time.time() + 3600)
    assert store.purge_expired(responses) == 1
    assert store.state_counts(responses, 3) == {} and store.state_counts(responses, 4) == {"pending": 1}


def test_device_presence(db_url):
    master, _ = _engines(db_url)
    store.register_devices(master, [("d1", "abc"), ("d2", "def")])
    refused = store.devices_online(master, "switch-1", [
        DeviceInfo(device_id="d1", fqdn="d1.x", os="Linux", agent_version="1"),
        DeviceInfo(device_id="d2", fqdn="d2.x", os="Linux", agent_version="1"),
        DeviceInfo(device_id="stranger", fqdn="s.x", os="Linux", agent_version="1")])
    assert refused == ["stranger"]  # never enrolled: refused, not created
    devs = {d["device_id"]: d for d in store.list_devices(master)}
    assert set(devs) == {"d1", "d2"}
    assert devs["d1"]["online"] and devs["d2"]["online"] and devs["d1"]["fqdn"] == "d1.x"
    assert devs["d1"]["switch"] == "switch-1" and devs["d1"]["first_seen"] is not None
    store.devices_offline(master, "switch-2", ["d2"])  # another Switch's devices do not change
    assert store.target_devices(master, None) == {"d1": True, "d2": True}
    store.devices_offline(master, "switch-1", ["d2"])
    assert store.target_devices(master, None) == {"d1": True, "d2": False}
    store.devices_offline(master, "switch-1", None)
    assert store.target_devices(master, ["d1"]) == {"d1": False}
    assert store.mark_revoked(master, "d1") == ["abc"]
    assert store.target_devices(master, None) == {"d2": False}
    assert store.devices_online(master, "switch-1", [DeviceInfo("d1", "d1.x", "Linux", "1")]) == ["d1"]  # revoked
    assert not {d["device_id"]: d for d in store.list_devices(master)}["d1"]["online"]


def test_migrations_agree_with_tables(db_url):
    """Every table, column and index of tables.py is what the migrations create, and no more."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    master, _ = _engines(db_url)
    for metadata in (tables.master, tables.responses):
        def ours(name, type_, parents, md=metadata):  # both schemas may share one test database
            if type_ == "schema":
                return True
            return (name if type_ == "table" else parents.get("table_name")) in md.tables

        with master.connect() as c:
            ctx = MigrationContext.configure(c, opts={"include_name": ours, "compare_type": True})
            assert compare_metadata(ctx, metadata) == []


def test_aggregate_groups_answered_rows(db_url):
    _, responses = _engines(db_url)
    store.insert_targets(responses, 9, {"a": True, "b": True, "c": True, "d": True}, time.time() + 3600)
    store.ingest(responses, [
        dict(instruction_id=9, device_id="a", state="success", columns=["Exe", "N"], rows=[["ssh", 1], ["bash", 2]], error=None),
        dict(instruction_id=9, device_id="b", state="success", columns=["Exe", "N"], rows=[["ssh", 3], ["ssh", 4]], error=None),
        dict(instruction_id=9, device_id="c", state="success", columns=["Other"], rows=[["x"]], error=None),
        dict(instruction_id=9, device_id="d", state="error", columns=None, rows=None, error="boom"),
    ])
    agg = store.aggregate(responses, 9, ["Exe"])
    assert agg["groups"][0] == {"values": ["ssh"], "rows": 3, "devices": 2}
    assert agg["groups"][1] == {"values": ["bash"], "rows": 1, "devices": 1}
    assert agg["devices"] == 3 and agg["missing"] == 1 and not agg["truncated"]
    assert store.aggregate(responses, 9, ["Exe"], limit=1)["truncated"]
