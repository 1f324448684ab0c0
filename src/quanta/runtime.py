"""Process plumbing shared by every component: logging, port binding errors, event loop."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import socket
import struct
import sys
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("quanta")


EXIT_CONFIGURATION = 2
"""A component's exit code for an error that restarting will not mend (a setting, a missing file)."""
EXIT_PORT_IN_USE = 75  # EX_TEMPFAIL (sysexits.h)
"""A supervised component's exit code when a port it must bind is held by another process: on a restart
that is usually its killed predecessor's leftover, which goes away, so the supervisor retries."""
SUPERVISED_ENV = "QUANTA_SUPERVISED"
"""Set by the supervisor in its children's environment: ``start`` on a first start, ``restart`` after."""


class PortError(SystemExit):
    """A listener could not bind. The message names the setting to change."""

    def __init__(self, message: str, *, in_use: bool = False) -> None:
        super().__init__(message)
        self.in_use = in_use

    @property
    def exit_code(self) -> int:
        """EXIT_PORT_IN_USE for a held port under a supervisor (which tells a first start from a restart);
        otherwise, and always when run by hand, a configuration error."""
        return EXIT_PORT_IN_USE if self.in_use and os.environ.get(SUPERVISED_ENV) else EXIT_CONFIGURATION


LOG_FORMAT_ENV = "QUANTA_LOG_FORMAT"
"""``text`` (the default) or ``json``: overrides ``log_format`` in quanta.toml, and is how ``quanta server``
hands its format to the components it starts."""
LOG_FORMATS = ("text", "json")


def setup_logging(component: str, level: str = "INFO", fmt: str | None = None) -> None:
    """Log to stderr as ``text`` (one human line) or ``json`` (one object a line: time, level, component,
    pid, logger, message, and exc_info when there is a traceback), for log shippers."""
    from quanta.datadir import private_umask

    private_umask()  # every component creates owner-only files (databases, logs, journals, content)
    fmt = os.environ.get(LOG_FORMAT_ENV) or fmt or "text"
    if fmt not in LOG_FORMATS:
        raise SystemExit(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)} ({LOG_FORMAT_ENV} or "
                         "log_format in quanta.toml)")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(
            "%(levelname)s %(process)d %(name)s %(message)s",
            rename_fields={"levelname": "level", "process": "pid", "name": "logger"},
            static_fields={"component": component}, timestamp="time"))  # ISO 8601, UTC, microseconds
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s {component}[%(process)d] %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level, logging.INFO), handlers=[handler], force=True)
    logging.getLogger("picows").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def configure_logging(component: str, settings: Any, label: str | None = None) -> None:
    """setup_logging with a component's level and the format from its quanta.toml (``log_levels``,
    ``log_level``, ``log_format``); ``label`` names the process in its lines (e.g. ``switch:switch-2``)."""
    setup_logging(label or component, settings.level_of(component), settings.log_format)


def port_hint(port_name: str) -> str:
    if port_name in ("switch", "poke"):
        return ("the Switch client port is SwitchConfiguration.Port (set with 'quanta init --switch-port N' "
                "or in that table); the poke port is always client port + 1")
    if port_name == "https":
        return "set it with 'quanta init --https-port N' or ports.https in quanta.toml"
    return f"set it with 'quanta init --port {port_name}=N' or ports.{port_name} in quanta.toml"


LISTEN_BACKLOG = 4096  # every listener's accept queue (a fleet reconnects at once after a restart)


def port_holders(port: int) -> list[str]:
    """The processes listening on TCP ``port``, as 'pid N (command line)', as far as this user may see
    them (another user's process is listed as 'a process of another user')."""
    import psutil

    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return []
    pids = {c.pid for c in conns if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN}
    holders = []
    for pid in sorted(pids, key=lambda x: x or 0):
        if pid is None:
            holders.append("a process of another user")
            continue
        try:
            cmd = " ".join(psutil.Process(pid).cmdline()) or "?"
        except psutil.Error:
            cmd = "?"
        holders.append(f"pid {pid} ({cmd[:200]})")
    return holders


def bind_socket(host: str, port: int, port_name: str, *, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """Bind a listening TCP socket, or exit with a message naming the setting to change."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        from quanta.settings import PORTS_BY_NAME

        sock.close()
        spec = PORTS_BY_NAME.get(port_name)
        what = f"{spec.protocol} {spec.listener}" if spec else port_name
        if e.errno == errno.EADDRINUSE:
            holders = port_holders(port)
            reason = "is already in use by " + (", ".join(holders) if holders else "another process")
        elif e.errno == errno.EACCES:
            reason = f"is privileged and this process (uid {os.getuid()}) may not bind it"
        else:
            reason = f"cannot be bound ({e.strerror})"
        raise PortError(f"error: port {port} on {host} ({what}, setting '{port_name}') {reason}; "
                        f"{port_hint(port_name)}", in_use=e.errno == errno.EADDRINUSE) from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class LogEvery:
    """One log line per interval for an event that can repeat at the rate of an attacker's loop.

    The first event after a quiet interval is logged at once, with its detail; the ones that follow
    within ``interval`` seconds are only counted, by reason, and one line per interval reports how
    many there were, until an interval passes without any. Needs a running event loop.
    """

    def __init__(self, logger: logging.Logger, interval: float, what: str) -> None:
        self.logger = logger
        self.interval = interval
        self.what = what  # e.g. "poke refused"
        self.total = 0  # every event noted, for tests and stats
        self._counts: Counter[str] = Counter()
        self._timer: asyncio.TimerHandle | None = None

    def note(self, reason: str, detail: str = "") -> None:
        self.total += 1
        if self._timer is None:
            self.logger.warning("%s: %s%s", self.what, reason, f" ({detail})" if detail else "")
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._report)
        else:
            self._counts[reason] += 1

    def _report(self) -> None:
        if not self._counts:
            self._timer = None  # quiet for a whole interval: the next event is logged at once
            return
        self.logger.warning("%s: %d more in the last %gs (%s)", self.what, sum(self._counts.values()),
                            self.interval, ", ".join(f"{r}: {n}" for r, n in self._counts.most_common()))
        self._counts.clear()
        self._timer = asyncio.get_running_loop().call_later(self.interval, self._report)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)
OUT_OF_MEMORY = (errno.ENOBUFS, errno.ENOMEM)
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset, leaves no TIME_WAIT
SHED_PER_CALL = 1024  # refusals per accept() call, so one call never holds the loop for long


class SheddingListener(socket.socket):
    """A listening socket that refuses, cleanly, the connections it has no descriptor for.

    At the open-file limit ``accept()`` fails with EMFILE (ENFILE: the system's limit) while the
    waiting connections keep the socket readable, so an event loop calls it again at once, forever.
    (aiofastnet's own back-off for this case calls ``remove_reader`` on the socket instead of on the
    loop, so each attempt also raises ``AttributeError`` and logs two tracebacks.) This socket keeps
    one spare descriptor: at the limit it frees the spare, accepts the waiting connection, closes it
    at once with a reset (the client sees the refusal at once and the server keeps no TIME_WAIT),
    takes the spare back and repeats while connections wait; then it reports an empty queue
    (``BlockingIOError``), which every accept loop handles as the normal end of a turn. Each
    refusal is reported to ``on_refused`` with its reason.

    When the kernel is out of memory for sockets (ENOBUFS, ENOMEM, which aiofastnet handles the
    same broken way) nothing can be accepted or refused; that is reported as an empty queue too, and
    each attempt to ``on_refused``: the connections wait in the queue until memory frees up.
    """

    def __init__(self, *args: Any, on_refused: Callable[[str], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_refused = on_refused
        self.refused = 0
        self._spare: int | None = None
        self._take_spare()

    @classmethod
    def adopt(cls, sock: socket.socket, on_refused: Callable[[str], None]) -> SheddingListener:
        """The same listening socket (same descriptor, bound and listening), with shedding."""
        return cls(sock.family, sock.type, sock.proto, fileno=sock.detach(), on_refused=on_refused)

    def _take_spare(self) -> None:
        try:
            self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._spare = None  # retried at the next refusal

    def accept(self) -> tuple[socket.socket, Any]:
        try:
            return super().accept()
        except OSError as e:
            code = errno.errorcode.get(e.errno or 0, "?")
            if e.errno in OUT_OF_DESCRIPTORS:
                self._shed(code)
            elif e.errno in OUT_OF_MEMORY:
                self.on_refused(f"out of socket memory ({code}), connection left waiting")
            else:
                raise
            raise BlockingIOError(errno.EAGAIN, f"cannot accept now ({code})") from None

    def _shed(self, code: str) -> None:
        reason = f"out of file descriptors ({code})"
        for _ in range(SHED_PER_CALL):
            if self._spare is None:
                self._take_spare()
                if self._spare is None:  # nothing to free: the connection waits in the queue
                    self.on_refused(reason + ", no spare descriptor to refuse with")
                    return
            os.close(self._spare)
            self._spare = None
            try:
                fd, _addr = self._accept()  # type: ignore[attr-defined]
            except OSError:  # the queue is empty (or the freed descriptor went elsewhere)
                self._take_spare()
                return
            refused = socket.socket(fileno=fd)
            try:
                refused.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass  # already reset by the peer: closing is all there is to do
            refused.close()
            self._take_spare()
            self.refused += 1
            self.on_refused(reason)

    def close(self) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        super().close()


# ---------------------------------------------------------------------------- C heap
# glibc keeps the memory a process frees in its heap for reuse and returns it to the system only
# from the top of the heap, which one long-lived allocation there pins. After a flood (thousands of
# connections in their TLS handshake, all closed at once) a process keeps its peak size for good;
# ``malloc_trim`` hands the free pages back. Elsewhere (musl, macOS) this is a no-op.
class _MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc() -> Any:
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def heap_free_bytes() -> int | None:
    """Bytes the C heap holds free for reuse (glibc only; None elsewhere)."""
    return None if _LIBC is None else int(_LIBC.mallinfo2().fordblks)


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapReleaser:
    """Returns the C heap's free pages to the system each time ``min_free`` more bytes became free.

    ``malloc_trim`` leaves the released pages counted as free, so the free bytes seen after a
    release are the baseline; it follows the heap down as free memory is reused."""

    def __init__(self, min_free: int) -> None:
        self.min_free = min_free
        self.baseline = 0

    def check(self) -> int | None:
        """The bytes released (by resident size) if a release was due, else None."""
        free = heap_free_bytes()
        if free is None:
            return None
        if free <= self.baseline + self.min_free:
            self.baseline = min(self.baseline, free)
            return None
        before = rss_bytes()
        _LIBC.malloc_trim(0)
        after = rss_bytes()
        self.baseline = heap_free_bytes() or 0
        return max(0, before - after) if before is not None and after is not None else 0


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run a server component's main coroutine on uvloop (DESIGN §6: small per-connection memory)."""
    import uvloop

    return uvloop.run(main)


async def wait_for_signal() -> None:
    """Return on SIGTERM or SIGINT."""
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
