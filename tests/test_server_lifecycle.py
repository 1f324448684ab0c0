"""The supervisor: clean stop on SIGTERM, and a port that cannot be bound stops the server with
a message naming the setting, instead of a restart loop."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from conftest import Server, make_server, quanta
from quanta.agent.runtime import backoff

pytestmark = pytest.mark.slow


def test_sigterm_stops_every_component(server: Server) -> None:
    log = server.log_text()
    for what in ("core listening on", "switch switch-1 listening", "web tier listening on https"):
        assert what in log, log
    children = server.pids(f"quanta (core|switch|switch-host|web|coordinator|http) {server.root}")
    assert len(children) >= 6, children
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0
    time.sleep(0.5)
    assert server.pids(f"quanta (core|switch|switch-host|web|coordinator|http) {server.root}") == []
    assert "all components stopped" in server.log_text()


def test_taken_port_stops_the_server_with_the_setting_named(tmp_path) -> None:
    s = make_server(tmp_path)
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("0.0.0.0", s.https))
        blocker.listen()
        proc = subprocess.run([sys.executable, "-m", "quanta", "server", str(s.root)], capture_output=True, text=True,
                              timeout=60)
    assert proc.returncode == 2
    err = proc.stderr
    assert f"port {s.https}" in err and "already in use" in err and "--https-port" in err, err
    # nothing keeps running after the refusal
    assert subprocess.run(["pgrep", "-f", f"quanta (core|switch|web|coordinator|http) {s.root}"], capture_output=True).stdout == b""


def test_progress_stream_until_finished(server: Server) -> None:
    import json
    import ssl

    server.enroll("s1")
    server.start_agent("s1")
    server.wait_online({"s1"})
    from quanta.client import ConsumerClient

    with ConsumerClient.for_data_dir(server.root) as api:
        iid = api.issue("@s = Device.GetSummary(); SELECT * FROM @s;", instruction_ttl=20)["id"]
        ctx = ssl.create_default_context(cafile=str(server.root / "pki" / "ca.crt"))
        events = []
        with httpx.stream("GET", f"https://localhost:{server.https}/Consumer/Instructions/{iid}/Stream",
                          headers={"Authorization": api.http.headers["Authorization"]}, verify=ctx, timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    assert events, "no events"
    assert events[-1]["status"] == "finished" and events[-1]["states"] == {"success": 1}
    assert all(e["id"] == iid for e in events)


def test_backoff_is_jittered_and_bounded() -> None:
    rnd = random.Random(1)
    delays = [backoff(a, 1, 60, rnd) for a in range(12)]
    assert all(1 <= d <= 60 for d in delays)
    assert max(delays[:2]) <= 2 and max(delays[8:]) > 10  # grows with the attempt number
    assert len({round(backoff(5, 1, 60, rnd), 6) for _ in range(20)}) > 15  # jitter spreads a storm
    _ = quanta


def test_cancel_stops_a_gathering_instruction_and_a_pending_action(server: Server) -> None:
    import json

    from quanta.client import ApiError, ConsumerClient

    server.enroll("c1")
    server.enroll("c2")  # never started: keeps the question gathering
    server.start_agent("c1")
    server.wait_online({"c1"})
    with ConsumerClient.for_data_dir(server.root) as api:
        iid = api.issue("@s = Device.GetSummary(); SELECT * FROM @s;", instruction_ttl=300)["id"]
        time.sleep(1.5)
        assert api.status(iid)["status"] == "active"
        r = json.loads(quanta("cancel", str(server.root), str(iid)).stdout)
        assert r["status"] == "cancelled"
        st = api.status(iid)
        assert st["status"] == "cancelled" and st["states"] == {"success": 1, "offline": 1}  # every device final
        with pytest.raises(ApiError, match="nothing to cancel"):
            api._call("POST", f"/Consumer/Instructions/{iid}/Cancel")
        action = api.issue('@k = OperatingSystem.KillProcess(ProcessId: "1");')["id"]
        assert api._call("POST", f"/Consumer/Instructions/{action}/Cancel")["status"] == "cancelled"
        assert api.status(action)["status"] == "cancelled"
