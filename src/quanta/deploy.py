"""Service units for running Quanta under systemd: one for a server, one for an agent.

``quanta systemd DIR`` writes them. The units start the same commands an operator types
(``quanta server DIR``, ``quanta agent AGENTDIR``) with absolute paths, restart on failure, stop
with SIGTERM to the supervisor (which stops its children in order; ``KillMode=mixed`` then kills
whatever is left), raise the open-file limit for the Switches' connections, and confine the
process to its own directory. A server runs as the owner of its data directory (it needs no
root: ports below 1024 come from ``CAP_NET_BIND_SERVICE``); an agent runs as root because it reads
the whole device.
"""

from __future__ import annotations

import pwd
import shlex
from urllib.parse import quote as url_quote
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Unit", "agent_unit", "server_unit"]

# Enough for the Switch processes' connections (DESIGN: 20,000 per process on this kind of machine).
SERVER_NOFILE = 65536


@dataclass(frozen=True)
class Unit:
    name: str  # e.g. quanta-server-main.service
    text: str


def _quote(path: Path | str) -> str:
    """A path in an ExecStart= line: systemd splits on spaces like a shell, and expands % and $."""
    s = str(path)
    if any(c in s for c in "\n\r"):
        raise ValueError(f"a path with a line break cannot go in a unit file: {s!r}")
    return shlex.quote(s.replace("%", "%%").replace("$", "$$"))


def _text(s: str) -> str:
    """A value in a unit file where systemd expands % specifiers (Description=, Documentation=)."""
    if any(c in s for c in "\n\r"):
        raise ValueError(f"a path with a line break cannot go in a unit file: {s!r}")
    return s.replace("%", "%%")


def _instance(root: Path) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in root.name).strip("-.") or "default"
    return name[:64]


def _owner(root: Path) -> str:
    try:
        return pwd.getpwuid(root.stat().st_uid).pw_name
    except KeyError:
        return str(root.stat().st_uid)


def server_unit(root: Path, exe: Path, user: str | None = None, after_postgresql: bool = False) -> Unit:
    """The unit of ``quanta server ROOT``, run by ``exe`` (the absolute path of ``quanta``)."""
    root = root.resolve()
    user = user or _owner(root)
    after = "network-online.target" + (" postgresql.service" if after_postgresql else "")
    text = f"""\
[Unit]
Description=Quanta server ({_text(str(root))})
Documentation=file://{_text(url_quote(str(root)))}/quanta.toml
After={after}
Wants=network-online.target

[Service]
Type=simple
User={user}
ExecStart={_quote(exe)} server {_quote(root)}
Restart=on-failure
RestartSec=5
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec=60
LimitNOFILE={SERVER_NOFILE}
UMask=0077
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=strict
ProtectHome=read-only
ReadWritePaths={_quote(root)}

[Install]
WantedBy=multi-user.target
"""
    return Unit(f"quanta-server-{_instance(root)}.service", text)


def agent_unit(agent_dir: Path, exe: Path) -> Unit:
    """The unit of ``quanta agent AGENTDIR``: root, restarted always (the agent is the device's
    only way in), its own directory the only one it writes."""
    agent_dir = agent_dir.resolve()
    text = f"""\
[Unit]
Description=Quanta agent ({_text(str(agent_dir))})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=root
ExecStart={_quote(exe)} agent {_quote(agent_dir)}
Restart=always
RestartSec=5
KillSignal=SIGTERM
TimeoutStopSec=15
UMask=0077
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=full
ReadWritePaths={_quote(agent_dir)}

[Install]
WantedBy=multi-user.target
"""
    return Unit(f"quanta-agent-{_instance(agent_dir)}.service", text)
