"""Metrics endpoint: a component with a metrics port serves Prometheus text on the internal interface;
without one it serves nothing; a held port is a clear error naming the setting."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from conftest import free_port
from quanta.settings import Settings

SCRIPT = textwrap.dedent("""
    import sys, time
    from quanta import metrics
    from quanta.settings import Settings
    s = Settings(server_name="x", metrics_ports={{"core": {port}}})
    metrics.serve_metrics(s, "core")
    metrics.core_answers.inc(3)
    metrics.core_instructions.labels(state="active").set(2)
    with metrics.core_commit_latency.time():
        pass
    print("ready", flush=True)
    sys.stdin.read()
""")


def test_a_component_serves_prometheus_text_on_loopback() -> None:
    port = free_port()
    p = subprocess.Popen([sys.executable, "-c", SCRIPT.format(port=port)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        fams = {f.name: f for f in text_string_to_metric_families(r.text)}
        assert fams["quanta_core_answers"].samples[0].value == 3
        assert {s.labels["state"]: s.value for s in fams["quanta_core_instructions"].samples} == {"active": 2}
        assert any(s.name == "quanta_core_commit_latency_seconds_count" and s.value == 1
                   for s in fams["quanta_core_commit_latency_seconds"].samples)
        # every Quanta metric is prefixed, and the endpoint is not on other interfaces
        assert all(n.startswith(("quanta_", "python_", "process_")) for n in fams)
        addrs = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
        for addr in addrs:
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{addr}:{port}/metrics", timeout=2)
    finally:
        p.stdin.close()
        p.wait(10)


def test_no_port_no_endpoint_and_a_held_port_names_the_setting() -> None:
    from quanta.metrics import serve_metrics
    from quanta.runtime import PortError

    assert serve_metrics(Settings(server_name="x"), "core") is None
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(PortError, match="metrics_ports.web"):
            serve_metrics(Settings(server_name="x", metrics_ports={"web": port}), "web")


def test_careless_metrics_settings_are_refused() -> None:
    with pytest.raises(ValidationError, match="unknown component 'cores'"):
        Settings(server_name="x", metrics_ports={"cores": 9400})
    with pytest.raises(ValidationError, match="out of range"):
        Settings(server_name="x", metrics_ports={"core": 70000})


def test_a_real_server_exports_core_and_web_metrics(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A real server with metrics ports set: after one question, the Core's counters and the web tier's
    per-route latencies are there, labelled by route template (never by instruction id)."""
    import json

    from conftest import make_server, quanta

    s = make_server(tmp_path)
    ports = {name: free_port() for name in ("core", "web", "coordinator", "switch")}
    from quanta.settings import load_settings, save_settings

    save_settings(s.root, load_settings(s.root).model_copy(update={"metrics_ports": ports}))
    s.start()
    try:
        s.enroll("m1")
        s.start_agent("m1")
        s.wait_online({"m1"})
        r = json.loads(quanta("ask", str(s.root), "@s = Device.GetSummary(); SELECT * FROM @s;", "--json").stdout)
        assert r["states"] == {"success": 1}

        def scrape(component: str) -> dict:
            text = httpx.get(f"http://127.0.0.1:{ports[component]}/metrics", timeout=10).text
            return {f.name: f for f in text_string_to_metric_families(text)}

        core = scrape("core")
        assert core["quanta_core_answers"].samples[0].value >= 1
        assert {s.labels["status"] for s in core["quanta_core_instructions_ended"].samples
                if s.name.endswith("_total") and s.value >= 1} == {"finished"}
        assert any(s.name.endswith("_count") and s.value >= 1 for s in core["quanta_core_commit_latency_seconds"].samples)
        web = scrape("web")
        routes = {s.labels["route"] for s in web["quanta_web_request_seconds"].samples}
        assert "/Consumer/Instructions" in routes and "/Consumer/Authentication/Token" in routes
        assert not any(str(r["instruction_id"]) in route for route in routes)  # templates, not raw paths
        coord = scrape("coordinator")
        assert coord["quanta_coordinator_approvals_pending"].samples[0].value == 0
        switch = scrape("switch")  # switch-1: metrics_ports.switch + 0
        assert switch["quanta_switch_connections"].samples[0].value == 1
        assert {s.labels["result"]: s.value for s in switch["quanta_switch_handshakes"].samples} ["accepted"] >= 1
        assert switch["quanta_switch_frames_in"].samples[0].value >= 2  # hello and the answer
        assert switch["quanta_switch_frames_out"].samples[0].value >= 2  # welcome and the instruction
        assert any(s.name.endswith("_count") and s.value >= 1 for s in switch["quanta_switch_batch_latency_seconds"].samples)
    finally:
        s.stop()
