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


class PortError(SystemExit):
    """A listener could not bind. The message names the setting to change."""


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
            reason = "is already in use by another process"
        elif e.errno == errno.EACCES:
            reason = f"is privileged and this process (uid {os.getuid()}) may not bind it"
        else:
            reason = f"cannot be bound ({e.strerror})"
        raise PortError(f"error: port {port} on {host} ({what}, setting '{port_name}') {reason}; "
                        f"{port_hint(port_name)}") from None
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
