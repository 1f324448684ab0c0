"""The Integrate Agent process: loopback WebSocket with the internal token checked at the handshake,
on-demand runs through the CLI, scheduled runs, bad requests; and a whole single server where imported
devices appear in GET /Consumer/Devices and the Catalog answers on the http port."""

import json
import subprocess
import sys
import time

import httpx
import psutil
import pytest
import sqlalchemy as sa
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from quanta.db import make_engine
from quanta.db.tables import integrate_runs
from quanta.internal import HOPS, INTEGRATE_CLIENT, credential
from quanta.settings import DataDir, load_settings

from conftest import make_server, quanta, wait_until

CSV = "device_id,fqdn,os\nkiosk-1,kiosk-1.shop,Windows 11 IoT\nkiosk-2,kiosk-2.shop,Windows 11 IoT\n"


def _port(root, name):
    import tomllib

    return tomllib.loads((root / "quanta.toml").read_text())["ports"][name]


def _config(root, src, interval=0):
    (root / "integrate.toml").write_text(f'[[connector]]\nname = "shops"\ntype = "file"\npath = "{src}"\n'
                                         f"interval = {interval}\n")


@pytest.fixture
def integrate(tmp_path):
    s = make_server(tmp_path)
    src = tmp_path / "shops.csv"
    src.write_text(CSV)
    _config(s.root, src)
    log = open(tmp_path / "integrate.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "quanta", "integrate", str(s.root)], stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
    port = _port(s.root, "integrate")
    wait_until(lambda: "listening on ws" in (tmp_path / "integrate.log").read_text(), 20, "integrate agent")
    try:
        yield s, p, port, src
    finally:
        p.terminate()
        p.wait(10)


def test_integrate_agent_process(integrate, tmp_path):
    s, p, port, src = integrate
    # loopback only
    listening = [c.laddr for c in psutil.Process(p.pid).net_connections() if c.status == "LISTEN"]
    assert listening and all(a.ip == "127.0.0.1" and a.port == port for a in listening)
    # no token / a wrong token: the handshake is refused before any frame is read
    secret = DataDir(s.root).internal_secret()
    others = [credential(secret, h) for h in HOPS if h != INTEGRATE_CLIENT]  # another hop's credential
    for headers in ({}, {"Authorization": "Bearer " + "0" * 64}, {"Authorization": "Bearer " + secret.hex()},
                    *({"Authorization": f"Bearer {t}"} for t in others)):
        with pytest.raises(InvalidStatus) as ei:
            connect(f"ws://127.0.0.1:{port}/", additional_headers=headers, open_timeout=5)
        assert ei.value.response.status_code == 401
    assert "refused: missing or wrong internal credential" in (tmp_path / "integrate.log").read_text()
    # with the token: malformed and wrongly typed frames get an error reply, the connection stays usable
    token = credential(DataDir(s.root).internal_secret(), INTEGRATE_CLIENT)
    with connect(f"ws://127.0.0.1:{port}/", additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        for bad, why in [("{not json", "malformed request"), ('{"type": "run", "connector": 5}', "Expected `str`"),
                         ('{"type": "explode"}', "bad request"), ('{"type": "run", "connector": "shops", "x": 1}',
                                                                  "unknown field")]:
            ws.send(bad)
            reply = json.loads(ws.recv(timeout=10))
            assert reply["type"] == "error" and why in reply["message"], reply
        ws.send('{"type": "list"}')
        assert json.loads(ws.recv(timeout=10))["connectors"][0]["name"] == "shops"
    # on demand through the CLI
    r = quanta("integrate", "run", str(s.root), "--connector", "shops")
    assert "connector shops: 2 created, 0 updated, 0 unchanged" in r.stdout
    r = quanta("integrate", "run", str(s.root), "--connector", "shops", "--json")
    assert json.loads(r.stdout)["unchanged"] == 2
    r = quanta("integrate", "run", str(s.root), "--connector", "nope", check=False)
    assert r.returncode == 1 and "unknown connector 'nope' (known: shops)" in r.stderr
    src.unlink()
    r = quanta("integrate", "run", str(s.root), "--connector", "shops", check=False)
    assert r.returncode == 1 and "cannot read" in r.stderr and "nothing was changed" in r.stderr
    # on a schedule: the agent notices the edited configuration by itself
    src.write_text(CSV)
    _config(s.root, src, interval=1)
    engine = make_engine(DataDir(s.root).master_url(load_settings(s.root)))

    def scheduled() -> int:
        with engine.connect() as c:
            return c.execute(sa.select(sa.func.count()).select_from(integrate_runs)
                             .where(integrate_runs.c.trigger == "schedule", integrate_runs.c.ok)).scalar_one()
    wait_until(lambda: scheduled() >= 2, 20, "two scheduled runs")
    # a broken configuration is reported, not fatal
    (s.root / "integrate.toml").write_text("[[connector]]\nname = 1\n")
    r = quanta("integrate", "list", str(s.root), check=False)
    assert r.returncode == 1 and "integrate.toml: connector #1" in json.loads(r.stdout)["error"]
    assert p.poll() is None
    p.terminate()
    p.wait(10)
    r = quanta("integrate", "run", str(s.root), "--connector", "shops", check=False)
    assert r.returncode == 2 and "cannot reach the Integrate Agent" in r.stderr


@pytest.mark.slow
def test_single_server_devices_have_a_source_and_catalog_answers(server, tmp_path):
    src = tmp_path / "shops.csv"
    src.write_text(CSV)
    _config(server.root, src)
    wait_until(lambda: "integrate agent listening" in server.log_text(), 30, "integrate child", server)
    quanta("integrate", "run", str(server.root), "--connector", "shops")
    devs = {d["device_id"]: d for d in json.loads(quanta("devices", str(server.root), "--json").stdout)}
    assert devs["kiosk-1"]["source"] == "shops" and devs["kiosk-1"]["os"] == "Windows 11 IoT"
    # the Catalog on the http port (browsers reach it on 80 by default)
    http = _port(server.root, "http")
    assert httpx.get(f"http://127.0.0.1:{http}/Catalog/Products").status_code == 401
    # quanta init already saved the Master's own key (DIR/catalog.key) for the CLI and the Consumer API
    assert (server.root / "catalog.key").exists()
    out = json.loads(quanta("catalog", "normalize", str(server.root), "--title", "openssl",
                            "--version", "1:3.0.11-1~deb12u2").stdout)
    assert out[0]["vendor"] == "OpenSSL Project" and out[0]["version"] == "3.0.11"
    assert "Quanta Catalog" in httpx.get(f"http://127.0.0.1:{http}/Catalog/").text
