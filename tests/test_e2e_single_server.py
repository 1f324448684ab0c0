"""Issue 2 acceptance, with real processes over real sockets and real mutual TLS."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time

import httpx
import pytest

from conftest import Server, quanta, wait_until

pytestmark = pytest.mark.slow

SUMMARY = "@s = Device.GetSummary(); SELECT * FROM @s;"


def ask(server: Server, payload: str, *extra: str, wait: int = 20) -> tuple[int, dict]:
    r = quanta("ask", str(server.root), payload, "--json", "--wait", str(wait), *extra, check=False,
               timeout=wait + 60)
    assert r.stdout.strip(), f"no JSON output; stderr: {r.stderr}"
    return r.returncode, json.loads(r.stdout)


def three(server: Server) -> None:
    for name in ("dev1", "dev2", "dev3"):
        server.enroll(name)
        server.start_agent(name)
    server.wait_online({"dev1", "dev2", "dev3"})


def test_three_devices_answer(server: Server) -> None:
    three(server)
    rc, out = ask(server, SUMMARY)
    assert rc == 0
    assert out["targeted"] == 3 and out["states"] == {"success": 3}
    assert sorted(r["device"] for r in out["responses"]) == ["dev1", "dev2", "dev3"]
    for r in out["responses"]:
        assert r["status"] == "success" and len(r["rows"]) == 1
        assert r["rows"][0]["OperatingSystemType"] == "Linux"
    # the progress bar and results table form
    r = quanta("ask", str(server.root), "@p = OperatingSystem.GetProcesses(); SELECT COUNT(*) AS N FROM @p;",
               "--wait", "20")
    assert "success 3" in r.stdout and "dev2" in r.stdout
    # scoping to named devices
    rc, out = ask(server, SUMMARY, "--device", "dev2")
    assert rc == 0 and out["targeted"] == 1 and [x["device"] for x in out["responses"]] == ["dev2"]


def _tls_client(server: Server, cert=None, key=None, ca=None, tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca or server.root / "pki" / "ca.crt"))
    if tls12:  # in TLS 1.2 the server's refusal lands inside the client's own handshake
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def _handshake(server: Server, ctx: ssl.SSLContext) -> str:
    """TLS handshake, then a WebSocket upgrade: 'ok' on 101, 'handshake: ...' if the TLS handshake
    itself failed, 'refused: ...' if the server aborted the TLS session before any HTTP answer
    (TLS 1.3 clients learn of the server's certificate refusal on their first read)."""
    import socket

    try:
        raw = socket.create_connection(("127.0.0.1", server.switch), timeout=5)
    except OSError as e:
        return f"connect: {e}"
    with raw:
        try:
            tls = ctx.wrap_socket(raw, server_hostname="localhost")
        except (ssl.SSLError, OSError) as e:
            return f"handshake: {e}"
        with tls:
            try:
                tls.sendall(b"GET /agent HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
                data = tls.recv(100)
            except (ssl.SSLError, OSError) as e:
                return f"refused: {e}"
            return "ok" if data.startswith(b"HTTP/1.1 101") else f"refused: closed with {data!r}"


def test_handshake_refusals_and_revocation(server: Server, tmp_path) -> None:
    three(server)
    agents = server.root.parent / "agents"
    # a client with no certificate
    assert _handshake(server, _tls_client(server)).startswith("refused")
    assert _handshake(server, _tls_client(server, tls12=True)).startswith("handshake:")
    # a client whose certificate comes from another CA
    from quanta.pki import Pki

    other = Pki(tmp_path / "other-ca")
    other.create("localhost")
    other.issue("dev1", tmp_path / "o.crt", tmp_path / "o.key")
    assert _handshake(server, _tls_client(server, tmp_path / "o.crt", tmp_path / "o.key")).startswith("refused")
    assert _handshake(server, _tls_client(server, tmp_path / "o.crt", tmp_path / "o.key", tls12=True)).startswith(
        "handshake:")
    # the real certificate works
    assert _handshake(server, _tls_client(server, agents / "dev1" / "device.crt", agents / "dev1" / "device.key")) == "ok"

    quanta("revoke", str(server.root), "--device", "dev1")
    # the live connection is dropped without a Switch restart, and reconnecting is refused at the handshake
    wait_until(lambda: "dev1" not in server.online(), 15, "dev1 dropped after revoke", server)
    dev1 = (agents / "dev1" / "device.crt", agents / "dev1" / "device.key")
    assert _handshake(server, _tls_client(server, *dev1)).startswith("refused")
    assert _handshake(server, _tls_client(server, *dev1, tls12=True)).startswith("handshake:")
    rc, out = ask(server, SUMMARY)
    assert rc == 0 and out["targeted"] == 2 and out["states"] == {"success": 2}
    assert "certificate revoked" in server.log_text()
    time.sleep(2)
    assert "dev1" not in server.online()


def test_device_that_comes_online_during_the_window_answers(server: Server) -> None:
    three(server)
    server.stop_agent("dev3")
    wait_until(lambda: "dev3" not in server.online(), 15, "dev3 offline")
    proc = subprocess.Popen([sys.executable, "-m", "quanta", "ask", str(server.root), SUMMARY, "--json", "--wait", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    server.start_agent("dev3")
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stderr
    out = json.loads(stdout)
    assert out["states"] == {"success": 3}, out


def test_device_that_never_returns_ends_offline_not_missing(server: Server) -> None:
    three(server)
    server.stop_agent("dev2")
    wait_until(lambda: "dev2" not in server.online(), 15, "dev2 offline")
    rc, out = ask(server, SUMMARY, wait=4)
    assert rc == 0, out
    assert out["targeted"] == 3 and out["states"] == {"success": 2, "offline": 1}
    assert {r["device"]: r["status"] for r in out["responses"]}["dev2"] == "offline"


def test_switch_killed_mid_instruction_loses_and_duplicates_nothing(server: Server) -> None:
    names = [f"dev{i}" for i in range(1, 6)]
    for n in names:
        server.enroll(n)
        server.start_agent(n)
    server.wait_online(set(names))
    # A question that takes a few seconds on each device, so the Switch dies while they answer.
    slow = ("@p = OperatingSystem.GetProcesses(); "
            "SELECT COUNT(*) AS N FROM @p, (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 1500000) "
            "SELECT MAX(x) AS M FROM c);")
    proc = subprocess.Popen([sys.executable, "-m", "quanta", "ask", str(server.root), slow, "--json", "--wait", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: "delivering to 5 connected devices" in server.log_text(), 20, "delivery", server)
    [switch_pid] = server.pids(f"quanta switch {server.root}")
    os.kill(switch_pid, signal.SIGKILL)
    # the Switch Host restarts it and the agents reconnect
    wait_until(lambda: server.pids(f"quanta switch {server.root}") not in ([], [switch_pid]), 20, "switch restart", server)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    out = json.loads(stdout)
    assert out["targeted"] == 5 and out["states"] == {"success": 5}, out
    assert sorted(r["device"] for r in out["responses"]) == names  # exactly one row per device
    # each agent ran the instruction at most once (its journal dedups re-delivery)
    for n in names:
        assert server.agent_log(n).count("(adhoc): success") == 1, server.agent_log(n)
    # and they came back to the new Switch process on the TLS sessions the killed one issued
    # (shared session-ticket keys): no full handshake, no certificate exchange
    for n in names:
        assert "(TLS session resumed)" in server.agent_log(n), server.agent_log(n)


def test_consumer_api_boundaries(server: Server) -> None:
    base = f"https://localhost:{server.https}"
    ca = ssl.create_default_context(cafile=str(server.root / "pki" / "ca.crt"))
    with httpx.Client(base_url=base, verify=ca) as c:
        assert c.get("/Consumer/openapi.json").json()["info"]["title"] == "Quanta Consumer API"
        assert c.post("/Consumer/Instructions", json={"payload": SUMMARY}).status_code == 401
        assert c.get("/Consumer/Devices", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.post("/Consumer/Authentication/Token", json={"username": "admin", "password": "wrong"}).status_code == 401
        creds = dict(line.split("=", 1) for line in (server.root / "admin.credentials").read_text().split())
        assert oct((server.root / "admin.credentials").stat().st_mode & 0o777) == "0o600"
        tok = c.post("/Consumer/Authentication/Token", json=creds).json()["token"]
        c.headers["Authorization"] = f"Bearer {tok}"
        # wrong types and unknown fields are refused by name
        r = c.post("/Consumer/Instructions", json={"payload": SUMMARY, "instruction_ttl": "soon"})
        assert r.status_code == 422 and "instruction_ttl" in r.text
        r = c.post("/Consumer/Instructions", json={"payload": SUMMARY, "bogus": 1})
        assert r.status_code == 422 and "bogus" in r.text
        # a wrong SCALE parameter type is a compile error with line and column, before any device sees it
        r = c.post("/Consumer/Instructions", json={"payload": "@f = FileSystem.GetFileByLine(FileName: 5);"})
        assert r.status_code == 422
        assert r.json()["detail"]["line"] == 1 and r.json()["detail"]["column"] > 1
        assert "expects string" in r.json()["detail"]["message"]
        # unknown method
        r = c.post("/Consumer/Instructions", json={"payload": "@x = Device.getdisks();"})
        assert r.status_code == 422 and "Unsupported method 'getdisks'" in r.json()["detail"]["error"]
        # nothing was stored for the refused requests
        assert c.get("/Consumer/Instructions/1").status_code == 404
        # an action is stored, but waits for a second person
        r = c.post("/Consumer/Instructions", json={"payload": '@k = OperatingSystem.KillProcess(ProcessId: "1");'})
        assert r.status_code == 201 and r.json()["status"] == "pending_approval"
        pending = r.json()["id"]
        assert c.get(f"/Consumer/Instructions/{pending}").json()["status"] == "pending_approval"
        # the long poll: returns the status as it is once its timeout passes (nobody approved)
        t = time.monotonic()
        r = c.get(f"/Consumer/Instructions/{pending}/Wait", params={"timeout": 0.4})
        assert r.status_code == 200 and r.json()["status"] == "pending_approval"
        assert time.monotonic() - t >= 0.39
        for bad in ("-1", "61", "soon", "nan"):
            r = c.get(f"/Consumer/Instructions/{pending}/Wait", params={"timeout": bad})
            assert r.status_code == 422 and "timeout" in r.text, (bad, r.text)
        assert c.get("/Consumer/Instructions/999/Wait", params={"timeout": 0}).status_code == 404
        # authentication comes first, before the parameters are read
        r = c.get(f"/Consumer/Instructions/{pending}/Wait", params={"timeout": "soon"}, headers={"Authorization": ""})
        assert r.status_code == 401
    import sqlalchemy as sa

    from quanta.db import make_engine
    from quanta.db.tables import audit_log

    with make_engine(f"sqlite:///{server.root / 'master.db'}").connect() as conn:
        actions = [r[0] for r in conn.execute(sa.select(audit_log.c.action))]
    assert "login_failed" in actions and "login" in actions and actions.count("issue") == 1
