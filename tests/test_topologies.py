"""The seed's remote topologies, each host a real `quanta server` with its own role, address
and ports: a Master, a remote Response Stack sharing the Master's PostgreSQL databases, and a
DMZ server whose Switch reaches the Core only through the Response Stack's HTTPS port."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from conftest import Server, free_port, quanta, wait_until
from quanta.agent.background import BackgroundFetcher
from quanta.agent.config import load_agent_config
from quanta.client import ConsumerClient

pytestmark = pytest.mark.slow

# Three loopback addresses stand in for three hosts (each certificate names its own address).
MASTER, RESPONSE, DMZ = "127.0.0.1", "127.0.0.2", "127.0.0.3"


def _ports(*names: str) -> list[str]:
    return [x for n in names for x in ("--port", f"{n}={free_port()}")]


def test_master_response_stack_and_dmz(tmp_path: Path, pg_url: str) -> None:
    m = tmp_path / "master"
    m_https = free_port()
    quanta("init", str(m), "--https-port", str(m_https), "--switch-port", str(free_port(pair=True)),
           "--server-name", MASTER, "--database-url", pg_url,
           *_ports("core", "http", "hub", "coordinator", "integrate", "interaction"))
    r, d = tmp_path / "response", tmp_path / "dmz"
    r_https, r_switch = free_port(), free_port(pair=True)
    quanta("host", "export", str(m), "--update-master", "--role", "response", "--server-name", RESPONSE, "--out", str(r),
           "--https-port", str(r_https), "--switch-port", str(r_switch), *_ports("core", "http", "interaction"))
    d_https, d_switch = free_port(), free_port(pair=True)
    quanta("host", "export", str(m), "--update-master", "--role", "dmz", "--server-name", DMZ, "--out", str(d),
           "--https-port", str(d_https), "--switch-port", str(d_switch), "--response-url",
           f"https://{RESPONSE}:{r_https}", *_ports("core", "http", "interaction"))
    master_settings = (m / "quanta.toml").read_text()
    assert 'role = "master"' in master_settings and f"https://{RESPONSE}:{r_https}" in master_settings
    # a DMZ server holds no database credentials and no CA key; it has its own certificate
    assert "database_url" not in (d / "quanta.toml").read_text()
    assert not (d / "pki" / "ca.key").exists() and (d / "pki" / "server.crt").exists()

    hosts = {name: Server(root, https, 0, 0) for name, root, https in
             (("master", m, m_https), ("response", r, r_https), ("dmz", d, d_https))}
    for s in hosts.values():
        s.log = s.root / "server.log"
        import subprocess
        import sys

        s.proc = subprocess.Popen([sys.executable, "-m", "quanta", "server", str(s.root)],
                                  stdout=open(s.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    master, response, dmz = hosts["master"], hosts["response"], hosts["dmz"]
    try:
        wait_until(lambda: "linked to core" in response.log_text(), 40, "response switch linked", response)
        wait_until(lambda: "linked to core" in dmz.log_text(), 40, "DMZ switch linked through /Core", dmz)
        wait_until(lambda: "registered with the master hub" in dmz.log_text(), 40, "DMZ registered", dmz)
        wait_until(lambda: "dmz host 127.0.0.3 registered" in master.log_text(), 20, "hub sees DMZ", master)
        # agents: one internet-facing (DMZ Switch, DMZ Background Channel), one internal
        master.https = m_https
        inside = m.parent / "agents" / "inside"
        quanta("enroll", str(m), "--device", "inside", "--out", str(inside), "--switch", f"{RESPONSE}:{r_switch}")
        outside = m.parent / "agents" / "outside"
        quanta("enroll", str(m), "--device", "outside", "--out", str(outside),
               "--switch", f"{DMZ}:{d_switch}", "--background-url", f"https://{DMZ}:{d_https}/Background")
        # by default an agent gets every Switch of SwitchConfiguration, for failover
        both = m.parent / "agents" / "either"
        quanta("enroll", str(m), "--device", "either", "--out", str(both))
        assert f"Switch={RESPONSE}:{r_switch},{DMZ}:{d_switch}" in (both / "agent.conf").read_text()
        master.start_agent("inside")
        master.start_agent("outside")
        wait_until(lambda: {"inside", "outside"} <= master.online(), 40, "both agents online", master)
        devices = {x["device_id"]: x for x in json.loads(quanta("devices", str(m), "--json").stdout)}
        assert devices["outside"]["switch"] == f"{DMZ}-switch-1" and devices["inside"]["switch"] == f"{RESPONSE}-switch-1"

        # a question from the Master reaches both: Consumer API -> Core over https /Core, Core pokes the DMZ
        out = json.loads(quanta("ask", str(m), "@s = Device.GetSummary(); SELECT OperatingSystemType FROM @s;",
                                "--json", "--wait", "30", "--device", "inside", "--device", "outside").stdout)
        assert out["states"] == {"success": 2}, out
        assert "poke to switch" not in response.log_text(), "the Core had to fall back instead of poking"

        # content uploaded on the Master is replicated to the DMZ Background Channel
        script = b"#!/bin/bash\necho dmz\n"
        with ConsumerClient.for_data_dir(m) as api:
            up = api.http.post("/Consumer/Content", content=script).json()
        assert up["replicated_to"] == [f"https://{DMZ}:{d_https}"]
        fetched = BackgroundFetcher(load_agent_config(outside))(hashlib.sha256(script).hexdigest())
        assert fetched.read_bytes() == script

        # a revocation on the Master reaches the DMZ Switch through the hub and drops the device there
        quanta("revoke", str(m), "--device", "outside")
        wait_until(lambda: "installed the CRL pushed by the master hub" in dmz.log_text(), 20, "CRL push", dmz)
        wait_until(lambda: "outside" not in master.online(), 20, "outside dropped", master)
        assert "certificate revoked" in dmz.log_text()
        time.sleep(2)
        out = json.loads(quanta("ask", str(m), "@s = Device.GetSummary(); SELECT * FROM @s;", "--json",
                                "--wait", "20", "--device", "inside", "--device", "outside").stdout)
        assert out["states"] == {"success": 1} and out["responses"][0]["device"] == "inside"
    finally:
        for s in hosts.values():
            s.stop()
