"""Scale-out: several Switches under one Switch Host, simulated fleets, a Switch killed mid-question.

Not timed: speed claims live in bench/ and docs/benchmarks.md.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from quanta.client import ConsumerClient
from quanta.simulate import Fleet, FleetRunner, SimConfig, enroll_batch

from conftest import make_server, wait_until

pytestmark = pytest.mark.slow


def _switch_pid(server, name: str) -> int:  # type: ignore[no-untyped-def]
    pids = server.pids(f"quanta switch {server.root} --name {name}$")
    assert len(pids) == 1, pids
    return pids[0]


def _connected(runner: FleetRunner) -> int:
    return runner.poll()["connected"]


def test_switch_killed_during_a_1000_device_question_loses_nothing(tmp_path: Path) -> None:
    server = make_server(tmp_path, "--switches", "2")
    fleet, _ = enroll_batch(server.root, "sim-", 1000, tmp_path / "fleet")
    server.start()
    wait_until(lambda: server.log_text().count("linked to core") >= 2, 30, "both switches linked", server)
    # Answers trickle in over ~4 s, so the kill lands in the middle of the question.
    runner = FleetRunner(fleet, SimConfig(latency="uniform:0.2:4", retry_min=0.2, retry_max=2, seed=1),
                         processes=2)
    runner.start()
    try:
        wait_until(lambda: _connected(runner) == 1000, 60, "1000 simulated devices connected", server)
        with ConsumerClient.for_data_dir(server.root) as api:
            iid = api.issue("@x = Device.GetSummary();", instruction_ttl=50)["id"]
            wait_until(lambda: api.status(iid)["states"].get("success", 0) >= 100, 30, "first answers", server)
            before = api.status(iid)["states"].get("success", 0)
            victim = _switch_pid(server, "switch-1")
            os.kill(victim, signal.SIGKILL)
            status = api.wait(iid, 45)
            assert before < 1000, "the question finished before the kill: it proves nothing"
            assert status["status"] == "finished", status
            assert status["states"] == {"success": 1000}, status
            results = api.all_results(iid)
        # The Switch Host restarted the killed Switch.
        wait_until(lambda: server.pids(f"quanta switch {server.root} --name switch-1$") not in ([], [victim]),
                   20, "switch-1 restarted", server)
        assert len(results) == 1000
        assert sorted(r["device"] for r in results) == sorted(fleet.names)
        for r in results:  # each device's own answer, exactly one row of it
            assert r["status"] == "success" and len(r["rows"]) == 1 and r["rows"][0][0] == r["device"]
        with sqlite3.connect(server.root / "responses.db") as db:
            dup = db.execute("SELECT device_id, COUNT(*) FROM results WHERE instruction_id = ? "
                             "GROUP BY device_id HAVING COUNT(*) > 1", (iid,)).fetchall()
        assert dup == []
        totals = runner.poll()
        # Executed at most once per device (the journal rule), though some were delivered twice.
        assert totals["executions"] == 1000, totals
        assert totals["disconnects"] >= 1, totals
        wait_until(lambda: _connected(runner) == 1000, 30, "every device back after the kill", server)
    finally:
        summary = runner.stop()
        server.stop()
    assert "1000/1000 devices connected" in summary.line()


def test_one_switch_gives_a_question_to_more_devices_than_one_fanout_slice(tmp_path: Path) -> None:
    """The Switch writes Delivers FANOUT_SLICE per loop turn, reading answers in between: with
    more devices than two slices on one Switch, every device is still given the question once and
    answers once, and the answers read meanwhile are committed with the rest."""
    from quanta.protocol.switch_state import FANOUT_SLICE

    n = 2 * FANOUT_SLICE + 77  # two whole slices and a part
    server = make_server(tmp_path)
    fleet, _ = enroll_batch(server.root, "fan-", n, tmp_path / "fleet")
    server.start()
    runner = FleetRunner(fleet, SimConfig(seed=3), processes=2)
    runner.start()
    try:
        wait_until(lambda: _connected(runner) == n, 60, f"{n} simulated devices connected", server)
        with ConsumerClient.for_data_dir(server.root) as api:
            iid = api.issue("@x = Device.GetSummary();", instruction_ttl=50)["id"]
            status = api.wait(iid, 45)
            assert status["status"] == "finished" and status["states"] == {"success": n}, status
            results = api.all_results(iid)
        assert sorted(r["device"] for r in results) == sorted(fleet.names)
        wait_until(lambda: runner.poll()["acks"] >= n, 20, "every answer acknowledged", server)
        totals = runner.poll()
        assert totals["deliveries"] == n and totals["executions"] == n, totals
        assert "delivering to %d connected devices" % n in server.log_text()
    finally:
        runner.stop()
        server.stop()


def test_devices_spread_over_switches_and_fail_over(tmp_path: Path) -> None:
    """Agents with a Switch= list spread over the Switches; when one is down they use another."""
    server = make_server(tmp_path, "--switches", "3")
    fleet, _ = enroll_batch(server.root, "spread-", 90, tmp_path / "fleet")
    assert len(fleet.switches) == 3
    server.start()
    wait_until(lambda: server.log_text().count("linked to core") >= 3, 30, "three switches linked", server)
    runner = FleetRunner(fleet, SimConfig(retry_min=0.2, retry_max=1, seed=2), processes=1)
    runner.start()
    try:
        wait_until(lambda: _connected(runner) == 90, 30, "90 devices connected", server)
        import json

        from conftest import quanta

        devs = json.loads(quanta("devices", str(server.root), "--json").stdout)
        per_switch: dict[str, int] = {}
        for d in devs:
            if d["online"]:
                per_switch[d["switch"]] = per_switch.get(d["switch"], 0) + 1
        assert sorted(per_switch) == ["switch-1", "switch-2", "switch-3"], per_switch
        assert all(n == 30 for n in per_switch.values()), per_switch
        # SIGKILL switch-3: its devices reconnect (to the restarted Switch or another one).
        os.kill(_switch_pid(server, "switch-3"), signal.SIGKILL)
        wait_until(lambda: runner.poll()["disconnects"] >= 30, 20, "switch-3's devices dropped", server)
        wait_until(lambda: _connected(runner) == 90, 30, "all 90 back", server)
        with ConsumerClient.for_data_dir(server.root) as api:
            iid = api.issue("@x = Device.GetSummary();", instruction_ttl=30)["id"]
            status = api.wait(iid, 35)
        assert status["states"] == {"success": 90}, status
    finally:
        runner.stop()
        server.stop()


def test_a_dead_switch_in_the_list_is_failed_over(tmp_path: Path) -> None:
    """A Switch= entry that refuses connections: its devices move on to the next entry."""
    from conftest import free_port

    server = make_server(tmp_path, "--switches", "2")
    fleet, _ = enroll_batch(server.root, "fo-", 40, tmp_path / "fleet")
    dead = ("localhost", free_port())
    import json

    f = tmp_path / "fleet" / "fleet.json"
    data = json.loads(f.read_text())
    data["switches"] = [list(dead), *data["switches"]]
    f.write_text(json.dumps(data))
    fleet = Fleet.load(tmp_path / "fleet")
    server.start()
    wait_until(lambda: server.log_text().count("linked to core") >= 2, 30, "both switches linked", server)
    runner = FleetRunner(fleet, SimConfig(retry_min=0.1, retry_max=0.5, seed=3), processes=1)
    runner.start()
    try:
        wait_until(lambda: _connected(runner) == 40, 30, "40 devices connected", server)
        assert runner.poll()["connect_failures"] >= 10  # the 10 that started on the dead entry
    finally:
        runner.stop()
        server.stop()
