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
import select
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
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000
NLMSG_DONE = 3
SO_RCVBUFFORCE = 33

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
# one message as the kernel sends it: nlmsghdr, cn_msg, proc_event's what/cpu/timestamp, then
# the first four words of the event (exec and exit: pid, tgid, ...; fork: parent pid, parent
# tgid, child pid, child tgid), unpacked at once
_MESSAGE = struct.Struct("=IHHII" "IIIIHH" "IIQ" "IIII")

MAX_COMMAND_LINE = 32 * 1024
MAX_HASHED_BYTES = 512 * 1024 * 1024
HASH_CACHE = 4096


def listen_message(op: int, events: int | None = None) -> bytes:
    """The netlink message that subscribes to (or leaves) the process events: all of them, or
    (``events``, Linux 6.6 and later) only those of that mask, filtered in the kernel."""
    payload = struct.pack("=I", op) if events is None else struct.pack("=II", op, events)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn


def parse_events(data: bytes | memoryview) -> list[tuple[int, int, int, int]]:
    """The (what, pid, tgid, parent) exec, exit and fork events in one datagram: for a fork, the
    child's pid and tgid and the parent's tgid (0 for the others); malformed parts are skipped."""
    out = []
    off = 0
    end = len(data)
    size = _MESSAGE.size
    while off + _NLMSGHDR.size <= end:
        length = _NLMSGHDR.unpack_from(data, off)[0]
        if length < _NLMSGHDR.size or off + length > end:
            break
        if length >= size:
            _l, _t, _f, _s, _p, idx, val, _cs, _ca, _cl, _cf, what, _cpu, _ts, w0, w1, w2, w3 = \
                _MESSAGE.unpack_from(data, off)
            if idx == CN_IDX_PROC and val == CN_VAL_PROC:
                if what == PROC_EVENT_EXEC or what == PROC_EVENT_EXIT:
                    out.append((what, w0, w1, 0))
                elif what == PROC_EVENT_FORK:
                    out.append((what, w2, w3, w1))
        off += (length + 3) & ~3
    return out


def kernel_filters_events(release: str | None = None) -> bool:
    """Linux 6.6 and later filter process events per listener (an older kernel ignores a
    subscription that asks for it, so it is asked only of a kernel that has it)."""
    import re

    m = re.match(r"(\d+)\.(\d+)", release if release is not None else os.uname().release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (6, 6)


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


SO_ATTACH_FILTER = 26


def event_filter() -> bytes:
    """A classic BPF program for the connector socket: it keeps exec events, and the forks and
    exits of processes (not of threads: a child whose pid is its tgid, an exit whose pid is its
    tgid), and drops the rest in the kernel (every thread's start and end, id changes): on a
    busy machine most events are threads. The fields are in host order; BPF loads words
    big-endian, so the constants are the host bytes read so."""
    def be(v: int) -> int:
        return int.from_bytes(struct.pack("=I", v), "big")

    what = _NLMSGHDR.size + _CN_MSG.size  # proc_event.what
    data = what + 16  # event_data: exec/exit: process_pid, process_tgid; fork: parent pid, tgid, child pid, tgid
    program = [
        (0x20, 0, 0, what),  # 0: A = what
        (0x15, 10, 0, be(PROC_EVENT_EXEC)),  # 1: exec: keep
        (0x15, 0, 4, be(PROC_EVENT_EXIT)),  # 2: exit: compare its pid and tgid, else 7
        (0x20, 0, 0, data),  # 3: A = pid
        (0x07, 0, 0, 0),  # 4: X = A
        (0x20, 0, 0, data + 4),  # 5: A = tgid
        (0x05, 0, 0, 4),  # 6: to 11
        (0x15, 0, 5, be(PROC_EVENT_FORK)),  # 7: fork: compare the child's pid and tgid, else drop
        (0x20, 0, 0, data + 8),  # 8: A = child pid
        (0x07, 0, 0, 0),  # 9: X = A
        (0x20, 0, 0, data + 12),  # 10: A = child tgid
        (0x1D, 0, 1, 0),  # 11: pid == tgid (a process, not a thread): keep, else drop
        (0x06, 0, 0, 0xFFFFFFFF),  # 12: keep the whole message
        (0x06, 0, 0, 0),  # 13: drop
    ]
    return b"".join(struct.pack("=HBBI", *ins) for ins in program)


def attach_filter(sock: socket.socket, program: bytes) -> None:
    import ctypes

    code = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HP", len(program) // 8, ctypes.addressof(code))  # struct sock_fprog, native alignment
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # the kernel copies the program


def open_connector() -> socket.socket:
    """A netlink socket subscribed to the kernel's process events (root only)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 * 1024 * 1024)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        try:
            attach_filter(sock, event_filter())
        except (OSError, ImportError) as e:  # every event then reaches parse_events, which filters too
            log.info("process events: no socket filter (%s)", e)
        sock.bind((0, CN_IDX_PROC))
        # only fork, exec and exit: a loaded machine's other events never reach us
        sock.send(listen_message(PROC_CN_MCAST_LISTEN, PROC_EVENT_FORK | PROC_EVENT_EXEC | PROC_EVENT_EXIT
                                 if kernel_filters_events() else None))
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
                self._sock.setblocking(False)
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
        """Read the events as they come, draining what waits in one go: the starts' /proc entries
        at once (before the process is gone), then the whole batch to the consumer in one hand-over.
        An exit is handed over only for a process whose start this capture recorded."""
        assert self._sock is not None
        sock = self._sock
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        buf = bytearray(65536)
        view = memoryview(buf)
        live: dict[int, None] = {}  # processes started since capture started, not exited (oldest first)
        forks: dict[int, int] = {}  # child pid -> parent tgid, until the child's exec (oldest first)
        while not self.pace.stopped:
            if not poller.poll(500):
                continue
            batch: list[tuple[str, Any]] = []
            now = int(self.clock())
            while len(batch) < 1000:
                try:
                    n = sock.recv_into(buf)
                except (BlockingIOError, InterruptedError):
                    break  # all read
                except OSError as e:
                    if e.errno == errno.ENOBUFS:
                        self.lost_events += 1  # the kernel dropped events: go on with the next ones
                        continue
                    if self.pace.stopped:
                        return
                    raise
                for what, pid, tgid, parent in parse_events(view[:n]):
                    if pid != tgid:
                        continue  # a thread, not a process
                    if what == PROC_EVENT_FORK:
                        forks[pid] = parent
                        if len(forks) > 10_000:  # children that never exec: forget the oldest
                            for old in list(forks)[:1000]:
                                del forks[old]
                    elif what == PROC_EVENT_EXEC:
                        # recorded even when the process is gone before /proc is read (it lived well
                        # under a millisecond): the start is not missed, and the row keeps what the
                        # events carry (its pid, its parent from the fork, the time)
                        info = read_proc(pid)
                        forked = forks.pop(pid, None)
                        if info["ppid"] is None:
                            info["ppid"] = forked
                        batch.append(("start", (now, info, "netlink")))
                        live[pid] = None
                        if len(live) > 100_000:  # exits missed: forget the oldest
                            for old in list(live)[:10_000]:
                                del live[old]
                    elif pid in live:
                        del live[pid]
                        batch.append(("exit", (now, pid)))
            if batch:
                self._hand(("batch", batch))

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
            for item in payload if kind == "batch" else [(kind, payload)]:
                self._row(*item)

    def _row(self, kind: str, payload: Any) -> None:
        if kind == "start":
            now, info, method = payload
            exe = info["exe"]
            row = {
                "TS": now, "ProcessId": info["pid"], "ParentProcessId": info["ppid"],
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
