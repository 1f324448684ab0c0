"""GET /Consumer/Methods and POST /Consumer/Scale/Check (issue 12: the portal's SCALE editor),
in process against real SQLite stores (test_scoped_reads' world): any signed-in user may read the
method registry, which is what ``quanta methods --json`` prints, and check a payload with the
real compiler; nobody else, and hostile bodies get a clear 4xx, never a 500."""

from __future__ import annotations

import json

import pytest

from quanta.consumer_api.app import check_access_rules
from quanta.consumer_api.routers.methods import MAX_BODY, MAX_PAYLOAD
from quanta.scale import ScaleError
from quanta.scale.cli import check_source, methods_command
from test_scoped_reads import ROLE_USERS, World, world  # noqa: F401  (world: the fixture)

CHECK = "/Consumer/Scale/Check"


def test_both_routes_are_for_signed_in_users_only(world: World) -> None:
    rules = check_access_rules(world.client.app)  # type: ignore[arg-type]
    assert rules["GET /Consumer/Methods"] == "authenticated"
    assert rules[f"POST {CHECK}"] == "authenticated"
    c = world.client
    assert c.get("/Consumer/Methods").status_code == 401
    assert c.get("/Consumer/Methods", headers={"Authorization": "Bearer not-a-session"}).status_code == 401
    assert c.post(CHECK, json={"payload": "@a = 1;"}).status_code == 401
    # authentication comes before the body is looked at: a stranger learns nothing of its shape
    assert c.post(CHECK, json={"payload": 5, "extra": True}).status_code == 401


def test_the_registry_is_what_quanta_methods_prints(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    methods_command(json_output=True)
    printed = json.loads(capsys.readouterr().out)
    for user in ["admin", *ROLE_USERS.values(), "setlimited"]:  # every role, a right on one set only too
        r = world.client.get("/Consumer/Methods", headers=world.h(user))
        assert r.status_code == 200, (user, r.text)
        assert r.json() == printed, user
    by_name = {f"{m['module']}.{m['name']}": m for m in printed}
    gp = by_name["OperatingSystem.GetProcesses"]
    assert gp["is_action"] is False and gp["params"] == []
    assert {"name": "ProcessId", "type": "integer", "description": ""} in gp["columns"]
    kp = by_name["OperatingSystem.KillProcess"]
    assert kp["is_action"] is True and kp["params"][0]["required"] is True
    assert kp["params"][0]["description"] == "the process id, as a string"


ERRORS = [
    "@p = OperatingSystem.GetProcesses();\nSELECT Name FROM @q;",
    "@p = OperatingSystem.GetProcesses(;",
    '@a = "\U0001F600\U0001F600"; @b = (;',  # columns in characters, not UTF-16 units
    "SELECT ExecutableName, Nope FROM $Process_Live;",
    "@a = 1;\n" + "IF (@a) " * 3000 + "NOCONTENT;" + " ENDIF;" * 3000,  # nested too deeply, not a RecursionError
    "@a = Foo.Bar();",
    '<img src=x onerror="window.__pwned=1">',
    "\x00\x01",
    '@s = "unterminated',
    "/* unterminated comment",
]


def test_an_error_is_the_compilers_with_its_position(world: World) -> None:
    h = world.h(ROLE_USERS["Viewer"])
    for payload in ERRORS:
        with pytest.raises(ScaleError) as raised:
            check_source(payload)
        e = raised.value
        r = world.client.post(CHECK, json={"payload": payload}, headers=h)
        assert r.status_code == 200, (payload[:60], r.text)
        assert r.json() == {"ok": False, "kind": None, "actions": [],
                            "error": {"message": e.message, "line": e.line, "column": e.column}}, payload[:60]


def test_a_good_payload_says_its_kind_and_nothing_is_stored(world: World) -> None:
    h = world.h(ROLE_USERS["Viewer"])
    listed = world.client.get("/Consumer/Instructions?limit=500", headers=world.h("admin")).json()
    r = world.client.post(CHECK, json={"payload": "@p = OperatingSystem.GetProcesses();\nSELECT Name FROM @p "
                                                  "WHERE Name LIKE %Pattern%;"}, headers=h)
    assert r.json() == {"ok": True, "kind": "question", "actions": [], "error": None}
    r = world.client.post(CHECK, json={"payload": 'Tagging.Set(Name: "a", Value: "b");\n'
                                                  'OperatingSystem.KillProcess(ProcessId: "1");\nTagging.Set(Name: "c", Value: "d");'},
                          headers=h)
    assert r.json() == {"ok": True, "kind": "action", "actions": ["OperatingSystem.KillProcess", "Tagging.Set"],
                        "error": None}
    assert world.client.post(CHECK, json={"payload": ""}, headers=h).json()["ok"] is True  # nothing to run is no error
    # checking is only compiling: no instruction was stored
    assert world.client.get("/Consumer/Instructions?limit=500", headers=world.h("admin")).json() == listed


def test_hostile_bodies_are_refused_clearly(world: World) -> None:
    c = world.client
    h = world.h(ROLE_USERS["Viewer"])
    assert c.post(CHECK, json={"payload": "x" * (MAX_PAYLOAD + 1)}, headers=h).status_code == 422
    assert c.post(CHECK, json={"payload": "@a = 1;" + " " * (MAX_PAYLOAD - 7)}, headers=h).json()["ok"] is True
    # a body past the bound is refused before it is parsed, declared or not
    big = b'{"payload": "' + b"x" * MAX_BODY + b'"}'
    assert c.post(CHECK, content=big, headers={**h, "content-type": "application/json"}).status_code == 413
    chunks = (b"x" * 65536 for _ in range(MAX_BODY // 65536 + 2))
    assert c.post(CHECK, content=chunks, headers={**h, "content-type": "application/json"}).status_code == 413
    for body in ({"payload": 5}, {"payload": None}, {}, {"payload": "@a = 1;", "parameters": {}}, ["@a = 1;"]):
        assert c.post(CHECK, json=body, headers=h).status_code == 422, body
    assert c.post(CHECK, content=b"{not json", headers={**h, "content-type": "application/json"}).status_code == 422
    # the server goes on answering
    assert c.post(CHECK, json={"payload": "@a = 1;"}, headers=h).json()["ok"] is True
