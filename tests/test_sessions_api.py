"""Issue 11, sessions, user administration and audit over the Consumer API, against a real server
process over real TLS: logout ends the token at once; a locked account is 429 + Retry-After for
the right password too, and every attempt is in GET /Consumer/Audit; users are listed, changed,
disabled (the live token fails at once); a Viewer gets 403 on every administrator route; hostile
bodies are refused changing nothing; no route changes an audit row."""

from __future__ import annotations

import csv
import io
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from conftest import Server, make_server
from quanta.consumer_api.app import ConsumerApi, check_access_rules, create_app
from quanta.db import make_engine
from quanta.pki import Pki, Signer

pytestmark = pytest.mark.slow

PW = "correct horse battery staple"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = make_server(tmp_path_factory.mktemp("sessions"))
    s.start()
    try:
        creds = dict(line.split("=", 1) for line in (s.root / "admin.credentials").read_text().split())
        s.admin = (creds["username"], creds["password"])  # type: ignore[attr-defined]
        yield s
    finally:
        s.stop()


@pytest.fixture
def c(srv: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"https://localhost:{srv.https}", verify=ssl.create_default_context(cafile=srv.root / "pki" / "ca.crt"),
                      timeout=30) as client:
        yield client


def login(c: httpx.Client, user: str, password: str) -> httpx.Response:
    return c.post("/Consumer/Authentication/Token", json={"username": user, "password": password})


def bearer(c: httpx.Client, user: str, password: str) -> dict[str, str]:
    r = login(c, user, password)
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def admin(c: httpx.Client, srv: Server) -> dict[str, str]:
    return bearer(c, *srv.admin)  # type: ignore[attr-defined]


def make_user(c: httpx.Client, h: dict[str, str], name: str, role: str = "Viewer", **extra: Any) -> dict[str, Any]:
    r = c.post("/Consumer/Users", json={"username": name, "password": PW, "role": role, **extra}, headers=h)
    assert r.status_code == 201, r.text
    return r.json()


def audit(c: httpx.Client, h: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    r = c.get("/Consumer/Audit", params={"limit": 1000, **params}, headers=h)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_logout_ends_the_token_at_once(c: httpx.Client, srv: Server) -> None:
    r = login(c, *srv.admin)  # type: ignore[attr-defined]
    tok = r.json()
    assert set(tok) >= {"token", "expires_at", "username", "role", "absolute_expires_at"}
    # short-lived (minutes), renewed while in use, within an absolute limit
    assert time.time() < tok["expires_at"] <= time.time() + 15 * 60 + 5 < tok["absolute_expires_at"]
    h = {"Authorization": f"Bearer {tok['token']}"}
    assert c.get("/Consumer/Devices", headers=h).status_code == 200
    other = admin(c, srv)  # another session of the same user lives on
    r = c.post("/Consumer/Authentication/Logout", headers=h)
    assert r.status_code == 204 and r.content == b""
    for path in ("/Consumer/Devices", "/Consumer/Users", "/Consumer/Instructions"):
        r = c.get(path, headers=h)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
    assert c.post("/Consumer/Authentication/Logout", headers=h).status_code == 401
    assert c.post("/Consumer/Authentication/Logout").status_code == 401
    for bad in ("x" * 8000, "short", tok["token"] + "x", tok["token"].upper(), "Basic " + tok["token"]):
        r = c.get("/Consumer/Devices", headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code == 401, (bad[:20], r.status_code)
    assert c.get("/Consumer/Devices", headers=other).status_code == 200
    assert [e["action"] for e in audit(c, other, action="logout")] == ["logout"]


def test_twelve_wrong_passwords_then_the_right_one_is_429_and_audited(c: httpx.Client, srv: Server) -> None:
    h = admin(c, srv)
    make_user(c, h, "lola")
    codes = []
    for _ in range(12):
        r = login(c, "lola", "not the password at all")
        codes.append(r.status_code)
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) > 0
    assert codes[:4] == [401] * 4 and set(codes[4:]) == {429}, codes
    r = login(c, "lola", PW)  # the right password: locked all the same
    assert r.status_code == 429 and 0 < int(r.headers["retry-after"]) <= 15 * 60, r.text
    assert "password" not in r.text.lower() or "too many" in r.text
    rows = audit(c, h, object="lola")
    actions = [e["action"] for e in rows]
    assert actions.count("login_failed") == 5 and actions.count("lockout") == 0  # its object is user:lola
    assert actions.count("login_locked") == 8 and actions[0] == "login_locked"  # the right one, refused
    assert all(e["source"] == "127.0.0.1" and e["actor"] == "lola" for e in rows if e["action"].startswith("login"))
    assert [e["action"] for e in audit(c, h, object="user:lola")] == ["lockout"]
    # locks are visible to administrators, who can lift them
    locks = c.get("/Consumer/Locks", headers=h).json()
    assert [(x["kind"], x["subject"]) for x in locks] == [("user", "lola")] and locks[0]["failures"] == 5
    assert c.get("/Consumer/Users/lola", headers=h).json()["locked_until"] > time.time()
    assert c.delete("/Consumer/Locks/user/lola", headers=h).status_code == 204
    assert c.delete("/Consumer/Locks/user/lola", headers=h).status_code == 404
    assert c.delete("/Consumer/Locks/nonsense/lola", headers=h).status_code == 422
    assert login(c, "lola", PW).status_code == 200
    # both asks are audited (the second found no live lock, and forgot the failures all the same)
    assert [(e["action"], e["before"] is not None) for e in audit(c, h, action="unlock")] == [
        ("unlock", False), ("unlock", True)]
    # the address's failures are forgotten too, so later tests start clean
    c.delete("/Consumer/Locks/source/127.0.0.1", headers=h)


def test_users_are_listed_changed_and_a_disabled_users_token_fails_at_once(c: httpx.Client, srv: Server) -> None:
    h = admin(c, srv)
    c.put("/Consumer/ManagementGroups/g-one", json={"devices": ["dev1"]}, headers=h).raise_for_status()
    made = make_user(c, h, "dora", "Questioner", email="dora@example.com", groups=["g-one"],
                     assignments=[{"role": "Actioner", "instruction_set": "Processes"}])
    assert made["groups"] == ["g-one"] and made["assignments"] == [{"role": "Actioner", "instruction_set": "Processes"}]
    assert c.post("/Consumer/Users", json={"username": "dora", "password": PW, "role": "Viewer"},
                  headers=h).status_code == 409
    names = [u["username"] for u in c.get("/Consumer/Users", headers=h).json()]
    assert {srv.admin[0], "dora"} <= set(names) and names == sorted(names)  # type: ignore[attr-defined]
    assert "password" not in c.get("/Consumer/Users", headers=h).text.replace("password_changed_at", "")
    dora = bearer(c, "dora", PW)
    assert c.get("/Consumer/Devices", headers=dora).status_code == 200
    assert c.get("/Consumer/Users/dora", headers=h).json()["sessions"] == 1
    r = c.patch("/Consumer/Users/dora", json={"role": "Viewer", "email": None}, headers=h)
    assert r.status_code == 200 and (r.json()["role"], r.json()["email"]) == ("Viewer", None)
    r = c.patch("/Consumer/Users/dora", json={"disabled": True}, headers=h)
    assert r.status_code == 200 and r.json()["disabled"] is True and r.json()["sessions"] == 0
    assert c.get("/Consumer/Devices", headers=dora).status_code == 401  # at once
    assert login(c, "dora", PW).status_code == 401
    assert c.patch("/Consumer/Users/dora", json={"disabled": False}, headers=h).json()["disabled"] is False
    dora = bearer(c, "dora", PW)
    # an administrator resets the password: every session ends
    r = c.post("/Consumer/Users/dora/Password", json={"password": "a brand new long password"}, headers=h)
    assert r.status_code == 200 and r.json() == {"username": "dora", "sessions_ended": 1}
    assert c.get("/Consumer/Devices", headers=dora).status_code == 401
    dora = bearer(c, "dora", "a brand new long password")
    # she changes her own: a wrong current password is refused; the right one ends her sessions
    r = c.post("/Consumer/Authentication/Password", json={"old_password": "wrong one!!", "new_password": PW + "!"},
               headers=dora)
    assert r.status_code == 401
    r = c.post("/Consumer/Authentication/Password",
               json={"old_password": "a brand new long password", "new_password": PW + "!"}, headers=dora)
    assert r.status_code == 200 and r.json()["username"] == "dora", r.text
    assert c.get("/Consumer/Devices", headers=dora).status_code == 401
    assert c.get("/Consumer/Devices", headers={"Authorization": f"Bearer {r.json()['token']}"}).status_code == 200
    # management groups: listed with members; one with members cannot be deleted
    groups = {g["name"]: g for g in c.get("/Consumer/ManagementGroups", headers=h).json()}
    assert groups["g-one"] == {"name": "g-one", "rule": {"devices": ["dev1"]}, "members": ["dora"]}
    assert c.delete("/Consumer/ManagementGroups/g-one", headers=h).status_code == 409
    assert c.patch("/Consumer/Users/dora", json={"groups": []}, headers=h).json()["groups"] == []
    assert c.delete("/Consumer/ManagementGroups/g-one", headers=h).status_code == 204
    assert c.delete("/Consumer/ManagementGroups/g-one", headers=h).status_code == 404
    # the last Full Administrator cannot be disabled, demoted or deleted; nobody deletes themselves
    me = srv.admin[0]  # type: ignore[attr-defined]
    assert c.patch(f"/Consumer/Users/{me}", json={"disabled": True}, headers=h).status_code == 409
    assert c.patch(f"/Consumer/Users/{me}", json={"role": "Viewer"}, headers=h).status_code == 409
    assert c.delete(f"/Consumer/Users/{me}", headers=h).status_code == 409
    assert c.delete("/Consumer/Users/dora", headers=h).status_code == 204
    assert c.get("/Consumer/Users/dora", headers=h).status_code == 404
    # every change above is one audit row, with before and after
    acts = [e["action"] for e in audit(c, h, object="dora")]
    for a in ("user_create", "user_update", "user_disable", "user_enable", "password_reset", "password_change",
              "password_change_failed", "user_delete"):
        assert a in acts, (a, acts)
    upd = audit(c, h, object="dora", action="user_update")[-1]
    assert upd["before"]["role"] == "Questioner" and upd["after"]["role"] == "Viewer"
    assert upd["actor"] == me and upd["source"] == "127.0.0.1"
    gs = audit(c, h, object="g-one")
    assert [e["action"] for e in gs] == ["group_delete", "group_set"] and gs[1]["after"] == {"devices": ["dev1"]}


def _admin_routes(srv: Server, tmp: Path) -> list[tuple[str, str]]:
    """Every route whose access rule is admin (or the groups right, which a Viewer lacks too), from
    the app the server runs (built in process)."""
    pki = Pki(srv.root / "pki")
    api = ConsumerApi(make_engine(f"sqlite:///{tmp / 'm.db'}"), make_engine(f"sqlite:///{tmp / 'r.db'}"),
                      Signer.from_file(pki.signing_key), core_url="https://127.0.0.1:9", core_token="t")
    rules = check_access_rules(create_app(api))
    out = []
    for key, rule in rules.items():
        if rule in ("admin", "right:groups"):
            methods, path = key.split(" ")
            out += [(m, path) for m in methods.split(",") if m != "HEAD"]
    return out


def test_a_viewer_gets_403_on_every_administrator_route(c: httpx.Client, srv: Server, tmp_path: Path) -> None:
    h = admin(c, srv)
    make_user(c, h, "vic")
    v = bearer(c, "vic", PW)
    routes = _admin_routes(srv, tmp_path)
    for want in ("GET /Consumer/Users", "POST /Consumer/Users", "PATCH /Consumer/Users/{name}",
                 "DELETE /Consumer/Users/{name}", "GET /Consumer/Users/{name}", "POST /Consumer/Users/{name}/Password",
                 "GET /Consumer/Locks", "DELETE /Consumer/Locks/{kind}/{subject}", "GET /Consumer/Audit",
                 "GET /Consumer/ManagementGroups", "PUT /Consumer/ManagementGroups/{name}",
                 "DELETE /Consumer/ManagementGroups/{name}"):
        assert tuple(want.split(" ")) in routes, want
    fill = {"{name}": srv.admin[0], "{kind}": "user", "{subject}": "vic", "{device_id}": "dev1"}  # type: ignore[attr-defined]
    for method, path in routes:
        for k, val in fill.items():
            path = path.replace(k, val)
        r = c.request(method, path, json={} if method in ("POST", "PUT", "PATCH") else None, headers=v)
        assert r.status_code == 403, (method, path, r.status_code, r.text)
    # nothing changed: the administrator is still one, and enabled
    me = c.get(f"/Consumer/Users/{srv.admin[0]}", headers=h).json()  # type: ignore[attr-defined]
    assert me["role"] == "Full Administrator" and not me["disabled"]


def test_hostile_bodies_are_refused_changing_nothing(c: httpx.Client, srv: Server) -> None:
    h = admin(c, srv)
    make_user(c, h, "hana")
    before = c.get("/Consumer/Users", headers=h).json()
    ok = {"username": "hx", "password": PW, "role": "Viewer"}
    for body in (ok | {"admin": True}, ok | {"username": "a\x00b"}, ok | {"password": "pw\x00" + "x" * 20},
                 ok | {"username": "x" * 129}, ok | {"password": "x" * 1025}, ok | {"role": "Emperor"},
                 ok | {"role": 5}, ok | {"username": ["hx"]}, ok | {"groups": "g"}, ok | {"groups": ["no-such"]},
                 ok | {"email": "not an address"}, ok | {"email": "a\x00@b.c"}, ok | {"password": "short"},
                 ok | {"password": "hx" * 1}, ok | {"assignments": [{"role": "Viewer"}]},
                 ok | {"assignments": [{"role": "Viewer", "instruction_set": "S", "x": 1}]},
                 ok | {"groups": ["g"] * 257}, {k: v for k, v in ok.items() if k != "role"}, [ok], "x", 5):
        r = c.post("/Consumer/Users", json=body, headers=h)
        assert r.status_code == 422, (body if not isinstance(body, dict) else list(body), r.status_code, r.text)
    for body in ({"disabled": "yes"}, {"disabled": 1}, {"disabled": None}, {"role": None}, {}, {"sessions": 0},
                 {"groups": None}, {"role": "x" * 65}, {"email": "x" * 255}, {"assignments": [["Viewer", "*"]]}):
        r = c.patch("/Consumer/Users/hana", json=body, headers=h)
        assert r.status_code == 422, (body, r.status_code, r.text)
    for body in ({"password": 12345678901234}, {"password": "x" * 5000}, {"pw": PW}):
        assert c.post("/Consumer/Users/hana/Password", json=body, headers=h).status_code == 422, body
    for body in ({"tags": {"bad key": "x"}}, {"tags": {"k": 5}}, {"devices": ["d\x00"]}, {"devices": "dev1"},
                 {"os_like": ""}, {"rules": []}, {"attributes": {"k": "v" * 256}}, {"os_like": "lin\x00*"}):
        r = c.put("/Consumer/ManagementGroups/hg", json=body, headers=h)
        assert r.status_code == 422, (body, r.status_code, r.text)
    assert c.put("/Consumer/ManagementGroups/%00bad", json={}, headers=h).status_code == 422
    assert c.put("/Consumer/ManagementGroups/" + "g" * 129, json={}, headers=h).status_code == 422
    assert c.patch("/Consumer/Users/" + "u" * 129, json={"disabled": True}, headers=h).status_code == 422
    assert c.patch("/Consumer/Users/nobody-here", json={"disabled": True}, headers=h).status_code == 404
    # out-of-range integers and bad filters on the audit log
    for params in ({"limit": 0}, {"limit": 1001}, {"limit": 2**63}, {"offset": -1}, {"offset": 2**63},
                   {"offset": "99999999999999999999"}, {"since": "1e999"}, {"until": -1}, {"since": "nan"},
                   {"actor": "x" * 129}, {"action": "a\x00"}, {"format": "xml"}):
        r = c.get("/Consumer/Audit", params=params, headers=h)
        assert r.status_code == 422, (params, r.status_code, r.text)
    # a body too large to be a user is refused before it is parsed; a sign-in too
    big = b'{"username": "hx", "password": "' + b"x" * (300 * 1024) + b'", "role": "Viewer"}'
    r = c.post("/Consumer/Users", content=big, headers={**h, "content-type": "application/json"})
    assert r.status_code == 413, r.text
    r = c.post("/Consumer/Authentication/Token", content=b'{"username": "' + b"a" * 20000 + b'"}',
               headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = c.post("/Consumer/Authentication/Token", json={"username": "hana", "password": PW, "extra": 1})
    assert r.status_code == 422
    assert c.get("/Consumer/Users", headers=h).json() == before  # nothing changed
    assert c.get("/Consumer/Users/hx", headers=h).status_code == 404


def test_the_audit_log_is_read_only_paged_and_exported_as_csv(c: httpx.Client, srv: Server) -> None:
    h = admin(c, srv)
    hostile = "=HYPERLINK(\"http://x\")"
    assert login(c, hostile, "whatever password").status_code == 401  # a name a spreadsheet would run
    doc = c.get("/Consumer/openapi.json").json()
    audit_paths = {p: set(ops) for p, ops in doc["paths"].items() if "audit" in p.lower()}
    assert audit_paths == {"/Consumer/Audit": {"get"}}, audit_paths  # no route writes it
    page = c.get("/Consumer/Audit", params={"limit": 2}, headers=h).json()
    assert page["limit"] == 2 and len(page["items"]) == 2 and page["total"] > 2
    nxt = c.get("/Consumer/Audit", params={"limit": 2, "offset": 2}, headers=h).json()
    assert nxt["items"][0]["id"] < page["items"][-1]["id"]  # newest first, no overlap
    first_id = page["items"][0]["id"]
    for method in ("PUT", "PATCH", "DELETE", "POST"):
        for path in ("/Consumer/Audit", f"/Consumer/Audit/{first_id}"):
            assert c.request(method, path, json={}, headers=h).status_code in (404, 405), (method, path)
    assert c.get("/Consumer/Audit", params={"limit": 1, "offset": page["total"] - first_id}, headers=h).json()["items"]
    logins = audit(c, h, action="login")
    assert logins and all(e["actor"] and e["source"] == "127.0.0.1" for e in logins)
    t0 = logins[-1]["at"]
    assert all(e["at"] >= t0 for e in audit(c, h, action="login", since=t0))
    assert audit(c, h, action="login", until=t0) == []
    # CSV: every row, streamed; the hostile name is inert text
    r = c.get("/Consumer/Audit", params={"format": "csv", "action": "login_failed"}, headers=h)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0][:7] == ["id", "time", "at", "actor", "source", "action", "object"]
    assert len(rows) - 1 == len(audit(c, h, action="login_failed")) == int(r.headers["x-total-count"])
    assert "'" + hostile in [row[3] for row in rows[1:]] and hostile not in [row[3] for row in rows[1:]]
    everything = c.get("/Consumer/Audit", params={"format": "csv"}, headers=h)
    assert len(list(csv.reader(io.StringIO(everything.text)))) - 1 >= page["total"]
    assert c.get("/Consumer/Audit", params={"format": "csv"}).status_code == 401
    # the database refuses a change as well
    engine = make_engine(f"sqlite:///{srv.root / 'master.db'}")
    with pytest.raises(sa.exc.DatabaseError):
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE audit_log SET actor = 'x' WHERE id = :i"), {"i": first_id})
    engine.dispose()


def test_the_cli_client_logs_in_again_when_its_session_ends(c: httpx.Client, srv: Server) -> None:
    """Tokens are short-lived and revocable: a client whose fresh (uncached) token is ended on the
    server logs in once more and repeats the call; a cached one too."""
    from quanta.client import ConsumerClient

    with ConsumerClient.for_data_dir(srv.root, cache_token=False) as api:
        first = api.token
        assert c.post("/Consumer/Authentication/Logout", headers={"Authorization": f"Bearer {first}"}).status_code == 204
        assert api.devices() == []
        assert api.token != first and _ok(c, api.token)
    with ConsumerClient.for_data_dir(srv.root) as api:
        cached = api.token
        c.post("/Consumer/Authentication/Logout", headers={"Authorization": f"Bearer {cached}"})
    with ConsumerClient.for_data_dir(srv.root) as api:
        assert api.token_from_cache and api.token == cached
        assert api.devices() == [] and api.token != cached


def _ok(c: httpx.Client, token: str | None) -> bool:
    return c.get("/Consumer/Devices", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_changes_made_through_the_api_carry_their_source_address(c: httpx.Client, srv: Server) -> None:
    """Issue, cancel and content upload (the rows written outside the accounts service) name the
    address the change came from, like logins and user changes do."""
    h = admin(c, srv)
    # an action waits for approval, so its requester can cancel it
    r = c.post("/Consumer/Instructions", json={"payload": 'Tagging.Set(Name: "audit", Value: "source");',
                                               "instruction_ttl": 60}, headers=h)
    assert r.status_code == 201, r.text
    iid = r.json()["id"]
    cancelled = c.post(f"/Consumer/Instructions/{iid}/Cancel", headers=h)
    assert cancelled.status_code == 200, cancelled.text
    up = c.post("/Consumer/Content", content=b"resource bytes", headers={**h, "Content-Type": "application/octet-stream"})
    assert up.status_code == 201, up.text
    rows = {e["action"]: e for e in audit(c, h) if e["action"] in ("issue", "cancel", "content_upload")}
    assert set(rows) == {"issue", "cancel", "content_upload"}, rows
    assert all(e["source"] == "127.0.0.1" for e in rows.values()), rows
    assert rows["issue"]["object"] == f"instruction:{iid}"
