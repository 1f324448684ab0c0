"""``quanta preflight``: passes against a running single server, fails fast with a useful hint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, quanta, wait_until


class Components:
    """core, web, http, switch-host, coordinator and integrate as separate processes, so one can be
    stopped alone."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        log = open(self.root / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "quanta", name, str(self.root)], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, name: str) -> None:
        p = self.procs.pop(name)
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def _preflight(*args: str) -> tuple[int, dict, float]:
    started = time.monotonic()
    r = quanta("preflight", *args, "--json", check=False, timeout=60)
    assert r.stdout.strip(), f"preflight printed nothing (exit {r.returncode}): {r.stderr[-2000:]}"
    return r.returncode, json.loads(r.stdout), time.monotonic() - started


@pytest.fixture
def running(tmp_path):
    root = tmp_path / "server"
    https, switch, core, http = free_port(), free_port(pair=True), free_port(), free_port()
    quanta("init", str(root), "--https-port", str(https), "--switch-port", str(switch), "--port", f"core={core}",
           "--port", f"http={http}", "--port", f"coordinator={free_port()}", "--port", f"integrate={free_port()}",
           "--port", f"hub={free_port()}", "--port", f"interaction={free_port()}", "--server-name", "localhost")
    c = Components(root)
    quanta("smtp", str(root), "--disable")  # no mail server in this test; preflight then skips email
    for name in ("core", "web", "http", "switch-host", "coordinator", "integrate"):
        c.start(name)
    agent = tmp_path / "agents" / "pc1"
    quanta("enroll", str(root), "--device", "pc1", "--out", str(agent))
    try:
        wait_until(lambda: _preflight(str(agent), "--role", "agent")[0] == 0, 40, "all components up")
        yield root, agent, c, switch
    finally:
        c.stop_all()


def test_agent_and_master_preflight_pass_against_a_running_single_server(running):
    root, agent, _, switch = running
    for target in (agent, root):  # an agent directory, or the server's own data directory
        rc, out, _ = _preflight(str(target), "--role", "agent")
        assert rc == 0 and out["ok"], out
        names = {c["name"]: c for c in out["checks"]}
        sw = next(c for n, c in names.items() if n.startswith("switch"))
        # a server data directory has no device certificate: its Switch check stops at TLS
        reached = "WebSocket upgrade 101" if target == agent else "TLS (certificate and name verified)"
        assert sw["status"] == "pass" and reached in sw["detail"] and sw["target"].endswith(str(switch))
        assert any("Background" in n and c["status"] == "pass" for n, c in names.items())
    assert any(c["name"].startswith("CRL") and c["status"] == "pass" for c in out["checks"])
    rc, out, _ = _preflight(str(root), "--role", "master")
    assert rc == 0, out
    statuses = {c["status"] for c in out["checks"]}
    assert "fail" not in statuses and "pass" in statuses
    bound = [c for c in out["checks"] if c["direction"] == "incoming" and c["status"] == "pass"]
    assert any(c["target"].endswith(f":{switch}") for c in bound) and any(c["target"].endswith(f":{switch + 1}")
                                                                         for c in bound)
    r = quanta("preflight", str(root), "--role", "master", check=False)
    assert r.returncode == 0 and "passed" in r.stdout


def test_agent_preflight_fails_fast_with_the_switch_stopped(running):
    root, agent, c, switch = running
    c.stop("switch-host")
    rc, out, elapsed = _preflight(str(agent), "--role", "agent")
    assert rc == 1 and not out["ok"] and elapsed < 10
    bad = [x for x in out["checks"] if x["status"] == "fail"]
    assert len(bad) == 1 and bad[0]["name"].startswith("switch")
    assert f"port {switch} unreachable" in bad[0]["hint"] and "Switch" in bad[0]["hint"]
    r = quanta("preflight", str(agent), "--role", "agent", check=False)
    assert r.returncode == 1 and "failed" in r.stdout
    rc, out, _ = _preflight(str(root), "--role", "master")
    assert rc == 1 and any(x["status"] == "fail" and x["target"].endswith(f":{switch}") for x in out["checks"])


def test_blocked_port_fails_within_the_time_limit(tmp_path):
    """A port that never answers (a filtering firewall) fails in seconds, not minutes."""
    from quanta.ports.preflight import Probe, run_probe

    started = time.monotonic()
    # 192.0.2.0/24 is TEST-NET-1: never routed, so the SYN goes unanswered (or is refused at once)
    check = run_probe(Probe("switch", "192.0.2.1", 4000, "wss", "Switch", "agent", "Switch host"), timeout=1.5)
    assert check.status == "fail" and time.monotonic() - started < 5
    assert "port 4000 unreachable" in check.hint and "Switch" in check.hint


def test_certificate_name_mismatch_is_named(running):
    from quanta.ports.preflight import Probe, run_probe

    root, agent, _, switch = running
    # 127.0.0.2 reaches the same listener, but the certificate names localhost and 127.0.0.1 only
    check = run_probe(Probe("switch", "127.0.0.2", switch, "wss", "Switch", "agent", "Switch host", path="/agent",
                            ca=agent / "ca.crt", cert=agent / "device.crt", key=agent / "device.key"), timeout=3)
    assert check.status == "fail"
    assert "certificate name mismatch: expected 127.0.0.2, got" in check.hint and "localhost" in check.hint


def test_smtp_banner_and_postgresql_login_are_checked(tmp_path, pg_url):
    """The Coordinator's mail server (from the live SMTP settings) must answer with an SMTP banner,
    and the database login must succeed; both fail with a hint otherwise."""
    from aiosmtpd.controller import Controller

    class Sink:
        async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
            return "250 OK"

    mail_port = free_port()
    controller = Controller(Sink(), hostname="127.0.0.1", port=mail_port)
    controller.start()
    try:
        root = tmp_path / "srv"
        quanta("init", str(root), "--https-port", str(free_port()), "--switch-port", str(free_port(pair=True)),
               "--server-name", "localhost", "--database-url", pg_url, "--port", f"smtp={mail_port}")
        quanta("smtp", str(root), "--host", "127.0.0.1")
        _, out, _ = _preflight(str(root), "--role", "master")
        checks = {c["name"]: c for c in out["checks"]}
        smtp = next(c for n, c in checks.items() if "SMTP" in n)
        assert smtp["status"] == "pass" and "SMTP banner" in smtp["detail"], smtp
        db = [c for c in out["checks"] if c["target"].startswith("postgresql") or "database" in c["name"].lower()]
        assert db and all(c["status"] == "pass" for c in db), db
        # a wrong mail port fails with a hint
        quanta("smtp", str(root), "--port", str(free_port()))
        rc, out, _ = _preflight(str(root), "--role", "master")
        bad = {c["name"]: c for c in out["checks"] if c["status"] == "fail"}
        assert rc != 0 and any("SMTP" in n and c["hint"] for n, c in bad.items()), bad
        # an unreachable database is reported (not a crash), with a hint
        settings = (root / "quanta.toml").read_text()
        (root / "quanta.toml").write_text(settings.replace(pg_url, pg_url.rsplit("/", 1)[0] + "/no_such_db"))
        rc, out, _ = _preflight(str(root), "--role", "master")
        failed_db = [c for c in out["checks"] if c["status"] == "fail" and "no_such_db" in (c["detail"] + c["target"])]
        assert rc != 0 and failed_db and failed_db[0]["hint"], out["checks"]
    finally:
        controller.stop()
