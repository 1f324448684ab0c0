"""SCALE module Agent: the agent itself."""

from __future__ import annotations

import os
import platform
import socket
import sys

import psutil

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, method
from ._common import env_tmp, iso, os_type, read_text


@method(
    "Agent", "GetSummary", "Summary of the running agent: version, device name, process and directories.",
    columns=(
        C("AgentVersion", "string"), C("DeviceName", "string"), C("OperatingSystemType", "string"),
        C("ProcessId", "integer"), C("StartTime", "datetime"), C("PythonVersion", "string"),
        C("DataRootDirectory", "string"), C("Executable", "string"),
    ),
    quick=True,
)
def get_summary(env: MethodEnv, args: dict[str, object]):
    ctx = env.context
    proc = psutil.Process()
    return [[
        ctx.agent_version, socket.gethostname(), os_type(), os.getpid(), iso(proc.create_time()),
        platform.python_version(), str(ctx.data_dir), ctx.executable or sys.executable,
    ]]


@method(
    "Agent", "GetKeyFiles", "Paths of the agent's key files and directories (an empty string for one the agent has not).",
    columns=(
        C("Configuration", "string", "full path of the agent configuration file"),
        C("Executable", "string"), C("Log", "string"), C("DataRootDirectory", "string"),
        C("TemporaryDirectory", "string"),
    ),
    quick=True,
)
def get_key_files(env: MethodEnv, args: dict[str, object]):
    ctx = env.context
    return [[
        str(ctx.config_path) if ctx.config_path else "",
        ctx.executable or sys.executable or "",
        str(ctx.log_path) if ctx.log_path else "",
        str(ctx.data_dir),
        env_tmp(),
    ]]


def _configured_switches(ctx) -> list[tuple[str, int]]:
    """``Switch=`` of agent.conf, parsed as the agent parses it; empty when unreadable or invalid."""
    from quanta.agent.config import AgentConfigError, parse_switches

    if ctx.config_path is None:
        return []
    text = read_text(ctx.config_path, 1024 * 1024)
    for line in (text or "").splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "Switch":
            try:
                return [(s.host, s.port) for s in parse_switches(value.strip())]
            except AgentConfigError:
                return []
    return []


@method(
    "Agent", "GetConnectionInformation",
    "The agent's connection to its Switch: the Switches configured (Switch= in agent.conf), the one connected to "
    "now with the local and remote ends, found from the agent process's established TCP connections.",
    columns=(
        C("Switch", "string", "host:port connected to; empty when not connected"),
        C("ConfiguredSwitches", "string", "Switch= of agent.conf, comma-separated"),
        C("Connected", "boolean"), C("LocalAddress", "string"), C("LocalPort", "integer"),
        C("RemoteAddress", "string"), C("RemotePort", "integer"),
    ),
)
def get_connection_information(env: MethodEnv, args: dict[str, object]):
    switches = _configured_switches(env.context)
    configured = ",".join(f"{h}:{p}" for h, p in switches)
    ports = {p: h for h, p in switches}
    try:
        proc = psutil.Process()
        conns = (getattr(proc, "net_connections", None) or proc.connections)(kind="tcp")  # psutil < 6: connections
    except psutil.Error:
        conns = []
    for c in conns:
        if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port in ports:
            host = ports[c.raddr.port]
            return [[f"{host}:{c.raddr.port}", configured, True, c.laddr.ip, c.laddr.port, c.raddr.ip, c.raddr.port]]
    return [["", configured, False, "", None, "", None]]
