"""``quanta status``: the supervisors' record checked against the live system, with a real ``quanta server``
(running, a component killed with its port held, stopped, the supervisor killed), and the record's
boundaries (missing, corrupt, oversized, naming a reused pid, a second writer)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import Server, make_server, quanta, wait_until
from test_supervision import gone
from quanta.status import (EXIT_DEGRADED, EXIT_NOT_RUNNING, EXIT_RUNNING, EXIT_UNKNOWN, ROLE_COMPONENTS,
                           STARTUP_GRACE, StatusRecord, read_record, status_path)

CONFIGURED = ROLE_COMPONENTS["single"] + ("switch:switch-1",)


def status(root: Path) -> tuple[int, dict]:
    r = quanta("status", str(root), "--json", check=False)
    assert r.returncode in (0, 1, 3, 4), r.stderr
    return r.returncode, json.loads(r.stdout)


def table(root: Path) -> subprocess.CompletedProcess[str]:
    """The table, on a terminal wide enough that no cell wraps."""
    return quanta("status", str(root), check=False, env={**os.environ, "COLUMNS": "250"})


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["components"]}


def pid_of(server: Server, component: str, args: str = "") -> int:
    [pid] = server.pids(f"quanta {component} {server.root}{args}$")
    return pid


# ------------------------------------------------------------------------ without a server
@pytest.fixture(scope="module")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> Server:
    return make_server(tmp_path_factory.mktemp("status"))


@pytest.fixture
def made(initialised: Server, tmp_path: Path) -> Server:
    """A copy of one initialised (never started) data directory, for each test."""
    root = tmp_path / "server"
    shutil.copytree(initialised.root, root)
    return dataclasses.replace(initialised, root=root)


@pytest.fixture
def root(made: Server) -> Path:
    return made.root


def test_a_missing_or_wrong_directory_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for arg in (tmp_path / "nope", tmp_path):
        r = quanta("status", str(arg), check=False)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "quanta.toml").write_text("role = 'nonsense'\n")
    r = quanta("status", str(tmp_path), check=False)
    assert r.returncode == 2 and "quanta.toml" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_server_never_started_is_stopped_exit_3(made: Server) -> None:
    root = made.root
    rc, report = status(root)
    assert rc == EXIT_NOT_RUNNING == report["exit_code"]
    assert report["server"]["state"] == "stopped" and report["server"]["note"] == "never started here"
    comps = by_name(report)
    assert {n for n, c in comps.items() if c["configured"]} == set(CONFIGURED)
    assert all(c["state"] == "stopped" and c["pid"] is None for n, c in comps.items() if c["configured"])
    assert comps["hub"]["state"] == comps["hub-client"]["state"] == "not configured"
    assert [(p["name"], p["port"]) for p in comps["web"]["ports"]] == [("https", made.https)]
    assert [p["port"] for p in comps["switch:switch-1"]["ports"]] == [made.switch, made.switch + 1]
    assert [p["port"] for p in comps["core"]["ports"]] == [made.core]
    shown = table(root)
    assert shown.returncode == 3 and "never started here" in shown.stdout
    r = quanta("status", str(root), "--format", "yaml", check=False)
    assert r.returncode == 2 and "--format" in r.stderr


def test_the_components_listed_follow_the_role(made: Server) -> None:
    from quanta.settings import load_settings, save_settings

    settings = load_settings(made.root)
    save_settings(made.root, settings.model_copy(update={"role": "master"}))
    comps = by_name(status(made.root)[1])
    assert {n for n, c in comps.items() if c["configured"]} == set(ROLE_COMPONENTS["master"])
    assert not [n for n in comps if n.startswith("switch:")] and comps["core"]["state"] == "not configured"
    assert comps["hub"]["ports"][0]["port"] == settings.port("hub") and "/Core" not in comps["web"]["serves"]
    dmz = settings.model_copy(update={"role": "dmz", "local_switches": [
        {"Name": "dmz-switch-1", "Host": "dmz.example", "Port": 4100, "Enabled": True}]})
    save_settings(made.root, dmz)
    rc, report = status(made.root)
    comps = by_name(report)
    assert rc == EXIT_NOT_RUNNING and {n for n, c in comps.items() if c["configured"]} == {
        "switch-host", "web", "hub-client", "switch:dmz-switch-1"}
    assert [p["port"] for p in comps["switch:dmz-switch-1"]["ports"]] == [4100, 4101]
    assert comps["web"]["serves"] == "web tier: Background Channel"


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"version": 1}', b"\x00\xff" * 100,
                                     b'{"version": 1, "updated_at": 1, "supervisor": {"name": "server", "pid": -5, '
                                     b'"started": 1, "argv": [], "state": "running"}, "children": {}}',
                                     b" " * (2 << 20)])
def test_a_corrupt_record_is_unknown_exit_4_not_a_traceback(root: Path, content: bytes) -> None:
    path = status_path(root, "server")
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    r = quanta("status", str(root), "--json", check=False)
    assert r.returncode == EXIT_UNKNOWN and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("warning: ") and str(path) in r.stderr
    report = json.loads(r.stdout)
    assert report["server"]["state"] == "unknown" and report["problems"]


def _record(root: Path, pid: int, started: float, argv: list[str]) -> None:
    rec = {"version": 1, "updated_at": 1.0,
           "supervisor": {"name": "server", "pid": pid, "started": started, "argv": argv, "state": "running"},
           "children": {"core": {"state": "running", "pid": pid, "started": started, "argv": argv}}}
    path = status_path(root, "server")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(rec))


def test_a_reused_pid_is_not_believed(root: Path) -> None:
    """The record names a live process (this test's), but one that started at another time, or with another
    command line: that is a reused pid, and the server is reported stale, not running."""
    me = psutil.Process()
    _record(root, me.pid, me.create_time() - 100, me.cmdline())
    rc, report = status(root)
    assert rc == EXIT_NOT_RUNNING and report["server"]["state"] == "stopped (stale)" and report["server"]["pid"] is None
    assert by_name(report)["core"]["state"] == "stopped (stale)" and by_name(report)["core"]["pid"] is None
    _record(root, me.pid, me.create_time(), ["python", "-m", "quanta", "server", str(root)])
    rc, report = status(root)
    assert rc == EXIT_NOT_RUNNING and report["server"]["state"] == "stopped (stale)"
    _record(root, me.pid, me.create_time(), me.cmdline())  # the real thing: believed
    rc, report = status(root)
    assert report["server"]["state"] == "running" and report["server"]["pid"] == me.pid
    young = time.time() - me.create_time() < STARTUP_GRACE
    assert by_name(report)["core"]["state"] == ("starting" if young else "not listening")  # no core port open
    assert rc == EXIT_DEGRADED


def test_the_record_is_private_atomic_and_has_one_writer(tmp_path: Path) -> None:
    path = tmp_path / "run" / "status.json"
    first = StatusRecord(path, "server")
    first.child("core").pid = 1
    first.write()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert read_record(path).children["core"].pid == 1
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left
    second = StatusRecord(path, "server")  # another supervisor in this directory: it may not write
    assert first.enabled and not second.enabled
    second.child("core").pid = 2
    second.write()
    assert read_record(path).children["core"].pid == 1
    # the lock is the process's: a supervisor killed with SIGKILL lets go of it
    code = ("import sys, time; from pathlib import Path; from quanta.status import StatusRecord; "
            f"r = StatusRecord(Path({str(tmp_path / 'b' / 'status.json')!r}), 'server'); "
            "print(r.enabled, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "True"
        assert not StatusRecord(tmp_path / "b" / "status.json", "server").enabled
    finally:
        proc.kill()
        proc.wait()
    assert StatusRecord(tmp_path / "b" / "status.json", "server").enabled


# ------------------------------------------------------------------------ a real server
def _all_running(server: Server) -> dict:
    result: dict = {}

    def ok() -> bool:
        rc, report = status(server.root)
        result.update(report)
        return rc == EXIT_RUNNING

    wait_until(ok, 60, "quanta status: every component running", server)
    return result


@pytest.mark.slow
def test_status_follows_a_killed_component_and_a_stop(server: Server) -> None:
    report = _all_running(server)
    comps = by_name(report)
    assert report["server"]["pid"] == server.proc.pid and report["server"]["state"] == "running"
    for name in ROLE_COMPONENTS["single"]:
        c = comps[name]
        assert c["state"] == "running" and c["pid"] == pid_of(server, name) and c["restarts"] == 0, c
        assert c["uptime_s"] is not None and c["uptime_s"] >= 0
        assert all(p["listening"] for p in c["ports"]), c
    switch = comps["switch:switch-1"]
    assert switch["pid"] == pid_of(server, "switch", " --name switch-1") and [p["port"] for p in switch["ports"]] == [server.switch,
                                                                                               server.switch + 1]
    assert comps["web"]["ports"][0]["port"] == server.https and "Background Channel" in comps["web"]["serves"]
    assert "Catalog" in comps["http"]["serves"]

    # kill -9 the Coordinator and hold its port: its restarts fail until the port is free again
    coordinator = comps["coordinator"]
    port = coordinator["ports"][0]["port"]
    os.kill(server.proc.pid, signal.SIGSTOP)  # no restart before the port is taken
    try:
        os.kill(coordinator["pid"], signal.SIGKILL)
        wait_until(lambda: gone(coordinator["pid"]), 10, "the coordinator dead", server)
        holder = socket.socket()
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

        def bound() -> bool:
            try:
                holder.bind(("127.0.0.1", port))
                return True
            except OSError:
                return False

        wait_until(bound, 10, f"port {port} free to hold (the coordinator's socket closed)", server)
        holder.listen()
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    seen: dict = {}

    def restarting() -> bool:
        rc, rep = status(server.root)
        c = by_name(rep)["coordinator"]
        seen.update(rc=rc, report=rep)
        return c["state"] == "restarting" and "code 75" in (c["last_error"] or "")

    try:
        wait_until(restarting, 60, "the coordinator restarting, its port held", server)
        rep = seen["report"]
        c = by_name(rep)["coordinator"]
        assert seen["rc"] == EXIT_DEGRADED and c["pid"] is None and "held by another process" in c["last_error"]
        assert c["last_error_at"] is not None and c["restarts"] >= 1
        for name in ("core", "switch-host", "web", "http", "integrate", "switch:switch-1"):  # the others run on
            assert by_name(rep)[name]["state"] == "running" and by_name(rep)[name]["pid"] == comps[name]["pid"]
        shown = table(server.root)
        assert shown.returncode == EXIT_DEGRADED and "exited with code 75" in shown.stdout, shown.stdout
    finally:
        holder.close()
    report = _all_running(server)
    c = by_name(report)["coordinator"]
    assert c["pid"] == pid_of(server, "coordinator") != coordinator["pid"] and c["restarts"] >= 1
    assert "code 75" in c["last_error"]  # the last error stays visible after the recovery
    assert f"coordinator (pid {coordinator['pid']}) was killed by SIGKILL" in server.log_text()

    # a clean stop: everything stopped, exit 3
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    rc, report = status(server.root)
    assert rc == EXIT_NOT_RUNNING and report["server"]["state"] == "stopped" and report["server"]["pid"] is None
    for name in CONFIGURED:
        c = by_name(report)[name]
        assert c["state"] == "stopped" and c["pid"] is None and not any(p["listening"] for p in c["ports"]), c


@pytest.mark.slow
def test_a_killed_supervisor_leaves_a_stale_record_and_a_second_server_does_not_overwrite_it(server: Server) -> None:
    first = _all_running(server)
    r = subprocess.run([sys.executable, "-m", "quanta", "server", str(server.root)], capture_output=True, text=True,
                       timeout=90)
    assert r.returncode == 2 and "another supervisor keeps" in r.stderr, r.stderr
    rc, report = status(server.root)
    assert rc == EXIT_RUNNING and report["server"]["pid"] == server.proc.pid
    assert {n: c["pid"] for n, c in by_name(report).items()} == {n: c["pid"] for n, c in by_name(first).items()}

    server.proc.kill()  # kill -9 of quanta server: nothing records the stop
    server.proc.wait(5)
    wait_until(lambda: all(gone(c["pid"]) for c in first["components"] if c["pid"]), 10, "every component gone")
    assert read_record(status_path(server.root, "server")).supervisor.state == "running"  # the file still says so
    rc, report = status(server.root)
    assert rc == EXIT_NOT_RUNNING and report["server"]["state"] == "stopped (stale)", report["server"]
    assert f"pid {server.proc.pid} is gone" in report["server"]["note"]
    for name in CONFIGURED:
        c = by_name(report)[name]
        assert c["state"] == "stopped (stale)" and c["pid"] is None and c["last_pid"] == by_name(first)[name]["pid"], c
    shown = table(server.root)
    assert shown.returncode == EXIT_NOT_RUNNING and "stopped (stale)" in shown.stdout
