"""TCP capture: the connections in the kernel's socket table, polled.

A connection is recorded when first seen (``Ts``) with its process; ``LastSeenTs`` is set when it
is no longer seen (in two polls in a row). It is ``Inbound`` when its local port is one this
device listens on, ``Outbound`` otherwise. A connection opened and closed between two polls is
missed.

On Linux the table comes from the kernel's socket diagnostics (``NETLINK_SOCK_DIAG``, the
``ss`` tool's interface: binary, and only the open and listening sockets, so the kernel skips the
TIME_WAIT ones a busy machine has thousands of), or from ``/proc/net/tcp`` and ``tcp6`` when that
is unavailable; an address is decoded only when its connection is new. A connection's process is
looked up only when the connection is new, by its socket's inode in ``/proc/<pid>/fd``: first in
the processes that owned the last connections (a busy client or server opens many), then in the
others, and only until every new socket is found. (``psutil.net_connections``, used elsewhere,
reads every process's descriptors at every poll.)
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

from .pace import Capture
from .settings import InventorySettings
from .store import Store

log = logging.getLogger("quanta.agent.inventory")

OPEN_STATES = ("ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT", "CLOSING", "LAST_ACK")
# /proc/net/tcp's state codes (include/net/tcp_states.h)
_OPEN_CODES = frozenset({"01", "02", "03", "04", "05", "08", "09", "0B"})
_LISTEN_CODE = "0A"
PROC_NET = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
RECENT_OWNERS = 64  # processes whose descriptors are looked at first

Key = tuple[str, int, str, int]  # local address, local port, remote address, remote port


def decode_address(text: str) -> tuple[str, int]:
    """``0100007F:1F90`` (or its 32-digit IPv6 form) as ("127.0.0.1", 8080): the kernel prints each
    32-bit word of the address in host order (little-endian here)."""
    addr, _, port = text.partition(":")
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)
    if len(raw) != 16:
        raise ValueError(f"not an address: {text!r}")
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))), int(port, 16)


NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_DIAG_REQ = struct.Struct("=BBBBI" "HH16s16sI8s")  # inet_diag_req_v2
_DIAG_MSG = struct.Struct("=BBBB" "2s2s16s16sI8s" "IIIII")  # inet_diag_msg (ports and addresses in network order)
TCP_LISTEN = 10
_DIAG_STATES = sum(1 << s for s in (1, 2, 3, 4, 5, 8, 9, 11, TCP_LISTEN))  # open ones and LISTEN


def read_sock_diag() -> tuple[set[int], dict[tuple[int, bytes, bytes, bytes, bytes], int]]:
    """The listening ports, and the open connections (raw keys: family, local address and port,
    remote address and port, as the kernel gives them) with their socket inodes, by
    ``NETLINK_SOCK_DIAG``; OSError when the kernel does not answer it."""
    listening: set[int] = set()
    conns: dict[tuple[int, bytes, bytes, bytes, bytes], int] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(5)
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            req = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, _DIAG_STATES, 0, 0, b"", b"", 0, b"")
            sock.send(_NLMSG.pack(_NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY, 0x301, seq, 0) + req)  # REQUEST|DUMP
            done = False
            while not done:
                data = sock.recv(1 << 17)
                off, end = 0, len(data)
                if not data:
                    raise OSError("socket diagnostics: empty answer")
                while off + _NLMSG.size <= end:
                    length, kind = _NLMSG.unpack_from(data, off)[:2]
                    if length < _NLMSG.size or off + length > end:
                        raise OSError("socket diagnostics: malformed answer")
                    if kind == 3:  # NLMSG_DONE
                        done = True
                        break
                    if kind == 2:  # NLMSG_ERROR
                        raise OSError("socket diagnostics refused the request")
                    if kind == SOCK_DIAG_BY_FAMILY and length >= _NLMSG.size + _DIAG_MSG.size:
                        fam, state, _t, _r, sport, dport, src, dst, _if, _ck, _ex, _rq, _wq, _uid, inode = \
                            _DIAG_MSG.unpack_from(data, off + _NLMSG.size)
                        if state == TCP_LISTEN:
                            listening.add(int.from_bytes(sport, "big"))
                        else:
                            conns[(fam, src, sport, dst, dport)] = inode
                    off += (length + 3) & ~3
    return listening, conns


def decode_diag(raw: tuple[int, bytes, bytes, bytes, bytes]) -> Key:
    fam, src, sport, dst, dport = raw
    n = 4 if fam == socket.AF_INET else 16
    return (socket.inet_ntop(fam, src[:n]), int.from_bytes(sport, "big"),
            socket.inet_ntop(fam, dst[:n]), int.from_bytes(dport, "big"))


def read_proc_net(paths: Iterable[Path] = PROC_NET) -> tuple[set[int], dict[Key, int]]:
    """The listening ports, and the open connections with their socket inodes (0: none)."""
    listening: set[int] = set()
    conns: dict[Key, int] = {}
    for path in paths:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                next(f, None)
                lines = f.readlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10:
                continue
            state = parts[3]
            try:
                if state == _LISTEN_CODE:
                    listening.add(int(parts[1].rpartition(":")[2], 16))
                elif state in _OPEN_CODES:
                    lip, lport = decode_address(parts[1])
                    rip, rport = decode_address(parts[2])
                    conns[(lip, lport, rip, rport)] = int(parts[9])
            except ValueError:
                continue
    return listening, conns


def socket_owners(inodes: set[int], first: Iterable[int] = ()) -> dict[int, int]:
    """The process (pid) holding each socket inode, from ``/proc/<pid>/fd``: the pids in ``first``
    are looked at first, the others only while some inode is still unfound."""
    want = {f"socket:[{i}]": i for i in inodes if i}
    found: dict[int, int] = {}

    def scan(pid: int) -> None:
        base = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(base)
        except OSError:
            return
        for fd in fds:
            try:
                link = os.readlink(f"{base}/{fd}")
            except OSError:
                continue
            inode = want.pop(link, None)
            if inode is not None:
                found[inode] = pid
                if not want:
                    return

    looked: set[int] = set()
    for pid in first:
        if want:
            looked.add(pid)
            scan(pid)
    if want:
        try:
            names = os.listdir("/proc")
        except OSError:
            names = []
        for name in names:
            if not want:
                break
            if name.isdigit() and int(name) not in looked:
                scan(int(name))
    return found


def _psutil_snapshot() -> tuple[set[int], dict[Key, int | None]]:
    """Elsewhere: psutil's table, with the process ids (not inodes)."""
    import psutil

    conns = psutil.net_connections(kind="tcp")
    listening = {c.laddr.port for c in conns if c.status == "LISTEN" and c.laddr}
    return listening, {(c.laddr.ip, c.laddr.port, c.raddr.ip, c.raddr.port): c.pid for c in conns
                       if c.raddr and c.status in OPEN_STATES}


class TcpCapture(Capture):
    def __init__(self, store: Store, settings: InventorySettings, clock: Callable[[], float] = time.time) -> None:
        super().__init__(settings)
        self.store = store
        self.clock = clock
        self.polls = threading.Semaphore(0)  # released after every poll (tests wait on it)
        self.procfs = PROC_NET[0].exists()
        self.diag = self.procfs  # Linux: socket diagnostics, until the kernel refuses them

    def start(self) -> None:
        self._spawn("quanta-inventory-tcp", self._run)

    def _run(self) -> None:
        open_: dict[Key, int] = {}  # key -> last seen
        exe_cache: dict[int, tuple[float, str]] = {}
        owners: OrderedDict[int, None] = OrderedDict()  # the processes of the last new connections
        pending: dict[Key, tuple[dict[str, object], int]] = {}  # no process yet: row, polls
        decoded: dict[object, Key] = {}  # socket diagnostics' raw keys of the connections seen
        missed: dict[Key, int] = {}  # open connections missing from the last table
        while not self.pace.stopped:
            try:
                now = int(self.clock())
                if self.diag:
                    try:
                        listening, raw = read_sock_diag()
                    except OSError as e:
                        log.info("TCP capture: socket diagnostics unavailable (%s); reading /proc/net/tcp", e)
                        self.diag = False
                        continue
                    decoded = {r: decoded.get(r) or decode_diag(r) for r in raw}
                    table = {decoded[r]: inode for r, inode in raw.items()}
                if self.procfs and not self.diag:
                    listening, table = read_proc_net()
                if self.procfs:
                    new = {table[k] for k in table if k not in open_}
                    pids: dict[int, int | None] = dict(socket_owners(new, reversed(owners))) if new else {}
                    conns = {k: pids.get(inode) for k, inode in table.items() if k not in open_}
                    for pid in pids.values():
                        if pid is not None:
                            owners[pid] = None
                            owners.move_to_end(pid)
                    while len(owners) > RECENT_OWNERS:
                        owners.popitem(last=False)
                else:
                    listening, all_conns = _psutil_snapshot()
                    table = all_conns  # type: ignore[assignment]
                    conns = {k: pid for k, pid in all_conns.items() if k not in open_}
                for key in table:
                    if key in open_:
                        open_[key] = now
                for key, pid in conns.items():
                    row = {"TS": now, "LastSeenTs": now, "ProcessId": pid, "LocalAddress": key[0],
                           "LocalPort": key[1], "IpAddress": key[2], "Port": key[3],
                           "Direction": "Inbound" if key[1] in listening else "Outbound",
                           "CaptureMethod": "poll"}
                    earlier = pending.pop(key, None)
                    if earlier is not None:
                        row["TS"] = earlier[0]["TS"]
                    if not pid and (earlier[1] if earlier else 0) < 2:
                        # its process not found yet (the socket's owner was being scanned as it
                        # opened): look again at the next polls before recording it without one
                        pending[key] = (row, (earlier[1] if earlier else 0) + 1)
                        continue
                    open_[key] = now
                    path = _exe(pid, exe_cache) if pid else ""
                    self.store.put("TCP_Live", {**row, "ExecutableName": os.path.basename(path), "ExecutablePath": path})
                for key in [k for k in pending if k not in table]:  # closed before its process was found
                    row, _ = pending.pop(key)
                    self.store.put("TCP_Live", {**row, "ExecutableName": "", "ExecutablePath": ""})
                for key in [k for k in open_ if k not in table]:
                    # gone only when missing from two tables in a row: a dump of a socket table that
                    # changes while it is read may skip an entry (it would come back as a new row)
                    if missed.pop(key, 0) < 1:
                        missed[key] = 1
                        continue
                    last = open_.pop(key)
                    self.store.update("tcp_seen", (last, key[1], key[3], key[0], key[2]))
                for key in [k for k in missed if k in table]:
                    del missed[key]
                if len(exe_cache) > 4096:
                    exe_cache.clear()
            except Exception:  # noqa: BLE001 - capture must never take the agent down
                log.exception("TCP capture poll failed")
            self.polls.release()
            self.pace.sleep(self.settings.source("TCP").interval)


def _exe(pid: int, cache: dict[int, tuple[float, str]]) -> str:
    import psutil

    try:
        p = psutil.Process(pid)
        ct = p.create_time()
        hit = cache.get(pid)
        if hit is not None and hit[0] == ct:
            return hit[1]
        path = p.exe()
    except (psutil.Error, OSError):
        return ""
    cache[pid] = (ct, path)
    return path
