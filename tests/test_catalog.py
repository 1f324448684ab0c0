"""The Catalog: storage on SQLite and PostgreSQL, the /Catalog API (keys before parsing), the CLI, and a
Remote Catalog server process with its own database reached by the master through catalog_url."""

import json
import subprocess
import sys
import time

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from quanta.catalog import RawEntry, RuleFileError
from quanta.catalog import store
from quanta.catalog.api import build_router
from quanta.catalog.db import open_catalog
from quanta.catalog.tables import catalog_rules, catalog_seen

from conftest import free_port, quanta, wait_until

RULES = b"""format = 1
name = "site"
version = "7"

[[rule]]
id = "acme-widget"
match = "exact"
title = "widget"
vendor = "Acme"
product = "Widget"
category = "Tools"

[[rule]]
id = "openssl-site"
match = "regex"
title = 'openssl.*'
vendor = "OpenSSL (site rule)"
product = "OpenSSL"
category = "Crypto"
priority = 500
"""


def _rows(engine, table):
    with engine.connect() as c:
        return c.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def test_seed_normalise_record_unmatched_and_import(db_url):
    engine = open_catalog(db_url)
    assert store.ruleset(engine)["name"] == "quanta-seed"
    cat = store.Catalog(engine)
    out = cat.normalize([RawEntry("Debian", "openssl", "1:3.0.11-1~deb12u2"), RawEntry("", "widget", "2.1-3"),
                         RawEntry("", "widget", "2.1-3"), RawEntry("", "bash", "5.2.15(1)-release")])
    assert [n.product for n in out] == ["OpenSSL", None, None, "Bash"]
    total, items = store.unmatched(engine, None, 0, 10)
    assert total == 1 and items[0]["title"] == "widget" and items[0]["count"] == 2
    assert store.unmatched(engine, "WIDG", 0, 10)[0] == 1 and store.unmatched(engine, "zzz", 0, 10)[0] == 0
    assert store.unmatched(engine, "%", 0, 10)[0] == 0  # LIKE wildcards in a search are literal
    total, prods = store.products(engine, "openssl", 0, 10)
    assert total == 1 and prods[0]["raw_entries"] == 1 and prods[0]["vendor"] == "OpenSSL Project"

    rf = store.import_rules(engine, RULES, "rules.toml")
    assert (rf.name, len(rf.rule)) == ("site", 2) and _rows(engine, catalog_rules) == 2
    # seen entries are re-matched against the new rule set: widget is now known, bash no longer is
    assert {r["title"] for r in store.unmatched(engine, None, 0, 10)[1]} == {"bash"}
    n = cat.normalize([RawEntry("", "OpenSSL", "3.0.2")])[0]  # the Catalog reloads the new rules by itself
    assert (n.vendor, n.category, n.rule_id) == ("OpenSSL (site rule)", "Crypto", "openssl-site")
    assert _rows(engine, catalog_seen) == 4  # OpenSSL 3.0.2 is a new raw entry; widget was recorded once


def test_a_bad_rule_file_changes_nothing(db_url):
    engine = open_catalog(db_url)
    store.Catalog(engine).normalize([RawEntry("", "widget", "1")])
    before = (store.list_rules(engine), store.ruleset(engine), store.unmatched(engine, None, 0, 10))
    for bad in (RULES.replace(b'priority = 500', b'priority = "500"'), RULES + b"\n[[rule]]\nid = 'x'\n",
                RULES.replace(b"openssl.*", b"openssl(")):
        with pytest.raises(RuleFileError):
            store.import_rules(engine, bad, "bad.toml")
    assert (store.list_rules(engine), store.ruleset(engine), store.unmatched(engine, None, 0, 10)) == before


def test_keys(db_url):
    engine = open_catalog(db_url)
    key = store.add_key(engine, "master")
    assert store.key_name(engine, key) == "master" and store.key_name(engine, key + "x") is None
    with pytest.raises(ValueError, match="exists"):
        store.add_key(engine, "master")
    assert store.remove_key(engine, "master") and store.key_name(engine, key) is None


@pytest.fixture
def api(tmp_path):
    engine = open_catalog(f"sqlite:///{tmp_path / 'c.db'}")
    app = FastAPI()
    app.include_router(build_router(engine), prefix="/Catalog")
    with TestClient(app) as client:
        yield client, store.add_key(engine, "test")


def test_api_requires_a_key_before_parsing(api):
    client, key = api
    for method, path in [("POST", "/Catalog/Normalize"), ("GET", "/Catalog/Products"), ("GET", "/Catalog/Unmatched"),
                         ("GET", "/Catalog/Info"), ("GET", "/Catalog/Rules")]:
        r = client.request(method, path, content=b"{not json")
        assert r.status_code == 401 and "API key" in r.json()["detail"], (path, r.text)
        r = client.request(method, path, content=b"{not json", headers={"Authorization": "Bearer qcat_wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    # the UI page itself carries no data and needs no key
    assert client.get("/Catalog/").status_code == 200 and "Quanta Catalog" in client.get("/Catalog/").text


def test_api_normalise_products_unmatched_and_bad_bodies(api):
    client, key = api
    h = {"Authorization": f"Bearer {key}"}
    rows = [{"publisher": "Debian", "title": "openssl", "version": "1:3.0.11-1~deb12u2"},
            {"Publisher": "", "Product": "mystery-tool", "Version": "0.9-1"}]  # SCALE GetInstallations columns
    r = client.post("/Catalog/Normalize", json=rows, headers=h)
    assert r.status_code == 200, r.text
    a, b = r.json()
    assert (a["vendor"], a["product"], a["version"], a["raw_version"]) == ("OpenSSL Project", "OpenSSL", "3.0.11",
                                                                          "1:3.0.11-1~deb12u2")
    assert (b["matched"], b["product"], b["version"]) == (False, None, "0.9")
    assert client.get("/Catalog/Unmatched", headers={"X-Api-Key": key}).json()["items"][0]["title"] == "mystery-tool"
    p = client.get("/Catalog/Products", params={"q": "openssl"}, headers=h).json()
    assert p["total"] == 1 and p["items"][0]["raw_entries"] == 1
    assert client.get("/Catalog/Info", headers=h).json()["ruleset"]["name"] == "quanta-seed"
    # wrong types, missing fields, not a list, malformed JSON, out-of-range paging, too many entries
    for body in (b'[{"title": 5}]', b'[{"version": "1"}]', b'{"title": "x"}', b"[{", b'[{"title": ""}]'):
        r = client.post("/Catalog/Normalize", content=body, headers=h)
        assert r.status_code == 422, (body, r.text)
    assert client.get("/Catalog/Products", params={"limit": 0}, headers=h).status_code == 422
    r = client.post("/Catalog/Normalize", json=[{"title": "x"}] * 5001, headers=h)
    assert r.status_code == 413


def test_cli_import_check_and_refusal(tmp_path):
    root = tmp_path / "cat"
    quanta("catalog", "init", str(root))
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_bytes(RULES)
    bad.write_bytes(RULES.replace(b'category = "Tools"', b'category = "Tools"\nweight = 3'))
    r = quanta("catalog", "import", str(root), str(bad), check=False)
    assert r.returncode == 2 and "line 12: rule.0.weight: unknown key" in r.stderr and "nothing was changed" in r.stderr
    assert "valid: rule set site 7, 2 rules" in quanta("catalog", "import", str(root), str(good), "--check").stdout
    assert "imported rule set site 7: 2 rules" in quanta("catalog", "import", str(root), str(good)).stdout
    r = quanta("catalog", "import", str(root), str(tmp_path / "missing.toml"), check=False)
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_remote_catalog_server_with_its_own_database(tmp_path):
    """`quanta catalog serve` on its own port and database; a master directory points catalog_url at it."""
    import os

    cat_root, port = tmp_path / "catalog-host", free_port()
    db = os.environ.get("QUANTA_TEST_PG_URL")
    db_args = []
    if db:  # the Catalog database on PostgreSQL, as on a real Remote Catalog server
        import uuid

        from quanta.db import normalise_url
        name = f"quanta_cat_{uuid.uuid4().hex[:10]}"
        admin = sa.create_engine(normalise_url(db), isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        db_args = ["--database-url", sa.engine.make_url(db).set(database=name).render_as_string(hide_password=False)]
    try:
        quanta("catalog", "init", str(cat_root), "--port", str(port), *db_args)
        key = quanta("catalog", "key", "add", str(cat_root), "--name", "master").stdout.strip()
        proc = subprocess.Popen([sys.executable, "-m", "quanta", "catalog", "serve", str(cat_root)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            def up():
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False
            wait_until(up, 30, "catalog server")
            master = tmp_path / "master"
            master.mkdir()
            (master / "quanta.toml").write_text(f'catalog_url = "http://127.0.0.1:{port}/Catalog"\n')
            r = quanta("catalog", "normalize", str(master), "--title", "openssl", "--version", "1:3.0.11-1", check=False)
            assert r.returncode == 2 and "no Catalog API key" in r.stderr
            (master / "catalog.key").write_text("qcat_not-a-key\n")
            r = quanta("catalog", "normalize", str(master), "--title", "openssl", check=False)
            assert r.returncode == 2 and "HTTP 401" in r.stderr
            (master / "catalog.key").write_text(key + "\n")
            out = json.loads(quanta("catalog", "normalize", str(master), "--title", "openssl",
                                    "--version", "1:3.0.11-1").stdout)
            assert out[0]["product"] == "OpenSSL" and out[0]["version"] == "3.0.11"
            assert httpx.get(f"http://127.0.0.1:{port}/Catalog/Products").status_code == 401
        finally:
            proc.terminate()
            proc.wait(10)
        # a master whose catalog is down gets a clear error naming the URL
        r = quanta("catalog", "normalize", str(master), "--title", "openssl", check=False)
        assert r.returncode == 2 and f"cannot reach the Catalog at http://127.0.0.1:{port}/Catalog" in r.stderr
    finally:
        if db_args:
            with admin.connect() as c:
                c.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                          {"n": name})
                c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
            admin.dispose()


@pytest.mark.slow
def test_software_inventory_normalised_through_the_catalog(server) -> None:
    """Real installed packages from a real agent, normalised by the co-located Catalog."""
    from quanta.client import ConsumerClient

    server.enroll("inv1")
    server.start_agent("inv1")
    server.wait_online({"inv1"})
    with ConsumerClient.for_data_dir(server.root) as api:
        iid = api.issue("@s = Software.GetInstallations(); SELECT * FROM @s;", instruction_ttl=30)["id"]
        assert api.wait(iid, 40)["states"] == {"success": 1}
        sw = api.http.get(f"/Consumer/Instructions/{iid}/Software").json()
        assert sw["devices"] == 1 and sw["raw_entries"] > 10, sw  # a Debian machine has many packages
        assert sw["normalised"], "no installed package matched the shipped rules"
        assert all(item["installations"] >= 1 and item["vendor"] and item["product"] for item in sw["normalised"])
        assert sw["unmatched_installations"] + sum(i["installations"] for i in sw["normalised"]) == sw["raw_entries"]
        # a question without software columns is refused plainly
        iid2 = api.issue("@s = Device.GetSummary(); SELECT * FROM @s;", instruction_ttl=30)["id"]
        api.wait(iid2, 40)
        r = api.http.get(f"/Consumer/Instructions/{iid2}/Software")
        assert r.status_code == 422 and "Publisher" in r.text
