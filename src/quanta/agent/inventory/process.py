"""Process capture: every process start, its executable's SHA-256 and its exit.

On Linux as root the kernel's process-event connector (netlink, ``NETLINK_CONNECTOR`` /
``CN_IDX_PROC``) reports every ``exec`` and ``exit`` as it happens, so a process that lives
50 ms is recorded: the receiving thread reads the new process's ``/proc`` entries at once and
hands them to a second thread that hashes the executable (cached by device, inode, mtime and
size) and queues the row. Elsewhere, or when the connector cannot be opened, ``psutil`` polls the
process list every ``Module.Inventory.Process.PollIntervalSeconds`` (a process that starts and
ends between two polls is missed). ``CaptureMethod`` says which way each row came.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pwd
import queue
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .pace import Capture
from .settings import InventorySettings
from .store import Store

log = logging.getLogger("quanta.agent.inventory")

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000
NLMSG_DONE = 3
SO_RCVBUFFORCE = 33

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_PROC_EVENT = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_EXEC = struct.Struct("=II")  # process_pid, process_tgid
_EXIT = struct.Struct("=IIII")  # process_pid, process_tgid, exit_code, exit_signal

MAX_COMMAND_LINE = 32 * 1024
MAX_HASHED_BYTES = 512 * 1024 * 1024
HASH_CACHE = 4096


def listen_message(op: int) -> bytes:
    """The netlink message that subscribes to (or leaves) the process events."""
    payload = struct.pack("=I", op)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn


def parse_events(data: bytes) -> list[tuple[int, int, int]]:
    """The (what, pid, tgid) process events in one datagram; malformed parts are skipped."""
    out = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, _type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            break
        body = off + _NLMSGHDR.size
        if length >= _NLMSGHDR.size + _CN_MSG.size + _PROC_EVENT.size:
            idx, val, _s, _a, _len, _f = _CN_MSG.unpack_from(data, body)
            ev = body + _CN_MSG.size
            if idx == CN_IDX_PROC and val == CN_VAL_PROC:
                what, _cpu, _ts = _PROC_EVENT.unpack_from(data, ev)
                at = ev + _PROC_EVENT.size
                if what in (PROC_EVENT_EXEC, PROC_EVENT_EXIT) and at + _EXEC.size <= off + length:
                    pid, tgid = _EXEC.unpack_from(data, at)
                    out.append((what, pid, tgid))
        off += (length + 3) & ~3
    return out


def read_proc(pid: int) -> dict[str, Any]:
    """What /proc says about a process now, most telling first (the executable, its command
    line, then parent and user): a process that is already gone leaves the fields empty."""
    base = f"/proc/{pid}"
    info: dict[str, Any] = {"pid": pid, "exe": "", "key": None, "cmdline": "", "ppid": None, "uid": None}
    try:
        info["exe"] = os.readlink(f"{base}/exe")
        if info["exe"].endswith(" (deleted)"):
            info["exe"] = info["exe"][: -len(" (deleted)")]
        st = os.stat(f"{base}/exe")
        info["key"] = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        pass
    try:
        with open(f"{base}/cmdline", "rb") as f:
            raw = f.read(MAX_COMMAND_LINE)
        info["cmdline"] = raw.rstrip(b"\x00").replace(b"\x00", b" ").decode("utf-8", "replace")
    except OSError:
        pass
    try:
        with open(f"{base}/status", "rb") as f:
            status = f.read(4096)
        for line in status.split(b"\n"):
            if line.startswith(b"PPid:"):
                info["ppid"] = int(line.split()[1])
            elif line.startswith(b"Uid:"):
                info["uid"] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return info


class Hasher:
    """SHA-256 of executables, cached by (device, inode, mtime, size)."""

    def __init__(self) -> None:
        self._cache: OrderedDict[tuple[int, ...], str] = OrderedDict()
        self._lock = threading.Lock()

    def hash(self, key: tuple[int, ...] | None, pid: int | None, path: str) -> str:
        if key is None:
            return ""
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        if key[3] > MAX_HASHED_BYTES:
            return ""
        digest = ""
        for candidate in ([f"/proc/{pid}/exe"] if pid else []) + ([path] if path else []):
            try:
                with open(candidate, "rb") as f:
                    st = os.fstat(f.fileno())
                    if (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size) != key:
                        continue  # replaced since the process started
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                    break
            except OSError:
                continue
        if digest:
            with self._lock:
                self._cache[key] = digest
                if len(self._cache) > HASH_CACHE:
                    self._cache.popitem(last=False)
        return digest


_USERS: dict[int, str] = {}


def user_name(uid: int | None) -> str:
    if uid is None:
        return ""
    name = _USERS.get(uid)
    if name is None:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        if len(_USERS) < 4096:
            _USERS[uid] = name
    return name


def open_connector() -> socket.socket:
    """A netlink socket subscribed to the kernel's process events (root only)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 * 1024 * 1024)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        sock.bind((0, CN_IDX_PROC))
        sock.send(listen_message(PROC_CN_MCAST_LISTEN))
    except OSError:
        sock.close()
        raise
    return sock


class ProcessCapture(Capture):
    def __init__(self, store: Store, settings: InventorySettings, clock: Callable[[], float] = time.time) -> None:
        super().__init__(settings)
        self.store = store
        self.clock = clock
        self.method = ""
        self.lost_events = 0  # the kernel's buffer overflowed (ENOBUFS)
        self.dropped = 0  # our hand-over queue was full
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=20_000)
        self._hasher = Hasher()
        self._started: dict[int, int] = {}  # pid -> Ts of its first row this session
        self._sock: socket.socket | None = None

    def start(self) -> None:
        want = self.settings.process_method
        if want in ("auto", "netlink") and sys.platform.startswith("linux"):
            try:
                self._sock = open_connector()
                self._sock.settimeout(0.5)
                self.method = "netlink"
            except OSError as e:
                msg = "process events unavailable (%s): polling every %gs instead"
                log.log(logging.ERROR if want == "netlink" else logging.INFO, msg, e,
                        self.settings.source("Process").interval)
        if not self.method:
            self.method = "poll"
        self._spawn("quanta-inventory-process", self._consume)
        if self.method == "netlink":
            self._spawn("quanta-inventory-netlink", self._receive)
        else:
            self._spawn("quanta-inventory-process-poll", self._poll)

    def stop(self) -> None:
        self._hand(("stop", None))
        super().stop()
        if self._sock is not None:
            try:
                self._sock.send(listen_message(PROC_CN_MCAST_IGNORE))
            except OSError:
                pass
            self._sock.close()

    def _hand(self, item: tuple[str, Any]) -> None:
        try:
            self._events.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    # netlink ------------------------------------------------------------------------------
    def _receive(self) -> None:
        assert self._sock is not None
        while not self.pace.stopped:
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.lost_events += 1
                    continue
                if self.pace.stopped:
                    return
                raise
            for what, pid, tgid in parse_events(data):
                if pid != tgid:
                    continue  # a thread, not a process
                now = int(self.clock())
                if what == PROC_EVENT_EXEC:
                    # recorded even when the process is gone before /proc is read (it lived well
                    # under a millisecond): the start is not missed, its details are
                    self._hand(("start", (now, read_proc(pid), "netlink")))
                else:
                    self._hand(("exit", (now, pid)))

    # polling ------------------------------------------------------------------------------
    def _poll(self) -> None:
        import psutil

        known: dict[int, float] = {}
        first = True
        # psutil derives start times from the boot time, which /proc/stat gives in whole seconds
        since = time.time() - self.settings.source("Process").interval - 2
        while not self.pace.stopped:
            now = int(self.clock())
            seen: dict[int, float] = {}
            for p in psutil.process_iter(["pid", "create_time"]):
                ct = p.info.get("create_time") or 0.0
                seen[p.pid] = ct
                if known.get(p.pid) == ct:
                    continue
                if first and ct < since:
                    continue  # running before capture started: not a start we saw
                info = read_proc(p.pid)
                if info["exe"] or info["cmdline"]:
                    self._hand(("start", (now, info, "poll")))
            for pid, ct in known.items():
                if seen.get(pid) != ct:
                    self._hand(("exit", (now, pid)))
            known, first = seen, False
            self.pace.sleep(self.settings.source("Process").interval)

    # rows -----------------------------------------------------------------------------------
    def _consume(self) -> None:
        while True:
            kind, payload = self._events.get()
            if kind == "stop":
                return
            if kind == "start":
                now, info, method = payload
                exe = info["exe"]
                row = {
                    "Ts": now, "ProcessId": info["pid"], "ParentProcessId": info["ppid"],
                    "ExecutableName": os.path.basename(exe) if exe else "", "ExecutablePath": exe,
                    "CommandLine": info["cmdline"], "UserName": user_name(info["uid"]),
                    "ExecutableHash": self._hasher.hash(info["key"], info["pid"], exe),
                    "ExitTs": None, "CaptureMethod": method,
                }
                if self.store.put("Process_Live", row):
                    self._started.setdefault(info["pid"], now)
                    if len(self._started) > 100_000:  # exits missed: forget the oldest
                        for pid in list(self._started)[:10_000]:
                            del self._started[pid]
            elif kind == "exit":
                now, pid = payload
                began = self._started.pop(pid, None)
                if began is not None:
                    self.store.update("process_exit", (now, pid, began))
