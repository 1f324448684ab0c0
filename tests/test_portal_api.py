"""The Consumer API routes behind the portal's management-groups, device and history pages, in
process against real SQLite stores (the world of tests/test_scoped_reads.py, reused): management
groups are managed by Full and Group Administrators (audited with the caller) and refused (403) to
every other role; ``GET /Consumer/Devices/{name}`` is scoped like every read (404 outside the
caller's groups, the same answer as for no such device); the instruction list's history search
(who, name, when, status) is bounded and validated (422 on bad input)."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from quanta.db import make_engine, migrate, store, tables
from quanta.roles import FULL_ADMIN, ROLES
from test_scoped_reads import ROLE_USERS, SECRET2, World, world  # noqa: F401  (world: the fixture)

USER_OF = {FULL_ADMIN: "admin", **ROLE_USERS}
MAY_MANAGE = {FULL_ADMIN, "Group Administrator"}


def _audit(world: World, action: str, obj: str) -> list[dict]:
    with world.api.master.connect() as c:
        return [dict(r._mapping) for r in c.execute(sa.select(tables.audit_log).where(
            tables.audit_log.c.action == action, tables.audit_log.c.target == obj).order_by(tables.audit_log.c.id))]


# ---------------------------------------------------------------- management groups, role by role
@pytest.mark.parametrize("role", ROLES)
def test_management_groups_are_managed_by_full_and_group_administrators_only(world: World, role: str) -> None:
    c, h = world.client, world.h(USER_OF[role])
    name = f"site-{role.split()[0].lower()}"
    rule = {"tags": {"site": "paris"}, "attributes": {"owner": "ops"}}
    put = c.put(f"/Consumer/ManagementGroups/{name}", json=rule, headers=h)
    listed = c.get("/Consumer/ManagementGroups", headers=h)
    if role not in MAY_MANAGE:
        assert (put.status_code, listed.status_code) == (403, 403), (put.text, listed.text)
        assert put.json()["detail"] == f"{USER_OF[role]} may not manage management groups"
        assert c.delete("/Consumer/ManagementGroups/g-empty", headers=h).status_code == 403
        # nothing changed, nothing audited
        admin = world.h("admin")
        assert name not in {g["name"] for g in c.get("/Consumer/ManagementGroups", headers=admin).json()}
        assert _audit(world, "group_set", name) == []
        return
    assert put.status_code == 200, put.text
    assert put.json() == {"name": name, "rule": rule, "members": []}
    groups = {g["name"]: g for g in listed.json()}
    assert groups[name]["rule"] == rule
    assert groups["g1"]["members"] == sorted([*ROLE_USERS.values(), "setlimited"])  # members shown
    # edit: one audit row per change, with the caller and the rule before and after
    edited = {"tags": {"site": "lyon"}}
    assert c.put(f"/Consumer/ManagementGroups/{name}", json=edited, headers=h).json()["rule"] == edited
    rows = _audit(world, "group_set", name)
    assert [(r["actor"], r["state_before"], r["state_after"]) for r in rows] == [
        (USER_OF[role], None, rule), (USER_OF[role], rule, edited)]
    assert c.put(f"/Consumer/ManagementGroups/{name}", json=edited, headers=h).status_code == 200
    assert len(_audit(world, "group_set", name)) == 2  # no change, no row
    # delete: refused while it has members, then done and audited
    assert c.delete("/Consumer/ManagementGroups/g1", headers=h).status_code == 409
    assert c.delete(f"/Consumer/ManagementGroups/{name}", headers=h).status_code == 204
    assert c.delete(f"/Consumer/ManagementGroups/{name}", headers=h).status_code == 404
    assert [r["actor"] for r in _audit(world, "group_delete", name)] == [USER_OF[role]]


def test_a_group_administrator_sends_hostile_rules_and_names(world: World) -> None:
    c, h = world.client, world.h(ROLE_USERS["Group Administrator"])
    before = c.get("/Consumer/ManagementGroups", headers=h).json()
    for body in ({"tags": {"bad key": "x"}}, {"tags": {"k": "v\x00"}}, {"os_like": ""}, {"unknown": 1},
                 {"tags": {"k": "x" * 256}}, {"devices": ["d\x1b[31m"]}, {"tags": {f"k{i}": "v" for i in range(65)}},
                 {"attributes": ["not", "a", "map"]}, {"devices": "dev1"}):
        r = c.put("/Consumer/ManagementGroups/hostile", json=body, headers=h)
        assert r.status_code == 422, (body, r.status_code, r.text)
    for name in ("%00bad", " lead", "a/b", "g" * 129, "x\u202ey"):
        assert c.put(f"/Consumer/ManagementGroups/{name}", json={}, headers=h).status_code in (404, 422), name
    r = c.put("/Consumer/ManagementGroups/hostile", content=b"{" * 10_000, headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 422
    assert c.get("/Consumer/ManagementGroups", headers=h).json() == before


# ---------------------------------------------------------------- one device
def test_device_detail_for_an_administrator(world: World) -> None:
    c, h = world.client, world.h("admin")
    with world.api.master.begin() as conn:
        conn.execute(tables.devices.update().where(tables.devices.c.device_id == "dev1").values(address="10.0.0.7"))
    c.put("/Consumer/Devices/dev1/Attributes", json={"site": "paris"}, headers=h).raise_for_status()
    c.put("/Consumer/ManagementGroups/g-paris", json={"attributes": {"site": "paris"}}, headers=h).raise_for_status()
    d = c.get("/Consumer/Devices/dev1", headers=h)
    assert d.status_code == 200, d.text
    d = d.json()
    assert d["device_id"] == "dev1" and d["online"] is True and d["switch"] == "switch-1"
    assert d["attributes"] == {"site": "paris"} and d["groups"] == ["g-paris", "g1"]
    assert d["address"] == "10.0.0.7" and "first_seen" in d
    assert [(i["id"], i["state"], i["status"]) for i in d["instructions"]] == [
        (world.i_software_set, "success", "finished"), (world.i_both, "success", "finished")]
    two = c.get("/Consumer/Devices/dev2", headers=h).json()
    assert [i["id"] for i in two["instructions"]] == [world.i_dev2, world.i_both] and two["groups"] == []
    assert [i["id"] for i in c.get("/Consumer/Devices/dev1", params={"recent": 1}, headers=h).json()["instructions"]] \
        == [world.i_software_set]
    for bad in ({"recent": 0}, {"recent": 201}, {"recent": "x"}, {"recent": 2**70}):
        assert c.get("/Consumer/Devices/dev1", params=bad, headers=h).status_code == 422, bad
    assert c.get("/Consumer/Devices/" + "d" * 256, headers=h).status_code == 422
    assert c.get("/Consumer/Devices/nope", headers=h).json() == {"detail": "device nope not found"}


@pytest.mark.parametrize("role", [r for r in ROLES if r != FULL_ADMIN])
def test_device_detail_is_scoped_to_the_callers_groups(world: World, role: str) -> None:
    c, h = world.client, world.h(ROLE_USERS[role])  # in g1: dev1 only
    d = c.get("/Consumer/Devices/dev1", headers=h)
    assert d.status_code == 200, d.text
    assert d.json()["groups"] == ["g1"] and SECRET2 not in d.text
    assert {i["id"] for i in d.json()["instructions"]} == {world.i_both, world.i_software_set}
    for other in ("dev2", "dev3", "no-such-device"):
        r = c.get(f"/Consumer/Devices/{other}", headers=h)
        assert (r.status_code, r.json()) == (404, {"detail": f"device {other} not found"}), (role, other)


def test_device_detail_lists_instructions_of_the_callers_sets_and_own_groups_only(world: World) -> None:
    c, admin = world.client, world.h("admin")
    c.put("/Consumer/ManagementGroups/g-all", json={}, headers=admin).raise_for_status()  # matches every device
    h = world.h("setlimited")  # Questioner for "Processes" only, in g1
    d = c.get("/Consumer/Devices/dev1", headers=h).json()
    assert [i["id"] for i in d["instructions"]] == [world.i_both]  # not the Software set's
    assert d["groups"] == ["g1"]  # g-all matches dev1 too, but it is not one of theirs
    assert "g-all" in c.get("/Consumer/Devices/dev1", headers=world.h(ROLE_USERS["Group Administrator"])).json()["groups"]
    assert c.get("/Consumer/Devices/dev1", headers=world.h("outsider")).status_code == 404  # a group of no device


# ---------------------------------------------------------------- history search
def _named(world: World, iid: int, name: str, by: str, at: float) -> None:
    with world.api.master.begin() as c:
        c.execute(tables.instructions.update().where(tables.instructions.c.id == iid)
                  .values(name=name, created_by=by, created_at=at))


def test_history_search_by_user_name_status_and_time(world: World) -> None:
    c, h = world.client, world.h("admin")
    day = 86400.0
    t0 = time.time() - 10 * day
    _named(world, world.i_both, "Disk usage 100%_", "alice", t0)
    _named(world, world.i_dev2, "disk free", "bob", t0 + day)
    _named(world, world.i_software_set, "Software inventory", "alice", t0 + 2 * day)

    def ids(**params: object) -> list[int]:
        r = c.get("/Consumer/Instructions", params=params, headers=h)
        assert r.status_code == 200, (params, r.text)
        assert r.json()["total"] == len(r.json()["items"])
        return [x["id"] for x in r.json()["items"]]

    assert ids(created_by="alice") == [world.i_software_set, world.i_both]
    assert ids(created_by="ALICE") == []  # user names are exact
    assert ids(name="DISK") == [world.i_dev2, world.i_both]
    assert ids(name="100%_") == [world.i_both] and ids(name="%") == [world.i_both]  # wildcards match themselves
    assert ids(name="_") == [world.i_both]
    assert ids(since=t0 + day, until=t0 + 2 * day) == [world.i_dev2]
    assert ids(since=t0 + day) == [world.i_pending_all, world.i_pending_dev2, world.i_software_set, world.i_dev2]
    assert ids(until=t0 + day) == [world.i_both]
    assert ids(created_by="alice", name="soft", status="finished") == [world.i_software_set]
    assert ids(created_by="alice", status="pending_approval,rejected") == []
    # a reader limited to dev1: the same search, over what they may see
    v = world.h(ROLE_USERS["Viewer"])
    r = c.get("/Consumer/Instructions", params={"name": "disk"}, headers=v).json()
    assert [x["id"] for x in r["items"]] == [world.i_both] and r["total"] == 1


@pytest.mark.parametrize("params", [
    {"status": "bogus"}, {"status": "finished,nope"}, {"status": "x" * 1001}, {"created_by": ""},
    {"created_by": "u" * 129}, {"created_by": "a\x00b"}, {"name": "n" * 256}, {"name": "\u202e"},
    {"since": -1}, {"since": "nan"}, {"until": "inf"}, {"since": 2**40}, {"since": "yesterday"},
    {"since": 100, "until": 100}, {"since": 200, "until": 100}, {"limit": 501}, {"offset": -1},
])
def test_history_search_refuses_bad_input(world: World, params: dict) -> None:
    r = world.client.get("/Consumer/Instructions", params=params, headers=world.h("admin"))
    assert r.status_code == 422, (params, r.status_code, r.text)
    assert r.json()["detail"]


# ---------------------------------------------------------------- the SQL, SQLite and PostgreSQL
def test_history_match_and_device_results_on_every_backend(db_url: str) -> None:
    """The history search and a device's recent results in SQL on both backends: a name part
    matches in any case with LIKE wildcards taken literally, times bound [since, until)."""
    migrate(db_url, "master")
    migrate(db_url, "responses")
    e = make_engine(db_url)
    base = time.time() - 1000
    rows = [("Disk 100%_ usage", "alice", base), ("disk free", "bob", base + 10), ("CPU", "alice", base + 20),
            ("x'; DROP TABLE instructions; --", "mallory", base + 30)]
    with e.begin() as c:
        ids = [int(c.execute(tables.instructions.insert().values(
            name=n, kind="question", payload="x", parameters={}, scope=None, created_by=by, created_at=at,
            status="finished", targeted=1, instruction_set=None)).inserted_primary_key[0]) for n, by, at in rows]
    M = store.InstructionMatch

    def found(m: store.InstructionMatch) -> list[int]:
        total, got = store.list_instructions(e, 0, 10, match=m)
        assert total == len(got) and [i for i, _ in store.instruction_scopes(e, match=m)] == sorted(r["id"] for r in got)
        return [r["id"] for r in got]

    assert found(M(name="DISK")) == [ids[1], ids[0]]
    assert found(M(name="%_")) == [ids[0]] and found(M(name="_")) == [ids[0]] and found(M(name="%")) == [ids[0]]
    assert found(M(name="'; drop")) == [ids[3]]
    assert found(M(created_by="alice")) == [ids[2], ids[0]] and found(M(created_by="Alice")) == []
    assert found(M(since=base + 10, until=base + 20)) == [ids[1]]
    assert found(M(created_by="alice", name="cpu", since=base)) == [ids[2]]
    assert store.list_instructions(e, 0, 10)[0] == 4  # the table is still there
    store.insert_targets(e, ids[0], {"dev1": True}, time.time() + 3600)
    store.insert_targets(e, ids[2], {"dev1": True, "dev2": True}, time.time() + 3600)
    store.ingest(e, [dict(instruction_id=ids[2], device_id="dev1", state="error", columns=None, rows=None, error="boom")])
    got = store.device_results(e, "dev1", 10)
    assert [(r["instruction_id"], r["state"], r["error"]) for r in got] == [(ids[2], "error", "boom"), (ids[0], "pending", None)]
    assert [r["instruction_id"] for r in store.device_results(e, "dev1", 1)] == [ids[2]]
    assert store.device_results(e, "dev2'--", 10) == []
    e.dispose()
