"""Integrate connectors set server-assigned device attributes: real connector runs (a CSV file and a real
OpenLDAP, slapd), management-group rules on those attributes, what a device cannot do by tagging itself,
what an administrator set is never touched, hostile values refused per device (the run goes on), one
audit row per run that changed something, idempotent runs."""

import time

import pytest
import sqlalchemy as sa

from quanta import rbac
from quanta.accounts import audit
from quanta.db import make_engine, migrate, store
from quanta.db.tables import device_attributes, users
from quanta.integrate.config import ConfigError, load_config
from quanta.integrate.service import IntegrateAgent
from quanta.protocol import DeviceInfo

from test_integrate import slapd  # noqa: F401 - the real OpenLDAP fixture

TOML = """
[[connector]]
name = "cmdb"
type = "file"
path = "{path}"
[connector.fields]
device_id = "hostname"
tags = ["site"]
attributes = {{ department = "dept", owner = "owner_name" }}
"""


def _setup(tmp_path, db_url, toml):
    migrate(db_url, "master")
    engine = make_engine(db_url)
    (tmp_path / "integrate.toml").write_text(toml)
    with engine.begin() as c:  # a Viewer in one management group: what the rule gives them is theirs to reach
        c.execute(users.insert().values(username="fin", password_hash="x", role="Viewer", created_at=time.time()))
    rbac.set_group(engine, "finance", {"attributes": {"department": "finance"}})
    rbac.add_member(engine, "fin", "finance")
    return IntegrateAgent(tmp_path, engine), engine


def _attrs(engine) -> dict[str, dict[str, tuple[str, str]]]:
    out: dict[str, dict[str, tuple[str, str]]] = {}
    with engine.connect() as c:
        for d, n, v, by in c.execute(sa.select(device_attributes.c.device_id, device_attributes.c.name,
                                               device_attributes.c.value, device_attributes.c.set_by)):
            out.setdefault(d, {})[n] = (v, by)
    return out


def _sync_audit(engine):
    return audit.query(engine, action="integrate_sync").items


def test_csv_connector_sets_attributes_and_groups_follow(tmp_path, db_url):
    src = tmp_path / "inv.csv"
    src.write_text("hostname,site,dept,owner_name\n"
                   "web-01,paris,finance,alice\n"
                   "db-01,lyon,finance,\n"
                   "app-01,nice,ops,carol\n")
    agent, engine = _setup(tmp_path, db_url, TOML.format(path=src))
    # db-01 is a real, enrolled agent that tags itself; app-01 too, and it claims to be in finance
    store.register_devices(engine, [("db-01", "s-db-01"), ("app-01", "s-app-01"), ("rogue", "s-rogue")])
    store.devices_online(engine, "sw", [DeviceInfo("db-01", "db-01.lan", "Linux", "0.1", {"department": "hr"}, ""),
                                        DeviceInfo("app-01", "app.lan", "Linux", "0.1", {"department": "finance"}, ""),
                                        DeviceInfo("rogue", "r.lan", "Linux", "0.1", {"department": "finance"}, "")])
    r = agent.run_sync("cmdb", "demand")
    assert r.ok and (r.created, r.updated, r.attributes_set, r.attributes_removed, r.problems) == (
        1, 2, 5, 0, []), r
    assert _attrs(engine) == {"web-01": {"department": ("finance", "integrate:cmdb"), "owner": ("alice", "integrate:cmdb")},
                              "db-01": {"department": ("finance", "integrate:cmdb")},  # an empty field gives none
                              "app-01": {"department": ("ops", "integrate:cmdb"), "owner": ("carol", "integrate:cmdb")}}
    # the group rule on the attribute includes what the source says, not what devices say of themselves
    assert rbac.reachable_devices(engine, "fin") == {"web-01", "db-01"}
    assert store.list_devices(engine, ["db-01"])[0]["tags"] == {"department": "hr", "site": "lyon"}  # its tag stays its own
    audited = _sync_audit(engine)
    assert len(audited) == 1 and audited[0].actor == "integrate:cmdb" and audited[0].object == "cmdb"
    assert audited[0].details["attributes_set"] == 5 and audited[0].details["attribute_changes_total"] == 3
    assert {"device": "web-01", "set": {"department": "finance", "owner": "alice"}, "removed": []} in \
        audited[0].details["attribute_changes"]

    # idempotent: the same source changes nothing, and writes no audit row
    before = _attrs(engine)
    r = agent.run_sync("cmdb", "demand")
    assert r.ok and (r.unchanged, r.attributes_set, r.attributes_removed) == (3, 0, 0), r
    assert _attrs(engine) == before and len(_sync_audit(engine)) == 1

    # a device tagging itself again (a new hello) cannot override the server's attribute
    store.devices_online(engine, "sw", [DeviceInfo("app-01", "app.lan", "Linux", "0.1",
                                                   {"department": "finance", "attributes": "department=finance"}, "")])
    assert "app-01" not in rbac.reachable_devices(engine, "fin")
    assert "rogue" not in rbac.reachable_devices(engine, "fin")

    # an administrator's attribute is never touched by the connector; the clash is reported, not overridden
    rbac.set_attributes(engine, "web-01", {"owner": "bob", "cost_centre": "42"}, "admin")
    src.write_text("hostname,site,dept,owner_name\nweb-01,paris,finance,mallory\ndb-01,lyon,sales,\n")
    r = agent.run_sync("cmdb", "demand")
    assert r.ok and r.removed == 1, r
    assert r.problems == ["web-01: attribute(s) 'owner' already set by admin; not overridden"]
    a = _attrs(engine)
    assert a["web-01"] == {"department": ("finance", "integrate:cmdb"), "owner": ("bob", "admin"),
                           "cost_centre": ("42", "admin")}
    assert a["db-01"] == {"department": ("sales", "integrate:cmdb")}
    assert "app-01" not in a  # no longer listed: its connector attributes go (it has an agent: it stays)
    assert "app-01" in {d["device_id"] for d in store.list_devices(engine)}
    assert rbac.reachable_devices(engine, "fin") == {"web-01"}  # membership follows at once
    last = _sync_audit(engine)[0]  # newest first
    assert len(_sync_audit(engine)) == 2 and last.details["removed"] == 1 and last.details["refused"] == 1
    # the same source again: the clash is reported again, nothing changes, no audit row
    r = agent.run_sync("cmdb", "demand")
    assert r.ok and (r.attributes_set, r.attributes_removed, r.unchanged) == (0, 0, 2), r
    assert r.problems == ["web-01: attribute(s) 'owner' already set by admin; not overridden"]
    assert len(_sync_audit(engine)) == 2

    # removing the mapping removes the connector's attributes (only its own)
    (tmp_path / "integrate.toml").write_text(TOML.format(path=src).replace(
        'attributes = { department = "dept", owner = "owner_name" }', ""))
    r = agent.run_sync("cmdb", "demand")
    assert r.ok and r.attributes_removed == 2, r
    assert _attrs(engine) == {"web-01": {"owner": ("bob", "admin"), "cost_centre": ("42", "admin")}}


def test_hostile_attribute_values_are_refused_per_device(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'm.db'}"
    src = tmp_path / "inv.json"
    import json

    good = {"hostname": "ok-1", "dept": "finance", "owner_name": "alice"}
    src.write_text(json.dumps([good, {"hostname": "ok-2", "dept": "finance"}]))
    toml = TOML.format(path=src)
    agent, engine = _setup(tmp_path, db_url, toml)
    assert agent.run_sync("cmdb", "demand").attributes_set == 3
    # a full device: an administrator already gave it 63 attributes
    rbac.set_attributes(engine, "ok-2", {f"a{i}": "x" for i in range(rbac.MAX_ATTRIBUTES - 1)}, "admin")
    src.write_text(json.dumps([
        good,
        {"hostname": "ok-2", "dept": "finance", "owner_name": "zed"},  # 63 + 2 > 64
        {"hostname": "big", "dept": "x" * 256},
        {"hostname": "ctl", "dept": "fin\nance"},
        {"hostname": "bidi", "dept": "fin\u202eance"},
        {"hostname": "nul", "owner_name": "a\x00b"},
        {"hostname": "list", "dept": ["finance", "ops"]},
        {"hostname": "map", "dept": {"a": "b"}},
        {"hostname": "fine", "dept": "finance"},
    ]))
    r = agent.run_sync("cmdb", "demand")
    assert r.ok and r.created == 7, r  # the devices are imported; only their attributes are refused
    problems = dict(p.split(": ", 1) for p in r.problems)
    assert problems["record 3 (big)"].startswith("attribute 'department' (field 'dept'): 256 characters, at most 255")
    assert "control characters are not allowed" in problems["record 4 (ctl)"]
    assert "control characters are not allowed" in problems["record 5 (bidi)"]
    assert "control characters are not allowed" in problems["record 6 (nul)"]
    assert "not a single value" in problems["record 7 (list)"] and "not a single value" in problems["record 8 (map)"]
    assert problems["ok-2"] == "65 attributes in all, at most 64; attributes left unchanged"
    a = _attrs(engine)
    assert a["ok-2"]["department"] == ("finance", "integrate:cmdb") and "owner" not in a["ok-2"]  # left as it was
    assert set(a) == {"ok-1", "ok-2", "fine"}
    assert rbac.reachable_devices(engine, "fin") == {"ok-1", "ok-2", "fine"}
    assert _sync_audit(engine)[0].details["refused"] == 7


@pytest.mark.parametrize("fields,reason", [
    ('tags = ["site"]\nattributes = { site = "ou" }', "'site' both a tag and an attribute"),
    ('attributes = { "bad name" = "ou" }', "attribute name 'bad name': 1-64 letters"),
    ('attributes = { "' + "n" * 65 + '" = "ou" }', "1-64 letters, digits"),
    ('attributes = { dept = "" }', "the source field name is 1-255 characters"),
    ("attributes = { " + ", ".join(f'a{i} = "f{i}"' for i in range(65)) + " }", "65 attributes; a device has at most 64"),
    ('attributes = { dept = 3 }', "Input should be a valid string"),
])
def test_bad_attribute_mappings_are_refused_at_load(tmp_path, fields, reason):
    (tmp_path / "integrate.toml").write_text(
        f'[[connector]]\nname = "c"\ntype = "file"\npath = "x.csv"\n[connector.fields]\n{fields}\n')
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert "connector 'c'" in str(e.value) and reason in str(e.value), str(e.value)


LDAP_TOML = """
[[connector]]
name = "directory"
type = "ldap"
url = "ldap://127.0.0.1:{port}"
bind_dn = "cn=admin,dc=example,dc=com"
bind_password_file = "{pwfile}"
base_dn = "ou=computers,dc=example,dc=com"
filter = "(objectClass=device)"
timeout = 3
[connector.fields]
attributes = {{ location = "l", os_family = "operatingSystem" }}
"""


def test_ldap_connector_sets_attributes(tmp_path, slapd):  # noqa: F811
    port, _ = slapd
    pw = tmp_path / "ldap.pw"
    pw.write_text("admin-secret-42\n")
    db_url = f"sqlite:///{tmp_path / 'm.db'}"
    agent, engine = _setup(tmp_path, db_url, LDAP_TOML.format(port=port, pwfile=pw))
    rbac.set_group(engine, "berlin", {"attributes": {"location": "Berlin", "os_family": "Ubuntu"}})
    rbac.add_member(engine, "fin", "berlin")
    r = agent.run_sync("directory", "demand")
    assert r.ok and r.created == 3 and r.attributes_set == 6 and r.problems == [], r
    assert _attrs(engine)["ws-001"] == {"location": ("Berlin", "integrate:directory"),
                                        "os_family": ("Windows 11 Enterprise", "integrate:directory")}
    assert rbac.reachable_devices(engine, "fin") == {"lnx-01"}
    assert agent.run_sync("directory", "demand").attributes_set == 0
    assert len(_sync_audit(engine)) == 1
