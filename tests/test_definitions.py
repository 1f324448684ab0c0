"""Instruction definitions, signed product packs, roles per instruction set, management groups."""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import Server, quanta
from quanta import rbac
from quanta.db import make_engine, migrate
from quanta.db.tables import definitions, devices, users
from quanta.definitions import (DefinitionError, PackError, bind_parameters, build, check_payload, import_pack,
                                keygen, load_definition, parse_definition, read_pack, trust)

PROCS = '''
name = "Quanta-ProcessCount"
type = "question"
instruction_set = "Processes"
description = "How many processes match %Pattern%?"
payload = """
@p = OperatingSystem.GetProcesses();
SELECT COUNT(*) AS Matching FROM @p WHERE Executable LIKE %Pattern%;
"""
[[parameters]]
name = "Pattern"
type = "string"
default = "%"
max_length = 100

[[parameters]]
name = "Limit"
type = "integer"
default = 10
min = 1
max = 100

[[schema]]
name = "Matching"
type = "integer"

[aggregation]
group_by = ["Matching"]

[ttl]
instruction_default = 20
instruction_min = 5
instruction_max = 120
'''

KILL = '''
name = "Quanta-KillProcess"
type = "action"
instruction_set = "Processes"
description = "Kill process %Pid%"
payload = '@k = OperatingSystem.KillProcess(ProcessId: %Pid%);'
[[parameters]]
name = "Pid"
type = "string"
required = true
pattern = "[0-9]+"
'''


def make_pack(tmp: Path, defs: dict[str, str], publisher: str = "Acme", key: Path | None = None) -> tuple[Path, Path]:
    src = tmp / f"src-{len(list(tmp.iterdir()))}"
    (src / "definitions").mkdir(parents=True)
    (src / "resources").mkdir()
    (src / "pack.toml").write_text(f'name = "acme-pack"\nversion = "1.0"\npublisher = "{publisher}"\n')
    for name, text in defs.items():
        (src / "definitions" / f"{name}.toml").write_text(text)
    (src / "resources" / "hello.sh").write_text("#!/bin/bash\necho hello\n")
    if key is None:
        key, _ = keygen(tmp / "keys", publisher)
    return build(src, key, tmp / f"{src.name}.zip"), key


def import_signed_pack(root: Path, tmp: Path, defs: dict[str, str]) -> dict:
    """Build a pack signed by a new publisher "Acme", trust it on the server at ``root`` and
    import it through the Consumer API; returns the API's answer."""
    from quanta.client import ConsumerClient

    keys = tmp / "pk"
    keys.mkdir()
    pack, _ = make_pack(keys, defs)
    quanta("pack", "trust", str(root), "--name", "Acme", "--key", str(keys / "keys" / "Acme.pub"))
    with ConsumerClient.for_data_dir(root) as admin:
        r = admin.http.post("/Consumer/Packs", content=pack.read_bytes())
        assert r.status_code == 201, r.text
        assert admin.http.post("/Consumer/Packs", content=b"junk").status_code == 422
        return r.json()


# ----------------------------------------------------------------------------- definitions
def test_definition_parsing_and_typed_parameters() -> None:
    d = parse_definition(PROCS)
    check_payload(d)
    assert d.checksum() == parse_definition(PROCS).checksum()
    assert bind_parameters(d, {}) == {"Pattern": "%", "Limit": 10}
    assert bind_parameters(d, {"Pattern": "%ssh%", "Limit": 5}) == {"Pattern": "%ssh%", "Limit": 5}
    for bad, msg in [({"Limit": "5"}, "expects an integer"), ({"Limit": 500}, "<= 100"), ({"Pattern": 3}, "string"),
                     ({"Pattern": "x" * 101}, "longer than"), ({"Nope": 1}, "unknown parameter")]:
        with pytest.raises(DefinitionError, match=msg):
            bind_parameters(d, bad)
    k = parse_definition(KILL)
    with pytest.raises(DefinitionError, match="required"):
        bind_parameters(k, {})
    with pytest.raises(DefinitionError, match="does not match"):
        bind_parameters(k, {"Pid": "1; rm -rf /"})


@pytest.mark.parametrize("text,msg", [
    ("name = ", "not valid TOML"),
    (PROCS + "\nbogus = 1\n", "Extra inputs"),
    (PROCS.replace('type = "question"', 'type = "maybe"', 1), "type"),
    (PROCS.replace("instruction_default = 20", "instruction_default = 500"), "instruction_max"),
])
def test_bad_definition_files_are_refused(text: str, msg: str) -> None:
    with pytest.raises(DefinitionError, match=msg):
        parse_definition(text, "x.toml")


def test_a_question_may_not_hide_an_action() -> None:
    d = parse_definition(KILL.replace('type = "action"', 'type = "question"'))
    with pytest.raises(DefinitionError, match="calls action methods"):
        check_payload(d)


# ----------------------------------------------------------------------------- packs
def _engine(tmp: Path) -> sa.Engine:
    url = f"sqlite:///{tmp / 'm.db'}"
    migrate(url, "master")
    return make_engine(url)


def test_pack_signature_and_manifest_are_enforced(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    pack, key = make_pack(tmp_path, {"procs": PROCS})
    with pytest.raises(PackError, match="not trusted"):
        import_pack(engine, pack.read_bytes())
    trust(engine, "Acme", (tmp_path / "keys" / "Acme.pub").read_bytes())
    imported = import_pack(engine, pack.read_bytes())
    assert [d.name for d in imported.definitions] == ["Quanta-ProcessCount"] and len(imported.resources) == 1
    assert load_definition(engine, "Quanta-ProcessCount").instruction_set == "Processes"
    trusted = {"Acme": (tmp_path / "keys" / "Acme.pub").read_bytes()}

    def rewrite(change) -> bytes:  # type: ignore[no-untyped-def]
        src = zipfile.ZipFile(pack)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for info in src.infolist():
                data = change(info.filename, src.read(info.filename))
                if data is not None:
                    z.writestr(info.filename, data)
        return buf.getvalue()

    tampered = rewrite(lambda n, d: d.replace(b"COUNT(*)", b"MAX(1) ") if n.endswith("procs.toml") else d)
    with pytest.raises(PackError, match="does not match its manifest hash"):
        read_pack(tampered, trusted)
    with pytest.raises(PackError, match="unsigned pack"):
        read_pack(rewrite(lambda n, d: None if n == "MANIFEST.sig" else d), trusted)
    forged = rewrite(lambda n, d: d.replace(b'"resources/hello.sh"', b'"resources/other.sh"') if n == "MANIFEST.json" else d)
    with pytest.raises(PackError, match="signature does not verify"):
        read_pack(forged, trusted)
    with pytest.raises(PackError, match="not a zip"):
        read_pack(b"PK\x03\x04 nonsense", trusted)
    # signed by another key claiming to be Acme
    other_key, _ = keygen(tmp_path / "evil", "Acme")
    evil, _ = make_pack(tmp_path, {"procs": PROCS}, key=other_key)
    with pytest.raises(PackError, match="signature does not verify"):
        read_pack(evil.read_bytes(), trusted)


def test_import_is_all_or_nothing_and_checksums_catch_tampering(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    pack, key = make_pack(tmp_path, {"procs": PROCS, "bad": KILL.replace("OperatingSystem.KillProcess", "Nope.Nope")})
    trust(engine, "Acme", (tmp_path / "keys" / "Acme.pub").read_bytes())
    with pytest.raises(PackError, match="Unsupported module"):
        import_pack(engine, pack.read_bytes())
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(definitions)).scalar() == 0
    good, _ = make_pack(tmp_path, {"procs": PROCS}, key=key)
    import_pack(engine, good.read_bytes())
    # another publisher may not replace Acme's definition
    trust(engine, "Other", keygen(tmp_path / "k2", "Other")[1].read_bytes())
    other, _ = make_pack(tmp_path, {"procs": PROCS}, publisher="Other", key=tmp_path / "k2" / "Other.key")
    with pytest.raises(PackError, match="belongs to publisher 'Acme'"):
        import_pack(engine, other.read_bytes())
    # editing the stored definition behind the server's back is caught at issue time
    with engine.begin() as c:
        spec = c.execute(sa.select(definitions.c.spec)).scalar()
        spec["payload"] = '@k = OperatingSystem.KillProcess(ProcessId: "1");'
        c.execute(definitions.update().values(spec=spec))
    with pytest.raises(DefinitionError, match="does not match its stored checksum"):
        load_definition(engine, "Quanta-ProcessCount")


# ----------------------------------------------------------------------------- RBAC
def test_roles_per_instruction_set_and_management_groups(db_url: str) -> None:
    migrate(db_url, "master")
    engine = make_engine(db_url)
    with engine.begin() as c:
        for name, role in (("q", "Questioner"), ("v", "Viewer"), ("root", "Full Administrator")):
            c.execute(users.insert().values(username=name, password_hash="x", role=role, created_at=time.time()))
        c.execute(devices.insert(), [dict(device_id="lin1", os="Linux 6.1", tags={"site": "paris"}),
                                     dict(device_id="lin2", os="Linux 6.1", tags={"site": "oslo"}),
                                     dict(device_id="win1", os="Windows 11", tags={"site": "paris"})])
    assert rbac.allowed(engine, "q", "ask", "Processes") and not rbac.allowed(engine, "q", "act", "Processes")
    assert not rbac.allowed(engine, "v", "approve", "Processes")
    rbac.assign(engine, "v", "Approver", "Processes")
    assert rbac.allowed(engine, "v", "approve", "Processes") and not rbac.allowed(engine, "v", "approve", "Network")
    with pytest.raises(ValueError, match="unknown role"):
        rbac.assign(engine, "v", "Overlord", "*")
    assert rbac.scope_for(engine, "q", None) is None  # no groups: every device
    rbac.set_group(engine, "paris-linux", {"os_like": "linux*", "tags": {"site": "paris"}})
    rbac.set_group(engine, "windows", {"os_like": "windows*"})
    rbac.add_member(engine, "q", "paris-linux")
    assert rbac.scope_for(engine, "q", None) == ["lin1"]
    assert rbac.scope_for(engine, "q", ["lin1", "lin2", "win1"]) == ["lin1"]
    rbac.add_member(engine, "q", "windows")
    assert rbac.scope_for(engine, "q", None) == ["lin1", "win1"]
    rbac.add_member(engine, "root", "windows")
    assert rbac.scope_for(engine, "root", None) is None  # a Full Administrator reaches everything
    with pytest.raises(ValueError, match="no management group"):
        rbac.add_member(engine, "q", "nope")


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_questioner_issues_definitions_within_their_rights_and_groups(server: Server, tmp_path: Path) -> None:
    from quanta.client import ApiError, ConsumerClient

    imported = import_signed_pack(server.root, tmp_path, {"procs": PROCS, "kill": KILL})
    assert sorted(imported["definitions"]) == ["Quanta-KillProcess", "Quanta-ProcessCount"]
    pw = tmp_path / "pw"
    pw.write_text("a long enough password")
    quanta("user", "add", str(server.root), "--username", "quinn", "--role", "Questioner", "--password-file", str(pw))
    for n in ("d1", "d2"):
        server.enroll(n)
        server.start_agent(n)
    server.wait_online({"d1", "d2"})
    quanta("group", "set", str(server.root), "--name", "just-d2", "--device", "d2")
    quanta("group", "add-member", str(server.root), "--name", "just-d2", "--username", "quinn")
    with ConsumerClient.for_data_dir(server.root, "quinn", "a long enough password") as quinn:
        defs = {d["name"]: d for d in quinn.http.get("/Consumer/InstructionDefinitions").json()}
        assert defs["Quanta-ProcessCount"]["parameters"][0]["name"] == "Pattern"
        with pytest.raises(ApiError, match="raw SCALE is allowed for Full Administrators only"):
            quinn.issue("@s = Device.GetSummary();")
        with pytest.raises(ApiError, match="may not issue actions"):
            quinn.issue(None, definition="Quanta-KillProcess", parameters={"Pid": "1"})
        with pytest.raises(ApiError, match="expects an integer"):
            quinn.issue(None, definition="Quanta-ProcessCount", parameters={"Limit": "ten"})
        with pytest.raises(ApiError, match="instruction_ttl must be within 5-120"):
            quinn.issue(None, definition="Quanta-ProcessCount", instruction_ttl=3)
        issued = quinn.issue(None, definition="Quanta-ProcessCount", parameters={"Pattern": "%python%"},
                             instruction_ttl=20)
        assert issued["targeted"] == 1  # management group: only d2
        final = quinn.wait(issued["id"], 30)
        assert final["states"] == {"success": 1} and final["name"] == "Quanta-ProcessCount"
        rows = quinn.all_results(issued["id"])
        assert [r["device"] for r in rows] == ["d2"] and rows[0]["rows"][0][0] >= 1  # the agent itself is python
        assert [d["device_id"] for d in quinn.devices()] == ["d2"]
    out = json.loads(quanta("ask", str(server.root), "--definition", "Quanta-ProcessCount", "--json", "--wait", "20").stdout)
    assert out["states"] == {"success": 2}  # the administrator reaches both
    # server-side aggregation: the definition's group_by by default, or any column
    with ConsumerClient.for_data_dir(server.root) as admin:
        agg = admin.http.get(f"/Consumer/Instructions/{out['instruction_id']}/Aggregate").json()
        assert agg["by"] == ["Matching"] and agg["devices"] == 2
        assert sum(g["devices"] for g in agg["groups"]) == 2 and all(g["values"][0] >= 1 for g in agg["groups"])
        assert admin.http.get(f"/Consumer/Instructions/{issued['id']}/Aggregate",
                              params={"by": "Nope"}).json()["missing"] == 1


def test_a_parameter_pattern_cannot_make_the_server_backtrack() -> None:
    """Definition parameter patterns run on RE2 in the Consumer API too: a value a user submits
    against a backtracking-prone pattern is judged in linear time, and a pattern RE2 cannot run
    (a backreference) is refused when the definition is loaded."""
    from quanta.definitions.model import ParamDef, validate_value

    p = ParamDef(name="Name", type="string", pattern="(a+)+$")
    t = time.monotonic()
    with pytest.raises(DefinitionError, match="does not match"):
        validate_value(p, "a" * 5000 + "b")  # Python's re would not finish
    assert time.monotonic() - t < 5
    assert validate_value(p, "aaaa") == "aaaa"
    with pytest.raises(ValueError, match="no backreferences or lookaround"):
        ParamDef(name="Name", type="string", pattern=r"(a)\1")
