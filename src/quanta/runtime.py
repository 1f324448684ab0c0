"""Process plumbing shared by every component: logging, port binding errors, event loop."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import sys
from collections.abc import Coroutine
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


def setup_logging(component: str, level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format=f"%(asctime)s %(levelname)s {component}[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("picows").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def port_hint(port_name: str) -> str:
    if port_name in ("switch", "poke"):
        return ("the Switch client port is SwitchConfiguration.Port (set with 'quanta init --switch-port N' "
                "or in that table); the poke port is always client port + 1")
    if port_name == "https":
        return "set it with 'quanta init --https-port N' or ports.https in quanta.toml"
    return f"set it with 'quanta init --port {port_name}=N' or ports.{port_name} in quanta.toml"


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


def bind_socket(host: str, port: int, port_name: str, *, backlog: int = 4096) -> socket.socket:
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
