"""Supervision: kill -9 at any level leaves no orphan holding a port, and restarts succeed.

The supervisor tests run the real ``Supervisor`` (in this process, or as a process of its own where it is
the one killed) over small stand-in children: real processes that bind real sockets and spawn
grandchildren. The server tests kill the real Switch Host and the real ``quanta server``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import psutil
import pytest

from conftest import Server, free_port, make_server, quanta, wait_until
from quanta.runtime import EXIT_PORT_IN_USE, SUPERVISED_ENV
from quanta.supervisor import Child, Supervisor

# One stand-in child; what each of its runs does is the plan's step for that run (the last step repeats):
#   serve       bind the port (exit EXIT_PORT_IN_USE if it is held), listen, sleep
#   grandchild  start a grandchild in this process group that does 'serve' but ignores SIGTERM; exit with
#               its code
#   orphan      bind the port and pass the socket to a process in a session of its own (what the group
#               kill cannot reach), which holds it until the file 'release' appears; then exit 1
#   stubborn    ignore SIGTERM and sleep
# Each run records its pid, its grandchild's pid and the supervisor's SUPERVISED_ENV in run-N.json.
CHILD = r"""
import json, os, pathlib, signal, socket, subprocess, sys, time
d, port, plan = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
run = len(list(d.glob("run-*.json")))
step = plan[min(run, len(plan) - 1)]
SERVE = '''
import signal, socket, sys, time
if sys.argv[2:] == ["ignore-term"]:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(%d)
s.listen()
time.sleep(3600)
'''
def record(**kw):
    tmp = d / f".run-{run}"
    tmp.write_text(json.dumps({"pid": os.getpid(), "env": os.environ.get("%s"), **kw}))
    tmp.rename(d / f"run-{run}.json")
if step == "serve":
    record()
    sys.argv = ["serve", str(port)]
    exec(SERVE)
elif step == "grandchild":
    g = subprocess.Popen([sys.executable, "-c", SERVE, str(port), "ignore-term"])
    record(grandchild=g.pid)
    sys.exit(g.wait())
elif step == "orphan":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    hold = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.05)"
    h = subprocess.Popen([sys.executable, "-c", hold, str(d / "release")], pass_fds=(s.fileno(),),
                         start_new_session=True)
    record(grandchild=h.pid)
    sys.exit(1)
elif step == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    record()
    time.sleep(3600)
""" % (EXIT_PORT_IN_USE, SUPERVISED_ENV)


def stand_in(name: str, d: Path, port: int, plan: str) -> Child:
    d.mkdir(parents=True, exist_ok=True)
    return Child(name, [sys.executable, "-c", CHILD, str(d), str(port), plan])


@pytest.fixture(autouse=True)
def _no_stand_in_outlives_its_test(tmp_path: Path) -> Iterator[None]:
    """A failing test must not leave its stand-ins holding ports: kill every recorded one still alive."""
    yield
    for f in tmp_path.glob("**/run-*.json"):
        rec = json.loads(f.read_text())
        for pid in (rec["pid"], rec.get("grandchild")):
            with contextlib.suppress(psutil.Error, TypeError):
                proc = psutil.Process(pid)
                if proc.cmdline()[:2] == [sys.executable, "-c"]:
                    proc.kill()


def runs(d: Path) -> list[dict]:
    return [json.loads((d / f"run-{i}.json").read_text()) for i in range(len(list(d.glob("run-*.json"))))]


def listener(port: int) -> int | None:
    """The pid listening on TCP ``port`` (the lowest, if several hold the socket), if any."""
    pids = [c.pid for c in psutil.net_connections(kind="tcp")
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid]
    return min(pids) if pids else None


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    await asyncio.to_thread(wait_until, cond, timeout, what)


def supervise(sup: Supervisor, scenario: Callable[[], Awaitable[None]]) -> int:
    """Run ``sup`` while ``scenario`` drives it; stop it when the scenario ends; return run()'s code."""
    async def main() -> int:
        running = asyncio.create_task(sup.run())
        try:
            await scenario()
        finally:
            sup.stop()
        return await asyncio.wait_for(running, 30)

    return asyncio.run(main())


# ------------------------------------------------------------------------ the supervisor alone
def test_grandchild_is_killed_with_its_child_and_the_restart_binds_the_port(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, "quanta.supervisor")
    port, d = free_port(), tmp_path / "c"
    sup = Supervisor([stand_in("c", d, port, "grandchild")], min_delay=0.1)

    async def scenario() -> None:
        await until(lambda: len(runs(d)) == 1 and listener(port) == runs(d)[0]["grandchild"], 20, "first grandchild")
        first = runs(d)[0]
        os.kill(first["pid"], signal.SIGKILL)
        await until(lambda: gone(first["grandchild"]), 10, "the orphaned grandchild killed")
        await until(lambda: len(runs(d)) == 2 and listener(port) == runs(d)[1]["grandchild"], 20,
                    "the restarted child's grandchild listening")

    assert supervise(sup, scenario) == 0
    first, second = runs(d)
    assert (first["env"], second["env"]) == ("start", "restart")
    assert gone(second["pid"]) and gone(second["grandchild"])  # and the stop took the whole group
    assert listener(port) is None
    text = caplog.text
    assert (f"c (pid {first['pid']}) was killed by SIGKILL; killed its process group {first['pid']}: "
            f"1 leftover process(es): pid {first['grandchild']}") in text
    assert (f"c (pid {second['pid']}) stopped: it was killed by SIGTERM; killed its process group {second['pid']}: "
            f"1 leftover process(es): pid {second['grandchild']}") in text
    assert "restarting c in 0.1 s (restart 1)" in text
    assert "all components stopped" in text


def test_a_port_still_held_at_restart_is_waited_for(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, "quanta.supervisor")
    port, d = free_port(), tmp_path / "c"
    sup = Supervisor([stand_in("c", d, port, "orphan,serve")], min_delay=0.1, max_delay=0.5, port_retry_window=20)

    async def scenario() -> None:
        await until(lambda: len(runs(d)) >= 3, 30, "restarts refused while the port is held")
        assert listener(port) == runs(d)[0]["grandchild"]
        (d / "release").touch()
        await until(lambda: listener(port) == runs(d)[-1]["pid"], 30, "a restart bound the port once its holder left")

    assert supervise(sup, scenario) == 0
    assert gone(runs(d)[0]["grandchild"])
    assert runs(d)[1]["env"] == "restart"
    assert "c: its port is still held after the restart; retrying in" in caplog.text
    assert "configuration error" not in caplog.text


def test_a_port_held_at_first_start_is_a_configuration_error(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, "quanta.supervisor")
    port, d, other = free_port(), tmp_path / "c", tmp_path / "other"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        sup = Supervisor([stand_in("c", d, port, "serve"), stand_in("other", other, free_port(), "serve")],
                         min_delay=0.1)
        assert asyncio.run(asyncio.wait_for(sup.run(), 30)) == 2  # it ends by itself
    assert len(runs(d)) == 1  # not restarted
    survivor = sup.children[1].proc
    assert survivor is not None and survivor.returncode is not None and gone(survivor.pid)  # every component stopped
    assert "c cannot bind a port on its first start" in caplog.text and "stopping every component" in caplog.text


def test_a_restarted_supervisor_waits_for_its_childrens_ports_and_gives_up_after_the_window(tmp_path: Path,
                                                                                             caplog) -> None:
    caplog.set_level(logging.INFO, "quanta.supervisor")
    port, d = free_port(), tmp_path / "c"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        sup = Supervisor([stand_in("c", d, port, "serve")], min_delay=0.1, max_delay=0.2, port_retry_window=1.5,
                         restarted=True)
        started = time.monotonic()
        assert asyncio.run(asyncio.wait_for(sup.run(), 30)) == 2  # it ends by itself, giving up
    assert 1.5 <= time.monotonic() - started < 15
    assert len(runs(d)) >= 3 and {r["env"] for r in runs(d)} == {"restart"}
    assert "its port is still in use" in caplog.text and "giving up" in caplog.text


def test_a_child_that_ignores_sigterm_is_killed_after_the_stop_timeout(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, "quanta.supervisor")
    d = tmp_path / "c"
    sup = Supervisor([stand_in("c", d, free_port(), "stubborn")], stop_timeout=1)

    async def scenario() -> None:
        await until(lambda: bool(runs(d)), 20, "child started")

    assert supervise(sup, scenario) == 0
    assert gone(runs(d)[0]["pid"])
    assert "did not stop within 1 s of SIGTERM; killing its process group" in caplog.text


def test_a_child_that_cannot_be_started_stops_the_supervisor(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, "quanta.supervisor")
    sup = Supervisor([Child("ghost", [str(tmp_path / "no-such-program")])])
    assert asyncio.run(sup.run()) == 2
    assert "ghost cannot be started" in caplog.text


DRIVER = ("import asyncio, logging, sys; from quanta.supervisor import Child, Supervisor; "
          "logging.basicConfig(level=logging.INFO); "
          "sys.exit(asyncio.run(Supervisor([Child('c', sys.argv[1:])]).run()))")


@pytest.mark.parametrize("sig", [
    pytest.param(signal.SIGKILL, marks=pytest.mark.skipif(not sys.platform.startswith("linux"),
                                                          reason="the parent-death signal is Linux only")),
    signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_children_die_with_their_supervisor(tmp_path: Path, sig: signal.Signals) -> None:
    """A supervisor killed by ``sig`` (a real process of its own) leaves no child behind: SIGKILL through
    the parent-death signal, the others through a graceful stop."""
    port, d = free_port(), tmp_path / "c"
    stand_in("c", d, port, "serve")
    sup = subprocess.Popen([sys.executable, "-c", DRIVER, sys.executable, "-c", CHILD, str(d), str(port), "serve"],
                           start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: bool(runs(d)) and listener(port) == runs(d)[0]["pid"], 20, "child listening")
        child = runs(d)[0]["pid"]
        assert os.getpgid(child) == child != os.getpgid(sup.pid)  # a process group of its own
        sup.send_signal(sig)
        rc = sup.wait(15)
        wait_until(lambda: gone(child), 5, "the child gone with its supervisor")
        assert listener(port) is None
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL
        else:
            assert rc == 0
            assert f"c (pid {child}) stopped: it was killed by SIGTERM" in sup.stderr.read()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sup.pid, signal.SIGKILL)


# ------------------------------------------------------------------------ the port message
def test_a_held_port_names_its_holder_and_exits_75_only_under_a_supervisor(tmp_path: Path) -> None:
    root = tmp_path / "srv"
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        quanta("init", str(root), "--server-name", "localhost", "--port", f"http={port}")
        by_hand = quanta("http", str(root), check=False, timeout=30)
        supervised = quanta("http", str(root), check=False, timeout=30, env={**os.environ, SUPERVISED_ENV: "restart"})
    assert by_hand.returncode == 2 and supervised.returncode == EXIT_PORT_IN_USE
    for r in (by_hand, supervised):
        assert f"port {port}" in r.stderr and f"already in use by pid {os.getpid()} (" in r.stderr, r.stderr


# ------------------------------------------------------------------------ a real server
@pytest.mark.slow
def test_a_switch_port_taken_at_first_start_stops_the_server_naming_the_holder(tmp_path: Path) -> None:
    s = make_server(tmp_path)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("0.0.0.0", s.switch))
        taken.listen()
        r = subprocess.run([sys.executable, "-m", "quanta", "server", str(s.root)], capture_output=True, text=True,
                           timeout=90)
    assert r.returncode == 2, r.stderr
    assert f"port {s.switch} on 0.0.0.0" in r.stderr and f"already in use by pid {os.getpid()} (" in r.stderr
    assert "switch:switch-1 cannot bind a port on its first start" in r.stderr
    assert "switch-host exited with a configuration error (code 2)" in r.stderr
    assert "all components stopped" in r.stderr
    assert subprocess.run(["pgrep", "-f", f"quanta [a-z-]+ {s.root}"], capture_output=True).stdout == b""


def _switches(server: Server) -> list[psutil.Process]:
    return [psutil.Process(p) for p in server.pids(f"quanta switch {server.root}")]


def _switch_listener(server: Server) -> int | None:
    return listener(server.switch)


@pytest.mark.slow
def test_a_switch_host_with_no_enabled_switch_stops_the_server_instead_of_looping(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from quanta.datadir import DataDir
    from quanta.db import make_engine
    from quanta.db.tables import switch_configuration
    from quanta.settings import load_settings

    s = make_server(tmp_path)
    engine = make_engine(DataDir(s.root).master_url(load_settings(s.root)))
    with engine.begin() as c:
        c.execute(sa.update(switch_configuration).values(Enabled=False))
    engine.dispose()
    alone = quanta("switch-host", str(s.root), check=False, timeout=60)
    assert alone.returncode == 2 and "no enabled Switch in SwitchConfiguration" in alone.stderr, alone.stderr
    r = subprocess.run([sys.executable, "-m", "quanta", "server", str(s.root)], capture_output=True, text=True,
                       timeout=90)
    assert r.returncode == 2, r.stderr
    assert "switch-host exited with a configuration error (code 2); not restarting" in r.stderr
    assert "restarting switch-host" not in r.stderr


@pytest.mark.slow
def test_a_second_server_on_the_same_data_dir_is_refused_and_the_first_runs_on(server: Server) -> None:
    import re

    before = {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)}
    r = subprocess.run([sys.executable, "-m", "quanta", "server", str(server.root)], capture_output=True, text=True,
                       timeout=90)
    assert r.returncode == 2, r.stderr
    holders = {int(x) for x in re.findall(r"already in use by pid (\d+) \(", r.stderr)}
    assert holders and holders <= before, r.stderr  # it names the first server's processes
    assert "cannot bind a port on its first start" in r.stderr and "all components stopped" in r.stderr
    assert server.proc.poll() is None
    assert {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)} == before
    assert _switch_listener(server) in before


@pytest.mark.slow
def test_kill_9_of_the_switch_host_leaves_no_orphan_and_agents_come_back(server: Server) -> None:
    from test_e2e_single_server import SUMMARY, ask

    server.enroll("a1")
    server.start_agent("a1")
    server.wait_online({"a1"})
    [host] = server.pids(f"quanta switch-host {server.root}")
    [old_switch] = _switches(server)
    assert old_switch.ppid() == host and _switch_listener(server) == old_switch.pid
    core = server.pids(f"quanta core {server.root}")

    os.kill(host, signal.SIGKILL)
    wait_until(lambda: gone(old_switch.pid), 5, "the old Switch gone with its Switch Host", server)
    wait_until(lambda: _switch_listener(server) not in (None, old_switch.pid), 30, "a new Switch listening", server)
    [new_host] = server.pids(f"quanta switch-host {server.root}")
    [new_switch] = _switches(server)
    assert new_host != host and new_switch.ppid() == new_host and _switch_listener(server) == new_switch.pid
    assert server.proc.poll() is None and server.pids(f"quanta core {server.root}") == core  # nothing else restarted

    rc, out = ask(server, SUMMARY, wait=30)
    assert rc == 0 and out["states"] == {"success": 1}, out
    log = server.log_text()
    assert f"switch-host (pid {host}) was killed by SIGKILL" in log
    assert "restarting switch-host in" in log
    assert "configuration error" not in log and "all components stopped" not in log


@pytest.mark.slow
def test_a_restarted_switch_host_waits_for_a_switch_port_still_held(server: Server) -> None:
    """The replacement Switch Host finds the Switch port held (here by this test, standing in for an
    orphan on a system without a parent-death signal): it names the holder, retries, and recovers."""
    from test_e2e_single_server import SUMMARY, ask

    server.enroll("a1")
    server.start_agent("a1")
    server.wait_online({"a1"})
    [host] = server.pids(f"quanta switch-host {server.root}")
    [old_switch] = _switches(server)
    os.kill(server.proc.pid, signal.SIGSTOP)  # hold the restart until the port is taken
    try:
        os.kill(host, signal.SIGKILL)
        wait_until(lambda: gone(old_switch.pid), 5, "the old Switch gone with its Switch Host", server)
        with socket.socket() as holder:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind(("0.0.0.0", server.switch))
            holder.listen()
            os.kill(server.proc.pid, signal.SIGCONT)
            wait_until(lambda: "switch:switch-1: its port is still held after the restart" in server.log_text(), 30,
                       "the new Switch Host retrying the held port", server)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    wait_until(lambda: _switch_listener(server) not in (None, old_switch.pid), 30, "a new Switch listening", server)
    rc, out = ask(server, SUMMARY, wait=30)
    assert rc == 0 and out["states"] == {"success": 1}, out
    log = server.log_text()
    assert f"port {server.switch} on 0.0.0.0" in log and f"already in use by pid {os.getpid()} (" in log
    assert "configuration error" not in log and server.proc.poll() is None


@pytest.mark.slow
def test_kill_9_of_the_server_takes_every_descendant_and_frees_the_ports(server: Server) -> None:
    top = psutil.Process(server.proc.pid)
    descendants = top.children(recursive=True)
    names = " ".join(" ".join(p.cmdline()) for p in descendants)
    assert len(descendants) >= 7 and "quanta switch " in names and "quanta switch-host " in names, names

    server.proc.kill()
    server.proc.wait(5)
    wait_until(lambda: all(gone(p.pid) for p in descendants), 5, "every descendant gone")
    for port in (server.https, server.switch, server.switch + 1, server.core):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))  # free

    server.log.rename(server.root / "server-killed.log")  # the second server's start waits on its own log lines
    second = Server(server.root, server.https, server.switch, server.core)
    second.start()
    try:
        assert second.proc is not None and second.proc.poll() is None
        assert _switch_listener(second) in {p.pid for p in _switches(second)}
    finally:
        second.stop()
