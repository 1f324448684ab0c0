"""Integrate Agent connectors against real sources: files, SQLite/PostgreSQL/MariaDB, and a real OpenLDAP
(slapd from Debian, started per test); the sync rules (idempotent, agent data wins, nothing changes on error)."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from quanta.db import make_engine, migrate, store
from quanta.db.tables import devices, integrate_runs
from quanta.integrate.config import ConfigError, IntegrateConfig, load_config
from quanta.integrate.service import IntegrateAgent
from quanta.protocol import DeviceInfo

from conftest import free_port, wait_until


def _agent(tmp_path: Path, db_url: str, toml: str) -> tuple[IntegrateAgent, sa.Engine]:
    migrate(db_url, "master")
    engine = make_engine(db_url)
    (tmp_path / "integrate.toml").write_text(toml)
    return IntegrateAgent(tmp_path, engine), engine


def _devices(engine) -> dict[str, dict]:
    return {d["device_id"]: d for d in store.list_devices(engine)}


def _runs(engine) -> list[dict]:
    with engine.connect() as c:
        return [dict(r) for r in c.execute(sa.select(integrate_runs).order_by(integrate_runs.c.id)).mappings()]


CSV = "hostname,dns,os_name,site\nweb-01,web-01.example.com,Debian 12,paris\ndb-01,db-01.example.com,RHEL 9,lyon\n"
FILE_TOML = """
[[connector]]
name = "cmdb"
type = "file"
path = "{path}"
[connector.fields]
device_id = "hostname"
fqdn = "dns"
os = "os_name"
tags = ["site"]
"""


def test_file_import_is_idempotent_and_agent_data_wins(tmp_path, db_url):
    src = tmp_path / "inv.csv"
    src.write_text(CSV)
    agent, engine = _agent(tmp_path, db_url, FILE_TOML.format(path=src))
    # db-01 is a real agent, enrolled, that has said hello with its own fqdn/os
    store.register_devices(engine, [("db-01", "serial-db-01")])
    assert store.devices_online(engine, "switch-1", [DeviceInfo("db-01", "db-01.lan", "Rocky Linux 9.3", "0.1", {}, "")]) == []
    r = agent.run_sync("cmdb", "demand")
    assert r.ok and (r.created, r.updated, r.unchanged) == (1, 1, 0), r
    d = _devices(engine)
    assert (d["web-01"]["fqdn"], d["web-01"]["os"], d["web-01"]["source"], d["web-01"]["online"]) == (
        "web-01.example.com", "Debian 12", "cmdb", False)
    assert d["web-01"]["tags"] == {"site": "paris"}
    assert (d["db-01"]["fqdn"], d["db-01"]["os"], d["db-01"]["tags"]) == ("db-01.lan", "Rocky Linux 9.3", {"site": "lyon"})
    r = agent.run_sync("cmdb", "demand")
    assert r.ok and (r.created, r.updated, r.unchanged, r.removed) == (0, 0, 2, 0)
    assert _devices(engine) == d
    # the inventory-only device is not targeted (no agent would ever answer); the agent device is
    assert set(store.target_devices(engine, None)) == {"db-01"}
    # a later hello still sets the agent's own values
    assert store.devices_online(engine, "switch-1", [DeviceInfo("db-01", "db-01.new", "Rocky Linux 9.4", "0.1", {}, ""),
                                                     DeviceInfo("web-01", "web-01.x", "Debian 12", "0.1", {}, "")]) == [
        "web-01"]  # inventory-only, never enrolled: refused, its imported values kept
    assert _devices(engine)["web-01"]["fqdn"] == "web-01.example.com" and not _devices(engine)["web-01"]["online"]
    assert _devices(engine)["db-01"]["os"] == "Rocky Linux 9.4"
    # the source drops web-01: it is removed; db-01 is released back to the agent
    src.write_text("hostname,dns,os_name,site\nweb-02,web-02.example.com,Debian 12,nice\n")
    r = agent.run_sync("cmdb", "schedule")
    assert r.ok and (r.created, r.removed) == (1, 2)
    d = _devices(engine)
    assert "web-01" not in d and d["db-01"]["source"] is None and d["web-02"]["source"] == "cmdb"
    assert [x["ok"] for x in _runs(engine)] == [True, True, True]


def test_json_file_and_connectors_do_not_fight(tmp_path, db_url):
    a = tmp_path / "a.json"
    a.write_text(json.dumps([{"device_id": "x1", "fqdn": "x1.a", "os": "Windows 11"}]))
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"device_id": "x1", "fqdn": "x1.b", "os": "Windows 10"}]))
    agent, engine = _agent(tmp_path, db_url, f'[[connector]]\nname = "a"\ntype = "file"\npath = "{a}"\n'
                                             f'[[connector]]\nname = "b"\ntype = "file"\npath = "{b}"\n')
    assert agent.run_sync("a", "demand").created == 1
    r = agent.run_sync("b", "demand")
    assert r.ok and r.skipped == 1 and _devices(engine)["x1"]["fqdn"] == "x1.a"


@pytest.mark.parametrize("content,reason", [
    ("hostname,dns\n,empty.example.com\n", "record 1: invalid device_id ''"),
    ("hostname,dns\na,1\na,2\n", "record 2: duplicate device_id 'a'"),
    ("name,dns\na,1\n", "record 1: no 'hostname' field"),
    ("hostname,dns\na,b,c\n", "line 2: more values than header columns"),
    ("hostname,dns\nbad/name,x\n", "invalid device_id 'bad/name'"),
    ("", "empty file"),
])
def test_bad_source_data_changes_nothing(tmp_path, content, reason):
    db_url = f"sqlite:///{tmp_path / 'm.db'}"
    src = tmp_path / "inv.csv"
    src.write_text(CSV)
    agent, engine = _agent(tmp_path, db_url, FILE_TOML.format(path=src))
    assert agent.run_sync("cmdb", "demand").ok
    before = _devices(engine)
    src.write_text(content)
    r = agent.run_sync("cmdb", "demand")
    assert not r.ok and reason in r.error and "nothing was changed" in r.error, r.error
    assert _devices(engine) == before
    assert _runs(engine)[-1]["ok"] is False and reason in _runs(engine)[-1]["error"]


def test_source_down_empty_source_and_unknown_connector(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'm.db'}"
    src = tmp_path / "inv.csv"
    src.write_text(CSV)
    agent, engine = _agent(tmp_path, db_url, FILE_TOML.format(path=src))
    assert agent.run_sync("cmdb", "demand").ok
    before = _devices(engine)
    src.unlink()
    r = agent.run_sync("cmdb", "demand")
    assert not r.ok and "cannot read" in r.error and "No such file" in r.error
    src.write_text("hostname,dns,os_name,site\n")
    r = agent.run_sync("cmdb", "demand")
    assert not r.ok and "refusing to remove the 2 devices" in r.error
    assert _devices(engine) == before
    r = agent.run_sync("nope", "demand")
    assert not r.ok and r.error == "unknown connector 'nope' (known: cmdb)"


@pytest.mark.parametrize("toml,reason", [
    ('[[connector]]\nname = "a"\ntype = "file"\npath = "x.csv"\ncolour = 1\n', "connector 'a': colour: unknown key"),
    ('[[connector]]\nname = "a"\ntype = "file"\npath = "x.csv"\ninterval = "hourly"\n',
     "connector 'a': interval: Input should be a valid integer"),
    ('[[connector]]\nname = "a"\ntype = "ftp"\n', "connector 'a'"),
    ('[[connector]]\nname = "a"\ntype = "file"\npath = "x"\n[[connector]]\nname = "a"\ntype = "file"\npath = "y"\n',
     "duplicate connector name(s): a"),
    ('[[connector]]\nname = "s"\ntype = "sql"\nurl = "postgresql://u:hunter2@h/db"\nquery = "select 1"\n',
     "must not hold a password"),
    ('[[connector]]\nname = "l"\ntype = "ldap"\nurl = "http://x"\nbase_dn = "dc=x"\n', "connector 'l': url"),
    ('[[connector]\n', "integrate.toml"),
])
def test_bad_configuration_is_refused(tmp_path, toml, reason):
    (tmp_path / "integrate.toml").write_text(toml)
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path)
    assert reason in str(ei.value)
    assert "hunter2" not in str(ei.value)


# --------------------------------------------------------------------------------------- SQL
def _sql_source(url: str) -> None:
    e = make_engine(url)
    with e.begin() as c:
        c.execute(sa.text("DROP TABLE IF EXISTS assets"))
        c.execute(sa.text("CREATE TABLE assets (name VARCHAR(100), dns VARCHAR(100), os VARCHAR(100), "
                          "retired INTEGER, owner VARCHAR(100))"))
        c.execute(sa.text("INSERT INTO assets VALUES ('srv-1', 'srv-1.corp', 'Windows Server 2022', 0, 'ops'), "
                          "('srv-2', 'srv-2.corp', 'Ubuntu 24.04', 0, NULL), ('old-1', 'old', 'NT4', 1, 'x')"))
    e.dispose()


SQL_TOML = """
[[connector]]
name = "assets"
type = "sql"
url = "{url}"
query = "SELECT name AS device_id, dns AS fqdn, os, owner FROM assets WHERE retired = :retired ORDER BY name"
parameters = {{ retired = 0 }}
{extra}
[connector.fields]
tags = ["owner"]
"""


def _check_sql_import(tmp_path, source_url, extra=""):
    db_url = f"sqlite:///{tmp_path / 'm.db'}"
    agent, engine = _agent(tmp_path, db_url, SQL_TOML.format(url=source_url, extra=extra))
    r = agent.run_sync("assets", "demand")
    assert r.ok and r.created == 2, r
    d = _devices(engine)
    assert set(d) == {"srv-1", "srv-2"} and d["srv-1"]["tags"] == {"owner": "ops"} and d["srv-2"]["tags"] == {}
    assert agent.run_sync("assets", "demand").unchanged == 2
    return agent, engine


def test_sql_connector_sqlite_source(tmp_path):
    url = f"sqlite:///{tmp_path / 'assets.db'}"
    _sql_source(url)
    _check_sql_import(tmp_path, url)


def test_sql_connector_postgresql_source_and_outage(tmp_path, pg_url):
    _sql_source(pg_url)
    agent, engine = _check_sql_import(tmp_path, pg_url)
    before = _devices(engine)
    dead = f"postgresql://root@127.0.0.1:{free_port()}/test"
    (tmp_path / "integrate.toml").write_text(SQL_TOML.format(url=dead, extra="timeout = 3"))
    r = agent.run_sync("assets", "demand")
    assert not r.ok and "connection" in r.error.lower() and "nothing was changed" in r.error
    assert _devices(engine) == before


def test_sql_connector_mariadb_source_and_secret_never_shown(tmp_path, caplog):
    pytest.importorskip("pymysql")
    base = "mysql+pymysql://root@127.0.0.1:3306/test"
    try:
        sa.create_engine(base).connect().close()
    except sa.exc.OperationalError:
        pytest.skip("MariaDB is not running on 127.0.0.1:3306")
    _sql_source(base)
    _check_sql_import(tmp_path, base)
    # a wrong password (from the environment) fails clearly and never appears in the error or the log
    e = sa.create_engine(base)
    with e.begin() as c:
        c.execute(sa.text("CREATE USER IF NOT EXISTS 'quanta_ro'@'%' IDENTIFIED BY 'Right-Pass-123'"))
        c.execute(sa.text("CREATE USER IF NOT EXISTS 'quanta_ro'@'localhost' IDENTIFIED BY 'Right-Pass-123'"))
        c.execute(sa.text("GRANT SELECT ON test.* TO 'quanta_ro'@'%'"))
        c.execute(sa.text("GRANT SELECT ON test.* TO 'quanta_ro'@'localhost'"))
    os.environ["QUANTA_TEST_ASSETS_PW"] = "Wrong-Secret-987"
    try:
        url = "mysql://quanta_ro@127.0.0.1:3306/test"
        (tmp_path / "integrate.toml").write_text(SQL_TOML.format(url=url, extra='password_env = "QUANTA_TEST_ASSETS_PW"'))
        agent = IntegrateAgent(tmp_path, make_engine(f"sqlite:///{tmp_path / 'm.db'}"))
        with caplog.at_level("DEBUG"):
            r = agent.run_sync("assets", "demand")
        assert not r.ok and "Access denied" in r.error
        assert "Wrong-Secret-987" not in r.error and "Wrong-Secret-987" not in caplog.text
        os.environ["QUANTA_TEST_ASSETS_PW"] = "Right-Pass-123"
        assert agent.run_sync("assets", "demand").ok
    finally:
        os.environ.pop("QUANTA_TEST_ASSETS_PW", None)
        with e.begin() as c:
            c.execute(sa.text("DROP USER IF EXISTS 'quanta_ro'@'%'"))
            c.execute(sa.text("DROP USER IF EXISTS 'quanta_ro'@'localhost'"))
            c.execute(sa.text("DROP TABLE IF EXISTS assets"))


# -------------------------------------------------------------------------------------- LDAP
SLAPD_CONF = """
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
# the two Active Directory computer attributes, so the default field map (cn, dNSHostName,
# operatingSystem) is exercised as against a real AD
attributetype ( 1.2.840.113556.1.4.619 NAME 'dNSHostName' EQUALITY caseIgnoreMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.363 NAME 'operatingSystem' EQUALITY caseIgnoreMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
objectclass ( 1.3.6.1.4.1.99999.1.1 NAME 'quantaTestComputer' SUP top AUXILIARY
  MAY ( dNSHostName $ operatingSystem ) )
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {dir}/slapd.pid
database mdb
maxsize 10485760
suffix "dc=example,dc=com"
rootdn "cn=admin,dc=example,dc=com"
rootpw admin-secret-42
directory {dir}/data
"""


@pytest.fixture
def slapd(tmp_path):
    exe = shutil.which("slapd") or "/usr/sbin/slapd"
    if not os.path.exists(exe):
        why = "slapd is not installed (apt-get install -y slapd ldap-utils; .ci/run installs it)"
        if os.environ.get("QUANTA_CI"):
            pytest.fail(why)
        pytest.skip(why)
    d = tmp_path / "slapd"
    (d / "data").mkdir(parents=True)
    (d / "slapd.conf").write_text(SLAPD_CONF.format(dir=d))
    port = free_port()
    p = subprocess.Popen([exe, "-f", str(d / "slapd.conf"), "-h", f"ldap://127.0.0.1:{port}/", "-d", "0"],
                         stdout=subprocess.DEVNULL, stderr=open(d / "slapd.log", "wb"), start_new_session=True)
    import ldap3

    def up():
        try:
            ldap3.Connection(ldap3.Server(f"ldap://127.0.0.1:{port}"), auto_bind=True).unbind()
            return True
        except Exception:  # noqa: BLE001
            return False
    try:
        wait_until(up, 20, "slapd")
        c = ldap3.Connection(ldap3.Server(f"ldap://127.0.0.1:{port}"), "cn=admin,dc=example,dc=com",
                             "admin-secret-42", auto_bind=True, raise_exceptions=True)
        c.add("dc=example,dc=com", ["dcObject", "organization"], {"o": "Example", "dc": "example"})
        c.add("ou=computers,dc=example,dc=com", ["organizationalUnit"], {"ou": "computers"})
        for cn, dns, os_ in [("ws-001", "ws-001.example.com", "Windows 11 Enterprise"),
                             ("ws-002", "ws-002.example.com", "Windows 10 Pro"), ("lnx-01", None, "Ubuntu")]:
            attrs = {"cn": cn, "operatingSystem": os_, "l": "Berlin"}
            if dns:
                attrs["dNSHostName"] = dns
            c.add(f"cn={cn},ou=computers,dc=example,dc=com", ["device", "quantaTestComputer"], attrs)
        c.unbind()
        yield port, p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(10)


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
tags = ["l"]
"""


def test_ldap_connector_against_slapd(tmp_path, slapd, caplog):
    port, proc = slapd
    pw = tmp_path / "ldap.pw"
    pw.write_text("admin-secret-42\n")
    db_url = f"sqlite:///{tmp_path / 'm.db'}"
    agent, engine = _agent(tmp_path, db_url, LDAP_TOML.format(port=port, pwfile=pw))
    r = agent.run_sync("directory", "demand")
    assert r.ok and r.created == 3, r
    d = _devices(engine)
    assert (d["ws-001"]["fqdn"], d["ws-001"]["os"], d["ws-001"]["source"]) == ("ws-001.example.com",
                                                                              "Windows 11 Enterprise", "directory")
    assert d["lnx-01"]["fqdn"] == "" and d["lnx-01"]["tags"] == {"l": "Berlin"}
    assert agent.run_sync("directory", "demand").unchanged == 3
    # wrong bind password: clear error, nothing changes, the password is never shown
    pw.write_text("not-the-password-77")
    with caplog.at_level("DEBUG"):
        r = agent.run_sync("directory", "demand")
    assert not r.ok and "cannot bind as cn=admin,dc=example,dc=com" in r.error and "invalidCredentials" in r.error
    assert "not-the-password-77" not in r.error + caplog.text
    # directory down
    pw.write_text("admin-secret-42")
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    r = agent.run_sync("directory", "demand")
    assert not r.ok and "LDAP ldap://127.0.0.1" in r.error and "nothing was changed" in r.error
    assert _devices(engine) == d
