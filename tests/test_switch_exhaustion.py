"""The Switch under hostile load, over real sockets to a real server's Switch process: a flood of
half-open connections at its open-file limit, frames with reserved bits, upgrades to other
WebSocket versions, and floods of bad pokes. Each is refused with a bounded number of log lines
(no traceback), and the well-behaved devices are still welcomed and answer afterwards."""

from __future__ import annotations

import base64
import json
import os
import re
import resource
import socket
import ssl
import struct
import time
from collections.abc import Iterator

import asyncio
import contextlib
import ctypes
import logging

import psutil
import pytest

from conftest import Server, half_open, make_server, quanta, wait_until
from quanta import protocol as p
from quanta.datadir import DataDir
from quanta.internal import poke_key
from quanta.runtime import HeapReleaser, LogEvery, SheddingListener, bind_socket, heap_free_bytes
from quanta.settings import poke_port
from quanta.switch.service import REFUSAL_LOG_INTERVAL
from test_switch_bad_input import SUMMARY, _ctx


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the frame, upgrade and poke tests (none of them changes it)."""
    s = make_server(tmp_path_factory.mktemp("hostile"))
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _switch_pid(server: Server) -> int:
    pids = server.pids(f"quanta switch {server.root} ")
    assert len(pids) == 1, pids
    return pids[0]


def _enrolled(server: Server, name: str) -> None:
    if not (server.root.parent / "agents" / name).exists():
        server.enroll(name)


def _online_agent(server: Server, name: str) -> None:
    _enrolled(server, name)
    if name not in server.agents:
        server.start_agent(name)
    server.wait_online({name})


def _lines(server: Server, needle: str) -> list[str]:
    return [line for line in server.log_text().splitlines() if needle in line]


def _ask_good(server: Server, *devices: str) -> None:
    r = quanta("ask", str(server.root), SUMMARY, "--json", "--wait", "30",
               *(x for d in devices for x in ("--device", d)))
    assert json.loads(r.stdout)["states"] == {"success": len(devices)}, r.stdout


# ------------------------------------------------------------------ raw WebSocket over mutual TLS
def _tls(server: Server, device: str) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", server.switch), 10)
    tls = _ctx(server, device).wrap_socket(raw, server_hostname="localhost")
    tls.settimeout(15)
    return tls


def _upgrade(server: Server, device: str, version_headers: list[str]) -> tuple[ssl.SSLSocket, bytes]:
    """Send a hand-built upgrade request; the socket and the server's response head."""
    s = _tls(server, device)
    key = base64.b64encode(os.urandom(16)).decode()
    head = ["GET /agent HTTP/1.1", "Host: localhost", "Upgrade: websocket", "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}", *version_headers]
    s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        assert chunk, f"connection closed before a response: {got!r}"
        got += chunk
    return s, got


def _frame(opcode: int, payload: bytes, *, rsv: int = 0) -> bytes:
    """One masked client frame (RFC 6455 §5.2); ``rsv`` is the three reserved bits (0-7)."""
    mask = os.urandom(4)
    n = len(payload)
    length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
    return (bytes([0x80 | (rsv << 4) | opcode]) + length + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def _read_exact(s: ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def _server_frames(s: ssl.SSLSocket) -> Iterator[tuple[int, bytes]]:
    """The server's (unmasked) frames until it closes: (opcode, payload)."""
    while True:
        try:
            b0, b1 = _read_exact(s, 2)
        except EOFError:
            return
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack(">H", _read_exact(s, 2))
        elif n == 127:
            (n,) = struct.unpack(">Q", _read_exact(s, 8))
        yield b0 & 0x0F, _read_exact(s, n)


def _close_of(s: ssl.SSLSocket) -> tuple[int, str]:
    for opcode, payload in _server_frames(s):
        if opcode == 0x8:
            return struct.unpack(">H", payload[:2])[0], payload[2:].decode()
    raise AssertionError("no close frame before the connection ended")


HELLO_OF = {name: p.encode(p.Hello(device_id=name, fqdn=name, os="Linux", agent_version="raw"))
            for name in ("raw", "good")}


def _closed_by_server(s: ssl.SSLSocket) -> bool:
    """Whether the server closes the connection (after whatever it still sends) within the timeout."""
    try:
        while s.recv(4096):
            pass
        return True
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


def _reserved_bit_closes(server: Server) -> int:
    """Closes for reserved bits the Switch's log accounts for: detail lines count one each, summary
    lines ("N more in the last 10s (reserved bits set in a frame: N)") their count."""
    import re

    n = 0
    for line in _lines(server, "reserved bits set in a frame"):
        m = re.search(r"reserved bits set in a frame: (\d+)\)", line)
        n += int(m.group(1)) if m and "more in the last" in line else 1
    return n


@pytest.mark.slow
def test_frames_with_reserved_bits_are_refused(shared: Server) -> None:
    _enrolled(shared, "raw")
    _online_agent(shared, "good")
    before = _reserved_bit_closes(shared)
    # the baseline: a hand-built hello on a hand-built upgrade is welcomed
    s, head = _upgrade(shared, "raw", ["Sec-WebSocket-Version: 13"])
    assert head.startswith(b"HTTP/1.1 101"), head
    s.sendall(_frame(0x2, HELLO_OF["raw"]))
    opcode, payload = next(_server_frames(s))
    assert opcode == 0x2 and isinstance(p.decode_from_switch_for_agent(payload), p.Welcome)
    s.close()

    for label, frame in {
        "rsv1 on a hello": _frame(0x2, HELLO_OF["raw"], rsv=0b100),
        "rsv2 on a hello": _frame(0x2, HELLO_OF["raw"], rsv=0b010),
        "rsv3 on a hello": _frame(0x2, HELLO_OF["raw"], rsv=0b001),
        "all on a ping": _frame(0x9, b"x", rsv=0b111),
    }.items():
        s, head = _upgrade(shared, "raw", ["Sec-WebSocket-Version: 13"])
        assert head.startswith(b"HTTP/1.1 101"), (label, head)
        s.sendall(frame)
        code, reason = _close_of(s)
        assert code == 1002 and "reserved bits" in reason, (label, code, reason)
        s.close()
    # after the hello, too: the connection is closed and its device reported offline
    s, _ = _upgrade(shared, "raw", ["Sec-WebSocket-Version: 13"])
    s.sendall(_frame(0x2, HELLO_OF["raw"]))
    assert next(_server_frames(s))[0] == 0x2  # welcomed
    s.sendall(_frame(0x2, p.encode(p.Response(instruction_id=1, status="success")), rsv=0b100))
    assert _close_of(s)[0] == 1002
    s.close()
    wait_until(lambda: "raw" not in shared.online(), 20, "the closed device offline", shared)
    # every close counted: the first of an interval logged with its detail, the others in the
    # interval's one summary line (the Switch rate-limits these logs; see Switch.note_close)
    wait_until(lambda: _reserved_bit_closes(shared) - before == 5, 3 * 10 + 5, "5 reserved-bit closes logged", shared)
    assert "good" in shared.online()
    _ask_good(shared, "good")


@pytest.mark.slow
@pytest.mark.parametrize("headers", [
    ["Sec-WebSocket-Version: 8"],
    ["Sec-WebSocket-Version: 7"],
    ["Sec-WebSocket-Version: 14"],
    ["Sec-WebSocket-Version: 13x"],
    [],  # none at all
    ["Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"],  # two: which one would it speak?
], ids=["v8", "v7", "v14", "garbage", "missing", "two"])
def test_upgrades_to_other_websocket_versions_are_refused(shared: Server, headers: list[str]) -> None:
    _enrolled(shared, "raw")
    before = len(_lines(shared, "upgrade refused: Sec-WebSocket-Version"))
    s, head = _upgrade(shared, "raw", headers)
    status, *fields = head.split(b"\r\n\r\n")[0].decode().split("\r\n")
    assert status.startswith("HTTP/1.1 426"), head
    assert "Sec-WebSocket-Version: 13" in fields, head  # RFC 6455 §4.4: say which version it speaks
    assert _closed_by_server(s)
    s.close()
    wait_until(lambda: len(_lines(shared, "upgrade refused: Sec-WebSocket-Version")) == before + 1, 10,
               "the refusal logged", shared)


# ------------------------------------------------------------------ pokes
def _send_poke(port: int, data: bytes | None) -> None:
    """One connection to the poke port; ``data`` None: connect and close at once."""
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        if data is not None:
            s.sendall(data)


@pytest.mark.slow
def test_a_flood_of_bad_pokes_is_logged_once_per_interval(shared: Server) -> None:
    secret = DataDir(shared.root).internal_secret()
    port = poke_port(shared.switch)
    before = len(_lines(shared, "poke refused"))
    kinds = {
        "wrong size": b"\x00" * 10,
        "bad MAC": p.make_poke(b"not the secret" * 3),
        "stale": p.make_poke(poke_key(secret), now=time.time() - 3600),
        "closed without a poke": None,
    }
    per_kind = 150
    start = time.monotonic()
    for _ in range(per_kind):
        for data in kinds.values():
            _send_poke(port, data)
    sent = per_kind * len(kinds)
    # the first is logged at once, the rest are counted into one line per interval
    summaries = re.compile(r"poke refused: (\d+) more in the last")

    def counted() -> int:
        return sum(int(m.group(1)) for line in _lines(shared, "poke refused")[before:]
                   if (m := summaries.search(line)))

    wait_until(lambda: counted() >= sent - 1, 3 * REFUSAL_LOG_INTERVAL, "the refusals' count in the log", shared)
    elapsed = time.monotonic() - start
    lines = _lines(shared, "poke refused")[before:]
    assert counted() == sent - 1, lines
    assert len(lines) <= 2 + elapsed / REFUSAL_LOG_INTERVAL, lines
    text = " ".join(lines)
    for kind in ("wrong size (10 bytes)", "bad MAC", "stale (-3600s", "closed without a poke"):
        assert kind in text, (kind, lines)
    assert "Traceback" not in shared.log_text()
    # the real Core's pokes still work: a question reaches the device
    _online_agent(shared, "good")
    _ask_good(shared, "good")


# ------------------------------------------------------------------ the open-file limit
LIMIT = 3000  # the Switch's RLIMIT_NOFILE here; the flood is larger


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@pytest.mark.slow
def test_at_the_open_file_limit_the_switch_refuses_cleanly_and_recovers(server: Server) -> None:
    server.enroll("dev1")
    server.enroll("late")
    server.start_agent("dev1")
    server.wait_online({"dev1"})
    pid = _switch_pid(server)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (LIMIT, hard))
    steady = _rss(pid)
    start = time.monotonic()
    flood = half_open(server.switch, LIMIT + 1000)
    try:
        wait_until(lambda: _lines(server, "agent connections refused: out of file descriptors"), 20,
                   "the first refusal line", server)
        wait_until(lambda: psutil.Process(pid).num_fds() >= LIMIT - 5, 20, "the Switch at its descriptor limit", server)
        # the connections it holds cost memory (their TLS handshakes wait): enough to see it return
        wait_until(lambda: _rss(pid) > steady + (64 << 20), 10, "the flood's memory", server)
        during = _rss(pid)
        # a device that connects now is refused at once (reset), not left hanging
        t0 = time.monotonic()
        with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
            _tls(server, "late").sendall(b"GET /agent HTTP/1.1\r\n\r\n")
        assert time.monotonic() - t0 < 5
    finally:
        for s in flood:
            s.close()
    # the memory the flood took goes back to the system
    wait_until(lambda: _rss(pid) < steady + (during - steady) / 4, 4 * REFUSAL_LOG_INTERVAL,
               f"RSS back near {steady >> 20} MiB (was {during >> 20} MiB during the flood)", server)
    assert psutil.Process(pid).num_fds() < 100
    refusals = re.compile(r"agent connections refused: (\d+) more in the last")
    wait_until(lambda: any(refusals.search(line) for line in _lines(server, "agent connections refused")),
               2 * REFUSAL_LOG_INTERVAL, "the refusals' count in the log", server)
    elapsed = time.monotonic() - start
    lines = _lines(server, "agent connections refused")
    assert len(lines) <= 2 + elapsed / REFUSAL_LOG_INTERVAL, lines
    refused = sum(int(m.group(1)) for line in lines if (m := refusals.search(line))) + 1
    assert refused >= 900, lines  # the connections beyond the limit (a few more: the late device)
    log = server.log_text()
    assert "Traceback" not in log and "remove_reader" not in log
    assert "returned" in log and "MiB of freed memory to the system" in log
    # a real mutual-TLS agent connects, is welcomed and answers; the one connected before still does
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    server.start_agent("late")
    server.wait_online({"dev1", "late"})
    _ask_good(server, "dev1", "late")


# ------------------------------------------------------------------ the helpers, in this process
def test_log_every_logs_the_first_at_once_then_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("quanta.test.logevery")

    async def run() -> None:
        every = LogEvery(log, 0.2, "thing refused")

        async def lines(n: int) -> list[str]:
            for _ in range(300):
                got = [r.getMessage() for r in caplog.records if r.name == log.name]
                if len(got) >= n:
                    return got
                await asyncio.sleep(0.01)
            raise AssertionError(f"fewer than {n} lines: {got}")

        every.note("bad MAC", "from 10.0.0.1:5")
        assert await lines(1) == ["thing refused: bad MAC (from 10.0.0.1:5)"]
        for i in range(999):
            every.note("bad MAC" if i % 3 else "stale", "from 10.0.0.1:5")
        got = await lines(2)
        assert got[1] == "thing refused: 999 more in the last 0.2s (bad MAC: 666, stale: 333)"
        while every._timer is not None:  # a quiet interval ends the episode
            await asyncio.sleep(0.01)
        assert len(await lines(2)) == 2  # nothing to report, no line
        every.note("wrong size (3 bytes)")  # a new episode: logged at once
        assert (await lines(3))[2] == "thing refused: wrong size (3 bytes)"
        assert every.total == 1001
        every.close()

    with caplog.at_level(logging.WARNING, logger=log.name):
        asyncio.run(run())


@contextlib.contextmanager
def _no_descriptors_left() -> Iterator[None]:
    """This process at its open-file limit: the soft limit lowered, every descriptor below it taken."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 64, hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_shedding_listener_refuses_with_a_reset_at_the_limit_then_accepts_again() -> None:
    reasons: list[str] = []
    listener = SheddingListener.adopt(bind_socket("127.0.0.1", 0, "switch"), reasons.append)
    port = listener.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port), 5) for _ in range(3)]  # queued, not accepted
    try:
        with _no_descriptors_left():
            with pytest.raises(BlockingIOError):  # "nothing (more) to accept": what accept loops expect
                listener.accept()
        assert listener.refused == 3 and reasons == ["out of file descriptors (EMFILE)"] * 3
        for c in clients:
            c.settimeout(5)
            with pytest.raises(ConnectionResetError):  # refused at once, not left waiting
                c.recv(1)
        with socket.create_connection(("127.0.0.1", port), 5) as c:  # descriptors again: accepted
            conn, _ = listener.accept()
            conn.sendall(b"ok")
            assert c.recv(2) == b"ok"
            conn.close()
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # and an empty queue is reported as before
            listener.accept()
    finally:
        for c in clients:
            c.close()
        listener.close()


def test_heap_releaser_returns_freed_memory_once_per_release() -> None:
    if heap_free_bytes() is None:
        pytest.skip("not glibc: there is no malloc_trim to call")
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    releaser = HeapReleaser(32 << 20)
    releaser.check()  # whatever this test process had freed before
    blocks = [libc.malloc(4096) for _ in range(24_000)]  # ~96 MiB of heap, below the mmap threshold
    for b in blocks:
        ctypes.memset(b, 1, 4096)  # resident
    pin = libc.malloc(4096)  # the heap's top stays in use, so free() alone cannot shrink it
    for b in blocks:
        libc.free(b)
    try:
        rss = psutil.Process().memory_info().rss
        released = releaser.check()
        assert released is not None and released > 48 << 20, released
        assert psutil.Process().memory_info().rss < rss - (48 << 20)
        assert releaser.check() is None  # released already: not again
    finally:
        libc.free(pin)
