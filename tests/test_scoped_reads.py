"""Issue 11, scoped reads: every route that returns instruction or device data answers only with
what the caller may see (instructions of the instruction sets they hold a right on; counts, rows,
aggregates, software, held answers and the stream over the devices of their management groups),
a 404 where they see nothing, every route declares an access rule, and an out-of-range integer
is a 422. Route by route in process against real SQLite stores (and a real Catalog), then once
against a real server process with two real agents."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.pool import NullPool

from conftest import Server, make_server, quanta, wait_until
from quanta import instructions as ins
from quanta import rbac
from quanta.background import ContentStore
from quanta.catalog.api import build_router
from quanta.catalog.app import CatalogClient
from quanta.catalog.db import open_catalog
from quanta.catalog import store as catalog_store
from quanta.consumer_api.app import ConsumerApi, MissingAccessRule, check_access_rules, create_app, hash_password
from quanta.db import held as held_store
from quanta.db import make_engine, migrate, store, tables
from quanta.pki import Pki, Signer
from quanta.protocol import Response
from quanta.roles import FULL_ADMIN, ROLES

PASSWORD = "correct horse battery staple"
SECRET2 = "dev2-only-secret"  # in every answer of dev2: must never reach a reader limited to dev1
ROLE_USERS = {role: "u-" + role.lower().replace(" ", "-") for role in ROLES if role != FULL_ADMIN}


class _CatalogOverAsgi(CatalogClient):
    """The real Catalog client against the real Catalog API, served in process."""

    def __init__(self, client: TestClient, key: str) -> None:
        self.base_url = "http://catalog/Catalog"
        self._http = client
        client.headers["Authorization"] = f"Bearer {key}"

    def __exit__(self, *exc: object) -> None:
        pass


@dataclass
class World:
    api: ConsumerApi
    client: TestClient
    i_both: int  # targeted dev1 and dev2, both answered; held answers from both
    i_dev2: int  # targeted dev2 only
    i_software_set: int  # of instruction set "Software", dev1 answered
    i_pending_dev2: int  # pending approval, scope [dev2], no target rows yet
    i_pending_all: int  # pending approval, every device
    tokens: dict[str, dict[str, str]]

    def h(self, user: str) -> dict[str, str]:
        if user not in self.tokens:
            r = self.client.post("/Consumer/Authentication/Token", json={"username": user, "password": PASSWORD})
            assert r.status_code == 200, r.text
            self.tokens[user] = {"Authorization": f"Bearer {r.json()['token']}"}
        return self.tokens[user]


def _instruction(api: ConsumerApi, *, iset: str | None, targets: list[str], status: str = "finished",
                 scope: list[str] | None = None) -> int:
    now = time.time()
    with api.master.begin() as c:
        iid = c.execute(tables.instructions.insert().values(
            name="q", kind="question", payload="@x = Device.GetSummary();", parameters={}, scope=scope,
            created_by="admin", created_at=now, issued_at=now, expires_at=now + 600, status=status,
            targeted=len(targets), instruction_set=iset)).inserted_primary_key[0]
    if targets:
        store.insert_targets(api.responses, iid, dict.fromkeys(targets, True), now + 3600)
    return int(iid)


def _answer(api: ConsumerApi, iid: int, device: str, product: str, secret: str) -> None:
    store.ingest(api.responses, [dict(instruction_id=iid, device_id=device, state="success",
                                      columns=["Publisher", "Product", "Version", "X"],
                                      rows=[["Debian", product, "3.0.11-1", secret]], error=None)])


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    urls = {w: f"sqlite:///{tmp_path / f'{w}.db'}" for w in ("master", "responses")}
    for which, url in urls.items():
        migrate(url, which)
    pki = Pki(tmp_path / "pki")
    pki.create("localhost")
    master = make_engine(urls["master"])
    responses = make_engine(urls["responses"], poolclass=NullPool)
    cat_engine = open_catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    cat_app = FastAPI()
    cat_app.include_router(build_router(cat_engine), prefix="/Catalog")
    cat_key = catalog_store.add_key(cat_engine, "master")
    cat_client = TestClient(cat_app, base_url="http://catalog")
    api = ConsumerApi(master, responses, Signer.from_file(pki.signing_key), core_url="https://127.0.0.1:9",
                      core_token="t", content=ContentStore(tmp_path / "content"), catalog=lambda: _CatalogOverAsgi(cat_client, cat_key))
    hashed = hash_password(PASSWORD)  # one hash for every user: argon2 is slow on purpose
    with master.begin() as c:
        users = [("admin", FULL_ADMIN)] + [(u, r) for r, u in ROLE_USERS.items()] + [
            ("outsider", "Viewer"), ("setlimited", "Nobody"), ("ungrouped", "Viewer")]
        c.execute(tables.users.insert(), [dict(username=u, password_hash=hashed, role=r,
                                              created_at=time.time()) for u, r in users])
    for i, name in enumerate(("dev1", "dev2", "dev3")):
        store.register_device(master, name, f"{i + 1:04x}")
    with master.begin() as c:
        c.execute(tables.devices.update().values(switch="switch-1", online=True))
    store.set_switches(master, "127.0.0.1", 4000, 1)
    rbac.set_group(master, "g1", {"devices": ["dev1"]})
    rbac.set_group(master, "g-empty", {"devices": ["no-such-device"]})
    for user in [*ROLE_USERS.values(), "setlimited"]:
        rbac.add_member(master, user, "g1")
    rbac.add_member(master, "outsider", "g-empty")
    rbac.assign(master, "setlimited", "Questioner", "Processes")  # a right on one instruction set only

    i_both = _instruction(api, iset="Processes", targets=["dev1", "dev2"])
    _answer(api, i_both, "dev1", "openssl", "dev1-visible")
    _answer(api, i_both, "dev2", "mystery-tool-of-dev2", SECRET2)
    i_dev2 = _instruction(api, iset="Processes", targets=["dev2"], scope=["dev2"])
    _answer(api, i_dev2, "dev2", "openssl", SECRET2)
    i_sw = _instruction(api, iset="Software", targets=["dev1"], scope=["dev1"])
    _answer(api, i_sw, "dev1", "openssl", "dev1-visible")
    i_pending_dev2 = _instruction(api, iset="Processes", targets=[], status=ins.PENDING_APPROVAL, scope=["dev2"])
    i_pending_all = _instruction(api, iset="Processes", targets=[], status=ins.PENDING_APPROVAL)
    held_store.hold(responses, [
        dict(kind=k, instruction_id=i_both, device_id=d, switch="switch-1", state="success", reason="late",
             response=Response(instruction_id=i_both, status="success", columns=["X"],
                               rows=[[SECRET2 if d == "dev2" else "dev1-late"]]))
        for d in ("dev1", "dev2") for k in ("late", "refused")])
    with TestClient(create_app(api)) as client:
        yield World(api, client, i_both, i_dev2, i_sw, i_pending_dev2, i_pending_all, {})
    cat_client.close()


def _instruction_routes(iid: int) -> list[tuple[str, str, dict[str, Any]]]:
    base = f"/Consumer/Instructions/{iid}"
    return [("GET", base, {}), ("GET", f"{base}/Wait", {"timeout": 0}), ("GET", f"{base}/Responses", {}),
            ("GET", f"{base}/Aggregate", {"by": "X"}), ("GET", f"{base}/Software", {}),
            ("GET", f"{base}/Held", {}), ("GET", f"{base}/Stream", {}), ("POST", f"{base}/Cancel", {}),
            ("GET", f"{base}/Responses", {"sort": "-device", "device": "dev", "filter": "X:nonempty"}),
            ("GET", f"{base}/Responses", {"paging": "device"}),
            ("GET", f"{base}/Export", {"format": "csv"}), ("GET", f"{base}/Export", {"format": "ndjson"})]


def _stream_events(client: TestClient, iid: int, h: dict[str, str]) -> list[dict[str, Any]]:
    r = client.get(f"/Consumer/Instructions/{iid}/Stream", headers=h)
    assert r.status_code == 200, r.text
    return [json.loads(e.split("\n")[1].removeprefix("data: ")) for e in r.text.split("\n\n") if e]


# ---------------------------------------------------------------- route by route, every role
@pytest.mark.parametrize("role", list(ROLE_USERS))
def test_a_reader_limited_to_dev1_reads_nothing_of_dev2(world: World, role: str) -> None:
    c, h, iid = world.client, world.h(ROLE_USERS[role]), world.i_both
    # status and the long poll: counts over dev1 only
    for path, params in ((f"/Consumer/Instructions/{iid}", {}), (f"/Consumer/Instructions/{iid}/Wait", {"timeout": 0})):
        s = c.get(path, params=params, headers=h)
        assert s.status_code == 200, s.text
        assert (s.json()["targeted"], s.json()["states"]) == (1, {"success": 1}), s.json()
    # responses (rows, the default): dev1's rows only, counted alone, and only dev1's held answers
    r = c.get(f"/Consumer/Instructions/{iid}/Responses", headers=h).json()
    assert (r["total"], [x["device"] for x in r["rows"]]) == (1, ["dev1"]) and r["held"] == {"late": 1, "refused": 1}
    assert SECRET2 not in json.dumps(r)
    assert [x["device"] for x in c.get(f"/Consumer/Instructions/{iid}/Responses", params={"state": "success"},
                                       headers=h).json()["rows"]] == ["dev1"]
    by_device = c.get(f"/Consumer/Instructions/{iid}/Responses", params={"paging": "device"}, headers=h).json()
    assert (by_device["total"], [x["device"] for x in by_device["items"]]) == (1, ["dev1"])
    assert SECRET2 not in json.dumps(by_device)
    # sorted or filtered, and the export (every format): dev1's rows only
    rows = c.get(f"/Consumer/Instructions/{iid}/Responses", params={"sort": "-X"}, headers=h).json()
    assert (rows["total"], [x["device"] for x in rows["rows"]]) == (1, ["dev1"]) and SECRET2 not in json.dumps(rows)
    for params in ({"format": "csv"}, {"format": "json"}, {"format": "ndjson"}, {"format": "csv", "sort": "-X"},
                   {"format": "json", "filter": "X:contains:dev"}):
        e = c.get(f"/Consumer/Instructions/{iid}/Export", params=params, headers=h)
        assert e.status_code == 200, e.text
        assert "dev1-visible" in e.text and "dev2" not in e.text and SECRET2 not in e.text, (params, e.text)
    assert "dev2" not in c.get(f"/Consumer/Instructions/{iid}/Responses", params={"format": "csv"}, headers=h).text
    # aggregate over dev1's answers
    a = c.get(f"/Consumer/Instructions/{iid}/Aggregate", params={"by": "X"}, headers=h).json()
    assert a["devices"] == 1 and a["groups"] == [{"values": ["dev1-visible"], "rows": 1, "devices": 1}], a
    # software normalised by the real Catalog: dev1's openssl only, dev2's product not even unmatched
    sw = c.get(f"/Consumer/Instructions/{iid}/Software", headers=h)
    assert sw.status_code == 200, sw.text
    assert sw.json()["devices"] == 1 and sw.json()["raw_entries"] == 1 and sw.json()["unmatched_installations"] == 0
    assert [n["product"] for n in sw.json()["normalised"]] == ["OpenSSL"] and "dev2" not in sw.text
    # held: late ones of dev1 only; refused ones are for Full Administrators
    held = c.get(f"/Consumer/Instructions/{iid}/Held", headers=h).json()
    assert [x["device"] for x in held["items"]] == ["dev1"] and SECRET2 not in json.dumps(held)
    assert c.get(f"/Consumer/Instructions/{iid}/Held", params={"kind": "refused"}, headers=h).status_code == 403
    # the stream: counts over dev1 only
    events = _stream_events(c, iid, h)
    assert events and all((e["targeted"], e["states"]) == (1, {"success": 1}) for e in events), events
    # devices and switches: dev1 only; dev2 on its own is 404, the same as a device that does not exist
    assert [d["device_id"] for d in c.get("/Consumer/Devices", headers=h).json()] == ["dev1"]
    one = c.get("/Consumer/Devices/dev1", headers=h)
    assert one.status_code == 200 and SECRET2 not in one.text and world.i_dev2 not in [
        i["id"] for i in one.json()["instructions"]]
    for hidden in ("dev2", "no-such-device"):
        r = c.get(f"/Consumer/Devices/{hidden}", headers=h)
        assert (r.status_code, r.json()) == (404, {"detail": f"device {hidden} not found"}), (role, hidden)
    assert [(s["devices"], s["online_devices"]) for s in c.get("/Consumer/Switches", headers=h).json()] == [(1, 1)]
    # the instruction list: only instructions touching dev1 (or every device), counts over dev1
    page = c.get("/Consumer/Instructions", headers=h).json()
    assert {x["id"] for x in page["items"]} == {world.i_both, world.i_software_set, world.i_pending_all}
    assert page["total"] == 3 and SECRET2 not in json.dumps(page)
    by_id = {x["id"]: x for x in page["items"]}
    assert (by_id[iid]["targeted"], by_id[iid]["states"]) == (1, {"success": 1})
    assert c.get("/Consumer/Instructions", params={"status": "pending_approval"}, headers=h).json()["total"] == 1
    # an instruction of dev2 only (answered, or pending with dev2 as its scope): 404 on every route,
    # the same answer as for an instruction that does not exist
    for hidden in (world.i_dev2, world.i_pending_dev2, 999_999):
        for method, path, params in _instruction_routes(hidden):
            r = c.request(method, path, params=params, headers=h)
            assert r.status_code == 404, (role, method, path, r.status_code, r.text)
            assert r.json() == {"detail": f"instruction {hidden} not found"}


@pytest.mark.parametrize("role", ["Viewer", "Questioner"])
def test_filters_on_a_device_or_column_the_reader_cannot_see_reveal_nothing(world: World, role: str) -> None:
    """dev2 is outside the reader's groups: naming it (or a column only its answer has) in a
    device filter, a filter or a sort answers exactly as a device or column that does not exist,
    and every total counts the reader's rows only."""
    api, c, h = world.api, world.client, world.h(ROLE_USERS[role])
    iid = _instruction(api, iset="Processes", targets=["dev1", "dev2"])
    store.ingest(api.responses, [
        dict(instruction_id=iid, device_id="dev1", state="success", columns=["X"], rows=[["a"], ["b"]], error=None),
        dict(instruction_id=iid, device_id="dev2", state="success", columns=["X", "Dev2Only"],
             rows=[[SECRET2, 1]] * 5, error=None)])
    base = f"/Consumer/Instructions/{iid}/Responses"

    def get(**params: Any) -> httpx.Response:
        return c.get(base, params=params, headers=h)

    every = get().json()
    assert (every["total"], every["columns"], {x["device"] for x in every["rows"]}) == (2, ["X"], {"dev1"})
    assert get(sort="-device").json()["total"] == 2 and get(status="success").json()["total"] == 2
    for hidden, unknown in (({"device": "dev2"}, {"device": "nosuch"}),
                            ({"filter": "device:eq:dev2"}, {"filter": "device:eq:nosuch"}),
                            ({"filter": "device:startswith:dev2"}, {"filter": "device:startswith:nosuch"}),
                            ({"filter": f"X:eq:{SECRET2}"}, {"filter": "X:eq:nosuch"})):
        a, b = get(**hidden), get(**unknown)
        assert (a.status_code, a.json()["total"], a.json()["rows"], a.json()["columns"]) == \
            (b.status_code, b.json()["total"], b.json()["rows"], b.json()["columns"]) == (200, 0, [], ["X"]), hidden
    # dev1 matches "dev": one device of two, and only its 2 rows are counted
    assert get(device="dev").json()["total"] == 2 and get(filter="device:ne:dev1").json()["total"] == 0
    # a column only dev2's answer has is as unknown as one no answer has: the same 422, naming only X
    for term in ("sort", "filter"):
        a = get(**{term: "Dev2Only" if term == "sort" else "Dev2Only:eq:1"})
        b = get(**{term: "Nosuch00" if term == "sort" else "Nosuch00:eq:1"})
        assert a.status_code == b.status_code == 422
        assert a.text.replace("Dev2Only", "Nosuch00") == b.text and "device, status, error, X" in a.text
    for r in (get(device="dev2"), get(filter="Dev2Only:eq:1"), get(sort="Dev2Only"), get(offset=2)):
        assert SECRET2 not in r.text and "Dev2Only" not in r.text.replace("'Dev2Only'", ""), r.text
    # the CSV stream and the by-device view count the same rows
    assert c.get(base, params={"format": "csv", "device": "dev2"}, headers=h).text.splitlines() == ["device,status,X,error"]
    assert get(paging="device").json()["total"] == 1


def test_an_administrator_sees_everything(world: World) -> None:
    c, h, iid = world.client, world.h("admin"), world.i_both
    assert c.get(f"/Consumer/Instructions/{iid}", headers=h).json()["targeted"] == 2
    r = c.get(f"/Consumer/Instructions/{iid}/Responses", headers=h).json()
    assert [x["device"] for x in r["rows"]] == ["dev1", "dev2"] and r["held"] == {"late": 2, "refused": 2}
    assert r["total"] == 2 and SECRET2 in json.dumps(r)
    assert c.get(f"/Consumer/Instructions/{iid}/Aggregate", params={"by": "X"}, headers=h).json()["devices"] == 2
    sw = c.get(f"/Consumer/Instructions/{iid}/Software", headers=h).json()
    assert sw["raw_entries"] == 2 and sw["unmatched_installations"] == 1
    assert len(c.get(f"/Consumer/Instructions/{iid}/Held", params={"kind": "refused"}, headers=h).json()["items"]) == 2
    assert _stream_events(c, iid, h)[-1]["targeted"] == 2
    assert [d["device_id"] for d in c.get("/Consumer/Devices", headers=h).json()] == ["dev1", "dev2", "dev3"]
    assert c.get("/Consumer/Instructions", headers=h).json()["total"] == 5
    assert c.get(f"/Consumer/Instructions/{world.i_dev2}", headers=h).status_code == 200


def test_a_user_in_no_group_sees_every_device(world: World) -> None:
    """As documented: management groups limit a user; a user in none reaches every device."""
    c, h = world.client, world.h("ungrouped")
    assert c.get(f"/Consumer/Instructions/{world.i_both}", headers=h).json()["targeted"] == 2
    assert c.get("/Consumer/Instructions", headers=h).json()["total"] == 5


def test_a_user_with_no_visible_device_gets_404_and_empty_lists(world: World) -> None:
    c, h = world.client, world.h("outsider")  # a Viewer whose only group matches no device
    for iid in (world.i_both, world.i_dev2, world.i_software_set, world.i_pending_all):
        for method, path, params in _instruction_routes(iid):
            r = c.request(method, path, params=params, headers=h)
            assert r.status_code == 404, (method, path, r.text)
    assert c.get("/Consumer/Devices", headers=h).json() == []
    assert all(c.get(f"/Consumer/Devices/{d}", headers=h).status_code == 404 for d in ("dev1", "dev2", "dev3"))
    assert c.get("/Consumer/Instructions", headers=h).json() == {"offset": 0, "limit": 50, "total": 0, "items": []}
    assert [s["devices"] for s in c.get("/Consumer/Switches", headers=h).json()] == [0]


def test_no_right_on_the_instruction_set_is_404(world: World) -> None:
    c, h = world.client, world.h("setlimited")  # Questioner for "Processes" only, group g1
    assert c.get(f"/Consumer/Instructions/{world.i_both}", headers=h).json()["targeted"] == 1
    for method, path, params in _instruction_routes(world.i_software_set):
        assert c.request(method, path, params=params, headers=h).status_code == 404, path
    ids = {x["id"] for x in c.get("/Consumer/Instructions", headers=h).json()["items"]}
    assert ids == {world.i_both, world.i_pending_all}


def test_a_large_group_is_filtered_in_sql_without_one_parameter_per_device(world: World) -> None:
    """A management group of 20,000 devices: the reads join a temporary table of the reader's
    devices (no statement binds more than IN_CHUNK parameters) and the answers stay scoped."""
    api = world.api
    many = [f"bulk-{i:05d}" for i in range(20_000)]
    store.register_devices(api.master, [(d, f"b{i:05x}") for i, d in enumerate(many)])
    rbac.set_group(api.master, "g-big", {"devices": many[:15_000]})
    with api.master.begin() as c:
        c.execute(tables.users.insert().values(username="big", password_hash=hash_password(PASSWORD), role="Viewer",
                                               created_at=time.time()))
    rbac.add_member(api.master, "big", "g-big")
    iid = _instruction(api, iset="Processes", targets=many)
    store.ingest(api.responses, [dict(instruction_id=iid, device_id=d, state="success", columns=["X"], rows=[[d]],
                                      error=None) for d in many])
    widest: list[int] = []

    @sa.event.listens_for(api.responses, "before_cursor_execute")
    def count(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if not executemany:
            widest.append(len(params) if isinstance(params, (list, tuple, dict)) else 0)

    c, h = world.client, world.h("big")
    s = c.get(f"/Consumer/Instructions/{iid}", headers=h).json()
    assert s["targeted"] == 15_000 and s["states"] == {"success": 15_000}
    r = c.get(f"/Consumer/Instructions/{iid}/Responses", params={"offset": 14_999, "limit": 10}, headers=h).json()
    assert [x["device"] for x in r["rows"]] == [many[14_999]] and r["total"] == 15_000
    assert c.get(f"/Consumer/Instructions/{iid}/Aggregate", params={"by": "X"}, headers=h).json()["devices"] == 15_000
    rows = c.get(f"/Consumer/Instructions/{iid}/Responses", params={"sort": "-X", "limit": 2}, headers=h).json()
    assert rows["total"] == 15_000 and [x["device"] for x in rows["rows"]] == [many[14_999], many[14_998]]
    export = c.get(f"/Consumer/Instructions/{iid}/Export", params={"format": "csv"}, headers=h).text.splitlines()
    assert len(export) == 15_001 and export[-1].startswith(many[14_999] + ",") and many[15_000] not in export[-1]
    assert max(widest) <= store.IN_CHUNK, max(widest)
    assert len(c.get("/Consumer/Devices", headers=h).json()) == 15_000


# ---------------------------------------------------------------- every route declares its rule
PUBLIC = {"GET,HEAD /Consumer/openapi.json", "GET /Consumer/docs", "GET /Consumer/docs/init.js",
          "* /Consumer/docs/assets", "GET /Consumer/health", "POST /Consumer/Authentication/Token"}


def test_every_route_declares_an_access_rule(world: World) -> None:
    app = world.client.app
    rules = check_access_rules(app)  # type: ignore[arg-type]
    doc = world.client.get("/Consumer/openapi.json").json()
    in_doc = {f"{m.upper()} {path}" for path, ops in doc["paths"].items() for m in ops}
    assert in_doc and in_doc <= set(rules), in_doc - set(rules)
    assert {k for k, v in rules.items() if v == "public"} == PUBLIC
    # a route instruction data is read through names the instruction in its path: it must resolve it
    for key, rule in rules.items():
        if "{instruction_id}" in key and not key.endswith(("/Approve", "/Reject", "/ApprovalCode")):
            assert rule == "visible_instruction", (key, rule)
    # and the rules are enforced, not only declared: no route but the public ones answers a stranger
    for key in set(rules) - PUBLIC:
        methods, path = key.split(" ")
        r = world.client.request(methods.split(",")[0], path.replace("{instruction_id}", "1"))
        assert r.status_code == 401, (key, r.status_code)


def test_a_route_without_a_rule_is_refused(world: World) -> None:
    app = create_app(world.api)

    @app.get("/Consumer/Leak")
    async def leak() -> dict[str, str]:
        return {"all": "data"}

    with pytest.raises(MissingAccessRule, match="/Consumer/Leak"):
        check_access_rules(app)
    router = APIRouter()
    router.add_api_route("/Consumer/Other", leak)
    app2 = create_app(world.api)
    app2.include_router(router)
    with pytest.raises(MissingAccessRule, match="/Consumer/Other"):
        check_access_rules(app2)


# ---------------------------------------------------------------- integers out of range
@pytest.mark.parametrize("user", ["admin", ROLE_USERS["Viewer"]])
def test_integers_out_of_range_are_422(world: World, user: str) -> None:
    c, h, iid = world.client, world.h(user), world.i_both
    huge = ["9223372036854775808", "99999999999999999999", str(2**31), "-1"]
    for n in huge:
        for method, path, params in _instruction_routes(0):
            r = c.request(method, path.replace("/0", f"/{n}", 1), params=params, headers=h)
            assert r.status_code == 422, (n, path, r.status_code, r.text)
        for verb in ("Approve", "Reject", "ApprovalCode"):
            r = c.post(f"/Consumer/Instructions/{n}/{verb}", json={}, headers=h)
            assert r.status_code == 422, (n, verb, r.text)
        for path, name in (("/Consumer/Instructions", "offset"), ("/Consumer/Instructions", "limit"),
                           (f"/Consumer/Instructions/{iid}/Responses", "offset"),
                           (f"/Consumer/Instructions/{iid}/Responses", "limit"),
                           (f"/Consumer/Instructions/{iid}/Held", "offset"),
                           (f"/Consumer/Instructions/{iid}/Aggregate", "limit"),
                           (f"/Consumer/Instructions/{iid}/Software", "limit")):
            r = c.get(path, params={name: n, "by": "X"}, headers=h)
            assert r.status_code == 422, (path, name, n, r.text)
    for body in (b'{"payload": "@x = Device.GetSummary();", "instruction_ttl": 9223372036854775808}',
                 b'{"payload": "@x = Device.GetSummary();", "response_ttl": 99999999999999999999}',
                 b'{"payload": "@x = Device.GetSummary();", "scheduled_at": 1e999}',
                 b'{"payload": "@x = Device.GetSummary();", "scheduled_at": -5}',
                 b'{"payload": "@x = Device.GetSummary();", "parameters": {"N": 9223372036854775808}}',
                 b'{"definition": "d", "parameters": {"N": -99999999999999999999}}'):
        r = c.post("/Consumer/Instructions", content=body, headers={**h, "content-type": "application/json"})
        assert r.status_code == 422, (body, r.text)
    for length, want in (("99999999999999999999999", 413), ("not-a-number", 422)):
        r = c.post("/Consumer/Content", content=b"x", headers={**h, "content-length": length})
        assert r.status_code == (want if user == "admin" else 403), (length, r.status_code, r.text)


# ---------------------------------------------------------------- a real server process
@pytest.mark.slow
def test_scoped_reads_on_a_real_server(tmp_path: Path) -> None:
    s: Server = make_server(tmp_path)
    s.start()
    try:
        for name in ("dev1", "dev2"):
            s.enroll(name)
            s.start_agent(name)
        s.wait_online({"dev1", "dev2"})
        pw = tmp_path / "pw"
        pw.write_text(PASSWORD)
        quanta("user", "add", str(s.root), "--username", "vera", "--role", "Viewer", "--password-file", str(pw))
        quanta("group", "set", str(s.root), "--name", "g1", "--device", "dev1")
        quanta("group", "add-member", str(s.root), "--name", "g1", "--username", "vera")
        r = quanta("ask", str(s.root), "@s = Device.GetSummary(); SELECT * FROM @s;", "--json", "--wait", "30")
        out = json.loads(r.stdout)
        assert out["targeted"] == 2, out
        iid = out["instruction_id"]
        base = f"https://127.0.0.1:{s.https}"
        with httpx.Client(verify=str(s.root / "pki" / "ca.crt"), base_url=base, timeout=30) as c:
            tok = c.post("/Consumer/Authentication/Token", json={"username": "vera", "password": PASSWORD}).json()
            h = {"Authorization": f"Bearer {tok['token']}"}
            wait_until(lambda: c.get(f"/Consumer/Instructions/{iid}", headers=h).json()["states"] == {"success": 1},
                       30, "dev1's answer")
            st = c.get(f"/Consumer/Instructions/{iid}/Wait", params={"timeout": 0}, headers=h).json()
            assert st["targeted"] == 1
            page = c.get(f"/Consumer/Instructions/{iid}/Responses", headers=h).json()
            assert [x["device"] for x in page["rows"]] == ["dev1"] and page["total"] == 1
            assert [d["device_id"] for d in c.get("/Consumer/Devices", headers=h).json()] == ["dev1"]
            assert "dev2" not in c.get(f"/Consumer/Instructions/{iid}/Stream", headers=h).text
            assert c.get("/Consumer/Instructions/99999999999999999999", headers=h).status_code == 422
            assert c.get("/Consumer/Instructions", params={"offset": 2**63}, headers=h).status_code == 422
        rc = quanta("ask", str(s.root), "@s = Device.GetSummary(); SELECT * FROM @s;", "--json", "--wait", "30",
                    "--device", "dev2")
        only2 = json.loads(rc.stdout)["instruction_id"]
        with httpx.Client(verify=str(s.root / "pki" / "ca.crt"), base_url=base, timeout=30) as c:
            assert c.get(f"/Consumer/Instructions/{only2}/Responses", headers=h).status_code == 404
            assert only2 not in {x["id"] for x in c.get("/Consumer/Instructions", headers=h).json()["items"]}
    finally:
        s.stop()


# ---------------------------------------------------------------- server-assigned attributes
def test_groups_on_server_assigned_attributes_cannot_be_joined_by_a_device(world: World) -> None:
    """A device reports its own tags; a group rule on ``attributes`` matches only what an
    administrator assigned, so dev2 tagging itself ``site=paris`` does not put it in the group."""
    api, c = world.api, world.client
    with api.master.begin() as conn:
        conn.execute(tables.devices.update().where(tables.devices.c.device_id == "dev2").values(tags={"site": "paris"}))
        conn.execute(tables.users.insert().values(username="paris", password_hash=hash_password(PASSWORD),
                                                  role="Viewer", created_at=time.time()))
    rbac.set_group(api.master, "g-paris", {"attributes": {"site": "paris"}})
    rbac.add_member(api.master, "paris", "g-paris")
    h, admin = world.h("paris"), world.h("admin")
    assert c.get("/Consumer/Devices", headers=h).json() == []  # dev2's own tag does not count
    url = "/Consumer/Devices/dev1/Attributes"
    r = c.put(url, json={"site": "paris", "owner": "ops"}, headers=admin)
    assert r.status_code == 200 and r.json() == {"device_id": "dev1", "attributes": {"site": "paris", "owner": "ops"}}
    assert [d["device_id"] for d in c.get("/Consumer/Devices", headers=h).json()] == ["dev1"]
    assert c.get("/Consumer/Devices", headers=h).json()[0]["attributes"] == {"site": "paris", "owner": "ops"}
    assert c.get(f"/Consumer/Instructions/{world.i_both}", headers=h).json()["targeted"] == 1
    assert c.get(f"/Consumer/Instructions/{world.i_dev2}", headers=h).status_code == 404
    # only administrators set them; bad names, values, devices and bodies are refused, changing nothing
    assert c.put(url, json={"site": "x"}, headers=h).status_code == 403
    assert c.put(url, json={"site": "x"}, headers=world.h(ROLE_USERS["Group Administrator"])).status_code == 403
    assert c.put(url, json={"site": "x"}).status_code == 401
    for body in ({"bad name": "x"}, {"site": "x" * 256}, {"site": 5}, {"n" * 65: "x"}, ["site"], {"site": "a\x00b"},
                 {f"k{i}": "v" for i in range(65)}):
        r = c.put(url, json=body, headers=admin)
        assert r.status_code == 422, (body, r.text)
    assert c.put("/Consumer/Devices/nope/Attributes", json={"site": "paris"}, headers=admin).status_code == 404
    assert c.put("/Consumer/Devices/" + "d" * 256 + "/Attributes", json={}, headers=admin).status_code == 422
    assert c.get("/Consumer/Devices", headers=admin).json()[0]["attributes"] == {"site": "paris", "owner": "ops"}
    # removing the attribute takes the device out of the group at once
    assert c.put(url, json={"site": None}, headers=admin).json()["attributes"] == {"owner": "ops"}
    assert c.get("/Consumer/Devices", headers=h).json() == []
    with pytest.raises(ValueError, match="attributes must map"):
        rbac.set_group(api.master, "g-bad", {"attributes": ["site"]})


# ---------------------------------------------------------------- the SQL filter, SQLite and PostgreSQL
def test_scoped_store_reads_on_every_backend(db_url: str) -> None:
    """The store's scoped reads with a small scope (an IN) and a large one (a temporary table),
    twice on one pooled connection (the temporary table is refilled, not reused stale)."""
    migrate(db_url, "master")
    migrate(db_url, "responses")
    e = make_engine(db_url)
    ids = [f"d{i:05d}" for i in range(3000)]
    now = time.time()
    with e.begin() as c:
        iid = c.execute(tables.instructions.insert().values(
            name="q", kind="question", payload="x", parameters={}, scope=None, created_by="a", created_at=now,
            status="finished", targeted=len(ids), instruction_set="S")).inserted_primary_key[0]
        c.execute(tables.devices.insert(), [dict(device_id=d, tags={}) for d in ids])
    store.insert_targets(e, iid, dict.fromkeys(ids, True), now + 3600)
    store.ingest(e, [dict(instruction_id=iid, device_id=d, state="success", columns=["X"], rows=[[d]], error=None)
                     for d in ids[:1000]])
    for scope in (set(ids[:3]), set(ids[500:2500]), set(ids[2000:]), set(), None):
        want = sorted(scope) if scope is not None else ids
        assert sum(store.state_counts(e, iid, scope).values()) == len(want)
        assert store.state_counts_many(e, [iid], scope)[iid] == store.state_counts(e, iid, scope)
        assert [r["device_id"] for r in store.page_results(e, iid, 0, 5000, None, scope)] == want
        answered = [d for d in want if d in set(ids[:1000])]
        assert [r["device_id"] for r in store.page_results(e, iid, 0, 5000, "success", scope)] == answered
        assert store.aggregate(e, iid, ["X"], 10_000, scope)["devices"] == len(answered)
        assert [d["device_id"] for d in store.list_devices(e, scope)] == want
        assert store.visible_rows(e, iid, scope) == (True, bool(want))
        assert store.instructions_with_rows(e, scope) == ({iid} if want else set())
    many_ids = set(range(1, 2000)) | {iid}
    assert [r["id"] for r in store.list_instructions(e, 0, 10, ids=many_ids)[1]] == [iid]
    assert store.list_instructions(e, 0, 10, ids=set(range(iid + 1, iid + 900)))[0] == 0
    assert store.list_instructions(e, 0, 10, sets={"S"}, raw=False)[0] == 1
    assert store.list_instructions(e, 0, 10, sets={"T"}, raw=False)[0] == 0
