"""``quanta ports``: every seed row has a counterpart, ports follow the live settings, docs are current."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from conftest import quanta

from quanta.ports import render
from quanta.ports.model import (CATALOG, CLIENTS, DATABASE, DMZ, INET_CLIENTS, MASTER, RESPONSE, SERVER, TOPOLOGIES,
                                LiveConfig, SwitchRow, build_table, databases, load_live)
from quanta.settings import Settings

BROWSERS = "Browsers"

# The seed's tables (shared/seed-ports.md), one row per flow: device, port(s), protocol, direction.
SEED = {
    "single-server": [
        ("Server", "443", "HTTPS", "in"), ("Server", "80", "HTTP", "in"), ("Server", "443", "HTTPS", "in"),
        ("Server", "443", "HTTPS", "out"), ("Server", "6002", "WebSocket (ws)", "in out"),
        ("Server", "4000", "WebSocket Secure (wss)", "in"), ("Server", "25", "SMTP", "out"),
        ("Server", "1433", "TDS", "out"), ("Server", "1433", "TDS", "out"), ("Server", "135 445", "WMI (DCOM)", "out"),
        ("Server", "1433", "TDS", "out"), ("SQL Server (master)", "1433", "TDS", "in"),
        ("SQL Server (responses)", "1433", "TDS", "in"), ("Clients", "4000", "wss", "out"),
        ("Clients", "443", "HTTPS", "out"), ("Clients", "7766", "HTTPS", "in out"), ("Browsers", "443", "HTTPS", "out"),
        ("Browsers", "80", "HTTP", "out"),
    ],
    "remote-catalog": [
        ("Server (Master Stack)", "80", "HTTP", "out"), ("Catalog Server", "80", "HTTP", "in"),
        ("Catalog Server", "443", "HTTPS", "out"), ("Catalog Server", "1433", "TDS", "out"),
        ("SQL Server (Catalog database)", "1433", "TDS", "in"), ("Browsers", "80", "HTTP", "out"),
    ],
    "remote-response-stack": [
        ("Server (Master Stack)", "443", "HTTPS", "out"), ("Server (Response Stack)", "443", "HTTPS", "in"),
        ("Server (Master Stack)", "3901", "wss", "in"), ("Server (Response Stack)", "3901", "wss", "out"),
        ("SQL Server (master database)", "1433", "TDS", "in"), ("Server (Response Stack)", "1433", "TDS", "out"),
    ],
    "dmz": [
        ("DMZ Server", "443", "HTTPS", "in"), ("DMZ Server", "443", "HTTPS", "out"), ("DMZ Server", "3901", "wss", "out"),
        ("DMZ Server", "4001", "TCP", "in"), ("DMZ Server", "4000", "wss", "in"), ("DMZ Server", "80", "HTTP", "out"),
        ("Server (Response Stack)", "443", "HTTPS", "in"), ("Server (Master Stack)", "443", "HTTPS", "out"),
        ("Server (Response Stack)", "4001", "TCP", "out"), ("Server (Master Stack)", "3901", "wss", "in"),
        ("Internet-facing clients", "443", "HTTPS", "out"), ("Internet-facing clients", "4000", "wss", "out"),
    ],
}
# The seed's device names, and Quanta's device for them in each topology.
DEVICE = {"Server": {"single-server": SERVER}, "Server (Master Stack)": MASTER, "Server (Response Stack)": RESPONSE,
          "Catalog Server": CATALOG, "DMZ Server": DMZ, "Clients": CLIENTS, "Internet-facing clients": INET_CLIENTS,
          "Browsers": BROWSERS}
PROTOCOL = {"wss": "WebSocket Secure (wss)", "ws": "WebSocket (ws)"}
# One deliberate change from the seed's tables: the Master hub (3901) is wss with mutual TLS, not ws
# (issue 11: every cross-host internal link is TLS verified against the installation CA).


def _device(seed_device: str, topology: str) -> str:
    if seed_device.startswith("SQL Server"):
        return DATABASE
    d = DEVICE[seed_device]
    return d[topology] if isinstance(d, dict) else d


def _dirs(text: str) -> set[str]:
    t = text.lower()
    return {x for x, word in (("in", "incoming"), ("out", "outgoing")) if word in t} or {t}


def _numbers(port: str) -> set[str]:
    return set(re.findall(r"\d+", port))


def _json(*args: str) -> list[dict]:
    return json.loads(quanta("ports", *args, "--format", "json").stdout)


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_every_seed_row_has_a_counterpart_or_is_marked_not_used(topology):
    rows = _json("--topology", topology)
    assert rows and all(list(r) == ["device", "port", "protocol", "direction", "usage", "configurable", "setting"]
                        for r in rows)
    for seed_device, ports, protocol, direction in SEED[topology]:
        want = (_device(seed_device, topology), set(ports.split()), PROTOCOL.get(protocol, protocol), set(direction.split()))
        matches = [r for r in rows if (r["device"], _numbers(r["port"]), r["protocol"], _dirs(r["direction"])) == want]
        assert matches, f"{topology}: seed row {seed_device} {ports} {protocol} {direction} has no counterpart"
        for r in matches:
            if r["usage"].startswith("Not used by Quanta"):
                assert len(r["usage"]) > len("Not used by Quanta: ") + 20, r  # a reason is given


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_every_output_has_a_matching_input(topology):
    rows = build_table(load_live(None), topology)
    flows = [r for r in rows if r.kind == "flow"]
    for r in flows:
        other = "Incoming" if r.direction == "Outgoing" else "Outgoing"
        assert any(o.device == r.peer_device and o.peer_device == r.device and o.numbers == r.numbers
                   and o.direction == other and o.label == r.label for o in flows), r
    # and the named examples of model-product rows Quanta does not use are there, with reasons
    text = json.dumps([r.as_json() for r in rows])
    assert "Not used by Quanta" in text and ("WMI" in text or topology != "single-server")
    if topology == "single-server":
        assert any(r.port == "UDP 1434" and r.usage.startswith("Not used by Quanta") for r in rows)


def test_plain_words_usage_and_settings():
    rows = {(r.device, r.port, r.direction, r.protocol): r for r in build_table(load_live(None), "single-server")}
    sw = rows[(SERVER, "TCP 4000", "Incoming", "WebSocket Secure (wss)")]
    assert "SwitchConfiguration.Port" in sw.usage and sw.setting == "SwitchConfiguration.Port"
    ag = rows[(CLIENTS, "TCP 4000", "Outgoing", "WebSocket Secure (wss)")]
    assert "Agents start" in ag.usage and "Switch=<host>:4000" in ag.usage


def test_database_row_shows_sqlite_or_postgresql_host_and_port():
    rows = _json()
    db = [r for r in rows if r["device"] == DATABASE and not r["usage"].startswith("Not used")]
    assert db and all(r["port"] == "none: embedded SQLite file" for r in db)
    s = Settings(server_name="srv", database_url="postgresql://quanta@db.example.com:6543/quanta")
    cfg = LiveConfig(s, (SwitchRow("switch-1", "srv", 4000),), databases(s, None), "test")
    rows = build_table(cfg, "remote-response-stack")
    db_in = [r for r in rows if r.device == DATABASE and r.direction == "Incoming" and r.kind == "flow"]
    assert [r.port for r in db_in] == ["TCP 6543"] and "db.example.com:6543" in db_in[0].usage
    outs = {r.device for r in rows if r.kind == "flow" and r.peer_device == DATABASE}
    assert outs == {MASTER, RESPONSE}  # the Response Stack reads the master database too


def _assert_switch_port(rows: list[dict], port: int, old: int = 4000, poke: bool = True) -> None:
    ports = {r["port"] for r in rows}
    assert f"TCP {port}" in ports and (f"TCP {port + 1}" in ports) == poke  # poke crosses hosts only in a DMZ
    for r in rows:
        if "Switch" in r["usage"] and not r["usage"].startswith("Not used"):
            assert str(old) not in r["port"], r


def test_switch_port_from_init_and_from_switch_configuration(tmp_path):
    root = tmp_path / "srv"
    quanta("init", str(root), "--switch-port", "4100", "--server-name", "localhost")
    for topology in ("single-server", "dmz"):
        rows = _json(str(root), "--topology", topology)
        _assert_switch_port(rows, 4100, poke=topology == "dmz")
    nft = quanta("ports", str(root), "--format", "nftables").stdout
    assert "tcp dport 4100 accept" in nft and "dport 4000" not in nft
    internal = _json(str(root), "--internal")
    assert any(r["port"] == "TCP 4101" for r in internal)  # the poke port, inside the single server

    # change the Port column of SwitchConfiguration after installation
    from quanta.db import make_engine
    from quanta.db.tables import switch_configuration
    from quanta.settings import DataDir, load_settings

    engine = make_engine(DataDir(root).master_url(load_settings(root)))
    with engine.begin() as c:
        c.execute(switch_configuration.update().values(Port=4200))
    engine.dispose()
    rows = _json(str(root), "--topology", "dmz")
    _assert_switch_port(rows, 4200, old=4100)
    assert not any("4100" in r["port"] or "4101" in r["port"] for r in rows)


def test_markdown_and_csv_have_the_seed_columns():
    md = quanta("ports").stdout
    assert md.splitlines()[0] == "| Device | Port | Protocol | Direction | Usage | Configurable |"
    csv_text = quanta("ports", "--format", "csv", "--topology", "dmz").stdout
    assert csv_text.splitlines()[0] == "device,port,protocol,direction,usage,configurable,setting"


def test_bad_options_are_refused():
    r = quanta("ports", "--topology", "nosuch", check=False)
    assert r.returncode == 2 and "single-server" in r.stderr
    r = quanta("ports", "--format", "nftables", "--host", "dmz", check=False)
    assert r.returncode == 2 and "no dmz host" in r.stderr


@pytest.mark.parametrize("topology,host", [("single-server", None), ("dmz", "dmz"), ("remote-response-stack", "response"),
                                           ("remote-catalog", "catalog")])
def test_nftables_ruleset_is_valid(topology, host, tmp_path):
    args = ["ports", "--topology", topology, "--format", "nftables"] + (["--host", host] if host else [])
    text = quanta(*args).stdout
    assert "policy drop" in text and 'iif "lo" accept' in text and render.rule_lines(text)
    nft = shutil.which("nft")
    if nft is None:
        pytest.skip("nft is not installed here: syntax checked by the conformance test in CI")
    f = tmp_path / "r.nft"
    f.write_text(text)
    r = subprocess.run([nft, "-c", "-f", str(f)], capture_output=True, text=True)
    if r.returncode != 0 and "Operation not permitted" in r.stderr:
        pytest.skip("nft -c needs CAP_NET_ADMIN here")
    assert r.returncode == 0, r.stderr


def test_docs_are_up_to_date():
    from quanta.ports.docs import DOCS_PATH, generate

    assert DOCS_PATH.exists(), "docs/ports.md missing: run 'python -m quanta.ports.docs'"
    assert DOCS_PATH.read_text() == generate(), "docs/ports.md is out of date: run 'python -m quanta.ports.docs'"


def test_http_tier_serves_the_crl_and_health(tmp_path):
    from fastapi.testclient import TestClient

    from quanta.http_tier import build_app
    from quanta.settings import load_settings

    root = tmp_path / "srv"
    quanta("init", str(root), "--server-name", "localhost")
    client = TestClient(build_app(root, load_settings(root)))
    assert client.get("/health").json()["status"] == "ok"
    r = client.get("/crl.pem")
    assert r.status_code == 200 and r.content == (root / "pki" / "crl.pem").read_bytes()
    assert r.content.startswith(b"-----BEGIN X509 CRL-----")


def test_http_tier_taken_port_names_the_setting(tmp_path):
    import socket

    root = tmp_path / "srv"
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        quanta("init", str(root), "--server-name", "localhost", "--port", f"http={port}")
        r = quanta("http", str(root), check=False, timeout=30)
    assert r.returncode == 2 and f"port {port}" in r.stderr and "http" in r.stderr
