"""Capture sources with real processes, sockets and packages: a 50 ms process through the kernel's
process events (root), the polling fallback, a TCP connection with its process, a .deb installed
and removed, device performance and process usage samples."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from quanta.agent.inventory import Inventory, parse_settings
from quanta.agent.inventory.process import PROC_EVENT_EXEC, PROC_EVENT_EXIT, parse_events

root_only = pytest.mark.skipif(os.geteuid() != 0 or not sys.platform.startswith("linux"),
                               reason="the kernel's process events need root on Linux")


def start(tmp_path: Path, **kw: str) -> Inventory:
    values = {"Module.Inventory.Enabled": "true", "Module.Inventory.FlushIntervalSeconds": "0.05"}
    for src in ("Process", "TCP", "Software", "DevicePerformance", "ProcessUsage"):
        values[f"Module.Inventory.{src}.Enabled"] = "false"
    values.update({f"Module.Inventory.{k}": v for k, v in kw.items()})
    inv = Inventory(tmp_path, parse_settings(values))
    inv.start()
    return inv


@pytest.fixture()
def inventories() -> Iterator[list[Inventory]]:
    made: list[Inventory] = []
    yield made
    for inv in made:
        inv.stop()


def rows(inv: Inventory, sql: str, *args: object) -> list[tuple]:
    inv.store.flush()
    c = sqlite3.connect(f"file:{inv.store.path}?mode=ro", uri=True)
    try:
        return c.execute(sql, args).fetchall()
    finally:
        c.close()


def wait_rows(inv: Inventory, cond: Callable[[list[tuple]], bool], sql: str, *args: object,
              timeout: float = 20) -> list[tuple]:
    deadline = time.monotonic() + timeout
    while True:
        got = rows(inv, sql, *args)
        if cond(got) or time.monotonic() > deadline:
            return got


@root_only
def test_a_process_that_lived_50_ms_is_recorded_with_its_hash_and_exit(tmp_path: Path, inventories) -> None:
    inv = start(tmp_path, **{"Process.Enabled": "true"})
    inventories.append(inv)
    assert inv.captures["Process"].method == "netlink"
    t = time.time()
    p = subprocess.run(["/bin/sh", "-c", "sleep 0.05"], check=True)
    del p
    got = wait_rows(inv, lambda r: any(x[4] is not None for x in r),
                    "SELECT ExecutableName, ExecutablePath, CommandLine, ExecutableHash, ExitTs, CaptureMethod, "
                    "UserName, Ts, ParentProcessId FROM Process_Live WHERE CommandLine = 'sleep 0.05'")
    assert got, "the 50 ms process was not recorded"
    name, path, cmd, digest, exit_ts, method, user, ts, ppid = got[0]
    assert (name, cmd, method, user) == ("sleep", "sleep 0.05", "netlink", "root")
    assert digest == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert exit_ts is not None and int(t) - 1 <= ts <= exit_ts <= time.time() + 1
    assert ppid and ppid != os.getpid()  # its parent is the shell


@root_only
def test_hostile_names_and_arguments_are_recorded_as_text(tmp_path: Path, inventories) -> None:
    inv = start(tmp_path, **{"Process.Enabled": "true"})
    inventories.append(inv)
    weird = tmp_path / "we ird\nname'; DROP TABLE x; --"
    shutil.copy("/bin/sh", weird)
    subprocess.run([str(weird).encode(), b"-c", b"sleep 0.1", b"\xff\xfe-arg", b"x" * 100_000], check=True)
    got = wait_rows(inv, bool, "SELECT ExecutableName, CommandLine, ExecutableHash FROM Process_Live "
                               "WHERE ExecutablePath = ?", str(weird))
    assert got and got[0][0] == weird.name and "\ufffd" in got[0][1]
    assert len(got[0][1]) <= 32 * 1024 and got[0][2] == hashlib.sha256(weird.read_bytes()).hexdigest()


def test_polling_records_processes_where_events_are_not_used(tmp_path: Path, inventories) -> None:
    inv = start(tmp_path, **{"Process.Enabled": "true", "Process.Method": "poll",
                             "Process.PollIntervalSeconds": "0.2"})
    inventories.append(inv)
    assert inv.captures["Process"].method == "poll"
    p = subprocess.Popen(["sleep", "1.5"])
    got = wait_rows(inv, bool, "SELECT CaptureMethod, ExecutableName FROM Process_Live WHERE ProcessId = ?", p.pid)
    p.wait()
    assert got and got[0] == ("poll", "sleep")
    got = wait_rows(inv, lambda r: r and r[0][0] is not None,
                    "SELECT ExitTs FROM Process_Live WHERE ProcessId = ?", p.pid)
    assert got[0][0] is not None


CLIENT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("connected", s.getsockname()[1], flush=True)
sys.stdin.readline()
"""


def test_a_connection_to_a_local_listener_is_recorded_with_its_process(tmp_path: Path, inventories) -> None:
    inv = start(tmp_path, **{"TCP.Enabled": "true", "TCP.PollIntervalSeconds": "0.2"})
    inventories.append(inv)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        line = client.stdout.readline().split()
        local_port = int(line[1])
        conn, _ = listener.accept()
        got = wait_rows(inv, lambda r: len(r) >= 2,
                        "SELECT Direction, ProcessId, ExecutableName, LocalPort, Port, IpAddress FROM TCP_Live "
                        "WHERE (Port = ? AND LocalPort = ?) OR (LocalPort = ? AND Port = ?) ORDER BY Direction",
                        port, local_port, port, local_port)
        assert ("Inbound", os.getpid()) == got[0][:2] and got[0][3:5] == (port, local_port)
        assert got[1][:2] == ("Outbound", client.pid) and got[1][2].startswith("python")
        assert got[1][3:] == (local_port, port, "127.0.0.1")
        client.stdin.write("\n")  # type: ignore[union-attr]
        client.stdin.flush()  # type: ignore[union-attr]
        client.wait(10)
        conn.close()
        got = wait_rows(inv, lambda r: r and r[0][0] is not None and r[0][0] >= r[0][1],
                        "SELECT LastSeenTs, Ts FROM TCP_Live WHERE LocalPort = ? AND Port = ?", local_port, port)
        assert got and got[0][0] >= got[0][1]
    finally:
        client.kill()
        listener.close()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("dpkg-deb") or not Path("/var/lib/dpkg/status").exists(),
                    reason="needs dpkg and root")
def test_a_package_installed_and_removed_shows_both_events(tmp_path: Path, inventories) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: quanta-inventory-test\nVersion: 1.2-3\nArchitecture: all\nMaintainer: Quanta Tests <t@example.org>\n"
        "Description: a package built by a test\n")
    deb = tmp_path / "q.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(deb)], check=True, capture_output=True)
    subprocess.run(["dpkg", "-r", "quanta-inventory-test"], capture_output=True)
    inv = start(tmp_path, **{"Software.Enabled": "true", "Software.PollIntervalSeconds": "0.2"})
    inventories.append(inv)
    cap = inv.captures["Software"]
    assert cap.polls.acquire(timeout=30)  # the first poll records the present set
    try:
        subprocess.run(["dpkg", "-i", str(deb)], check=True, capture_output=True)
        got = wait_rows(inv, bool, "SELECT Operation, Version, Publisher, PackageManager FROM Software_Live "
                                   "WHERE Product = 'quanta-inventory-test'")
        assert got == [("Install", "1.2-3", "Quanta Tests <t@example.org>", "dpkg")]
    finally:
        subprocess.run(["dpkg", "-r", "quanta-inventory-test"], check=True, capture_output=True)
    got = wait_rows(inv, lambda r: len(r) == 2, "SELECT Operation FROM Software_Live "
                                                "WHERE Product = 'quanta-inventory-test' ORDER BY rowid")
    assert got == [("Install",), ("Uninstall",)]
    assert rows(inv, "SELECT count(*) FROM Software_Live WHERE Operation = 'Present'")[0][0] > 10


def test_device_performance_and_process_usage_are_sampled(tmp_path: Path, inventories) -> None:
    inv = start(tmp_path, **{"DevicePerformance.Enabled": "true", "DevicePerformance.PollIntervalSeconds": "0.2",
                             "ProcessUsage.Enabled": "true", "ProcessUsage.PollIntervalSeconds": "0.3"})
    inventories.append(inv)
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<3: pass"])
    try:
        got = wait_rows(inv, lambda r: len(r) >= 2, "SELECT ProcessorUtilization, MemoryUtilization, "
                                                    "MemoryAvailableBytes FROM DevicePerformance_Live")
        assert len(got) >= 2 and all(0 <= r[0] <= 100 and 0 < r[1] <= 100 and r[2] > 0 for r in got)
        got = wait_rows(inv, bool, "SELECT ProcessorTimeSeconds, PeakMemoryBytes FROM ProcessUsage_Live "
                                   "WHERE ExecutableName LIKE 'python%' AND ProcessorTimeSeconds > 0.1")
        assert got and got[0][1] > 0
    finally:
        busy.kill()
        busy.wait()


def test_malformed_netlink_datagrams_are_skipped() -> None:
    import struct

    def msg(what: int, pid: int, tgid: int, idx: int = 1) -> bytes:
        ev = struct.pack("=IIQ", what, 0, 0) + struct.pack("=IIII", pid, tgid, 0, 0)
        cn = struct.pack("=IIIIHH", idx, 1, 0, 0, len(ev), 0) + ev
        return struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn

    good = msg(PROC_EVENT_EXEC, 10, 10) + msg(PROC_EVENT_EXIT, 11, 11)
    assert parse_events(good) == [(PROC_EVENT_EXEC, 10, 10, 0), (PROC_EVENT_EXIT, 11, 11, 0)]
    fork = struct.pack("=IIQ", 1, 0, 0) + struct.pack("=IIII", 7, 7, 12, 12)  # parent 7 forks child 12
    cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(fork), 0) + fork
    assert parse_events(struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn) == [(1, 12, 12, 7)]
    assert parse_events(msg(PROC_EVENT_EXEC, 1, 1, idx=7)) == []  # another connector
    assert parse_events(good[:20]) == [] and parse_events(b"") == [] and parse_events(b"\xff" * 64) == []
    bad_len = struct.pack("=IHHII", 4, 3, 0, 0, 0) + good[16:]
    assert parse_events(bad_len) == []


@pytest.mark.skipif(os.geteuid() != 0 or not sys.platform.startswith("linux"), reason="process events need root on Linux")
def test_the_connector_socket_hears_execs_and_process_exits_not_threads_or_forks() -> None:
    """The socket as open_connector makes it (the kernel's event mask where it has one, and the
    BPF filter): a child's fork, exec and exit arrive; a thread's start and end do not."""
    import select
    import threading

    from quanta.agent.inventory.process import open_connector

    sock = open_connector()
    sock.setblocking(False)
    try:
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()  # a thread of this process ends: its exit (pid != tgid) must not arrive
        child = subprocess.Popen(["/bin/true"])
        child.wait()
        got: list[tuple[int, int, int, int]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (PROC_EVENT_EXIT, child.pid, child.pid, 0) not in got:
            select.select([sock], [], [], 0.5)
            while True:
                try:
                    got += parse_events(sock.recv(65536))
                except BlockingIOError:
                    break
        assert (PROC_EVENT_EXEC, child.pid, child.pid, 0) in got and (PROC_EVENT_EXIT, child.pid, child.pid, 0) in got
        assert (1, child.pid, child.pid, os.getpid()) in got  # its fork, with this process as the parent
        assert all(pid == tgid for _, pid, tgid, _ in got), "a thread's start or end passed the filter"
        assert {what for what, _, _, _ in got} <= {1, PROC_EVENT_EXEC, PROC_EVENT_EXIT}
    finally:
        sock.close()


def test_kernel_event_filtering_is_asked_only_of_kernels_that_have_it() -> None:
    from quanta.agent.inventory.process import kernel_filters_events

    assert kernel_filters_events("6.6.0") and kernel_filters_events("6.18.44-fc-v669")
    assert not kernel_filters_events("6.5.13") and not kernel_filters_events("5.15.0-91-generic")
    assert not kernel_filters_events("weird") and not kernel_filters_events("")


def test_logons_and_logoffs_from_wtmp_including_those_while_stopped(tmp_path: Path) -> None:
    from quanta.agent.inventory import Store
    from quanta.agent.inventory.logon import DEAD_PROCESS, RUN_LVL, USER_PROCESS, LogonCapture, pack_record

    wtmp = tmp_path / "wtmp"
    t = 1_767_225_600
    wtmp.write_bytes(pack_record(USER_PROCESS, 100, "pts/0", "alice", "192.0.2.1", t)
                     + pack_record(USER_PROCESS, 101, "tty1", "bob'; DROP TABLE x; --", "", t + 5))
    settings = parse_settings({"Module.Inventory.FlushIntervalSeconds": "0.05"})
    store = Store(tmp_path / "inventory.db", settings)
    store.start()
    try:
        cap = LogonCapture(store, settings, tmp_path, wtmp=wtmp)
        state = cap.poll_once({})
        with open(wtmp, "ab") as f:
            f.write(pack_record(DEAD_PROCESS, 100, "pts/0", "", "", t + 60))
            f.write(pack_record(USER_PROCESS, 102, "pts/1", "carol", "h", t + 70)[:100])  # being written
        state = cap.poll_once(state)
        # the agent stops; a session ends and the half-written record is completed meanwhile
        with open(wtmp, "ab") as f:
            f.write(pack_record(USER_PROCESS, 102, "pts/1", "carol", "h", t + 70)[100:])
            f.write(pack_record(DEAD_PROCESS, 101, "tty1", "", "", t + 90))
            f.write(pack_record(RUN_LVL, 0, "~", "shutdown", "", t + 95))
        cap2 = LogonCapture(store, settings, tmp_path, wtmp=wtmp)
        cap2.poll_once(cap2._load())
        cap2.poll_once(cap2._load())  # nothing new: nothing twice
        store.flush()
        c = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True)
        got = c.execute("SELECT Ts, UserName, Operation, Terminal, RemoteHost FROM Logon_Live ORDER BY Ts").fetchall()
        boots = c.execute("SELECT Operation, Ts FROM Boot_Live ORDER BY rowid").fetchall()
        c.close()
    finally:
        store.stop()
    assert got == [(t, "alice", "Logon", "pts/0", "192.0.2.1"), (t + 5, "bob'; DROP TABLE x; --", "Logon", "tty1", ""),
                   (t + 60, "alice", "Logoff", "pts/0", ""), (t + 70, "carol", "Logon", "pts/1", "h"),
                   (t + 90, "bob'; DROP TABLE x; --", "Logoff", "tty1", "")]
    assert [b[0] for b in boots] == ["Boot", "Shutdown"] and boots[1][1] == t + 95
    assert stat_mode(tmp_path / "inventory-wtmp.json") == 0o600


def stat_mode(p: Path) -> int:
    import stat as st

    return st.S_IMODE(os.stat(p).st_mode)


def test_the_tcp_table_is_read_from_the_kernel_like_psutil_reads_it(tmp_path: Path) -> None:
    """The socket diagnostics and /proc/net/tcp{,6} as the TCP capture reads them, against psutil
    on the same sockets, and a hostile table (short, garbled lines) read as far as it makes sense."""
    import psutil

    from quanta.agent.inventory.tcp import decode_address, decode_diag, read_proc_net, read_sock_diag, socket_owners

    assert decode_address("0100007F:1F90") == ("127.0.0.1", 8080)
    assert decode_address("0000000000000000FFFF00000100007F:0016") == ("::ffff:127.0.0.1", 22)
    assert decode_address("00000000000000000000000001000000:01BB") == ("::1", 443)
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server_side, _ = listener.accept()
    try:
        listening, table = read_proc_net()
        key = (*client.getsockname(), *client.getpeername())
        assert key in table and listener.getsockname()[1] in listening
        owners = socket_owners({table[key]}, [os.getpid()])
        assert owners == {table[key]: os.getpid()}
        ours = {(c.laddr.ip, c.laddr.port, c.raddr.ip, c.raddr.port) for c in psutil.net_connections("tcp")
                if c.raddr and c.pid == os.getpid()}
        assert key in ours and ours <= set(table)  # every connection of this process psutil sees
        # the kernel's socket diagnostics give the same connection, inode and listening port
        diag_listening, raw = read_sock_diag()
        diag = {decode_diag(r): inode for r, inode in raw.items()}
        assert diag[key] == table[key] and listener.getsockname()[1] in diag_listening
        assert ours <= set(diag)
    finally:
        for s in (client, server_side, listener):
            s.close()
    bad = tmp_path / "tcp"
    bad.write_text("  sl  local_address rem_address   st\n"
                   "   0: 0100007F:1F90 00000000:0000 0A 0:0 0:0 0 0 0 1 1\n"
                   "   1: ZZZZ:1 0100007F:0016 01 0:0 0:0 0 0 0 7 1\n"  # not hex: skipped
                   "   2: 0100007F:9C40 0100007F:0016 01\n"  # too short: skipped
                   "   3: 0100007F:9C41 0100007F:0016 01 0:0 0:0 0 0 0 99 1\n"
                   "\x00\xff garbage\n")
    listening, table = read_proc_net([bad, tmp_path / "missing"])
    assert listening == {8080} and table == {("127.0.0.1", 40001, "127.0.0.1", 22): 99}
