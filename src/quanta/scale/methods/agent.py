"""SCALE module Agent: the agent itself."""

from __future__ import annotations

import os
import platform
import socket
import sys

import psutil

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, method
from ._common import env_tmp, iso, os_type, read_system_file, read_text


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


def _cert_thumbprint(path) -> str | None:
    """SHA-1 thumbprint (hex, upper case, as Windows shows one) of a PEM certificate file; None when unreadable."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    data = read_system_file(path, 1024 * 1024)
    if data is None:
        return None
    try:
        return x509.load_pem_x509_certificate(data).fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303 - a name
    except ValueError:
        return None


@method(
    "Agent", "GetConnectionInformation",
    "The agent's connection to its Switch, with the model's columns: the local and remote ends (from the agent "
    "process's established TCP connection to a Switch configured in agent.conf) and the thumbprint of the device "
    "certificate. Columns the model fills from its Switch protocol or Background Channel (Slot, SwitchId, Worker, "
    "SwitchConnectionTime, BGC*, SwitchCertThumbprint, SwitchClockSkewSeconds) are NULL. Always one row.",
    columns=(
        C("Slot", "integer", "NULL in Quanta"), C("SwitchConnectionTime", "string", "NULL in Quanta"),
        C("SwitchId", "integer", "NULL in Quanta"), C("SwitchName", "string", "host:port of the Switch connected to"),
        C("Worker", "integer", "NULL in Quanta"), C("BGCCertThumbprint", "string", "NULL in Quanta"),
        C("BGCConnected", "string", "NULL in Quanta"), C("BGCConnectionTime", "string", "NULL in Quanta"),
        C("ClientCertThumbprint", "string", "SHA-1 thumbprint of device.crt, the certificate sent to the Switch"),
        C("LocalIpAddress", "string"), C("LocalPort", "string"), C("RemoteIpAddress", "string"),
        C("RemotePort", "string"), C("SwitchCertThumbprint", "string", "NULL in Quanta"),
        C("SwitchClockSkewSeconds", "integer", "NULL in Quanta"),
        C("Connected", "boolean", "an established connection to a configured Switch was found (Quanta)"),
        C("ConfiguredSwitches", "string", "Switch= of agent.conf, comma-separated (Quanta)"),
    ),
)
def get_connection_information(env: MethodEnv, args: dict[str, object]):
    ctx = env.context
    switches = _configured_switches(ctx)
    configured = ",".join(f"{h}:{p}" for h, p in switches)
    ports = {p: h for h, p in switches}
    thumb = _cert_thumbprint(ctx.config_path.parent / "device.crt") if ctx.config_path else None
    try:
        proc = psutil.Process()
        conns = (getattr(proc, "net_connections", None) or proc.connections)(kind="tcp")  # psutil < 6: connections
    except psutil.Error:
        conns = []
    for c in conns:
        if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port in ports:
            name = f"{ports[c.raddr.port]}:{c.raddr.port}"
            return [[None, None, None, name, None, None, None, None, thumb, c.laddr.ip, str(c.laddr.port),
                     c.raddr.ip, str(c.raddr.port), None, None, True, configured]]
    return [[None, None, None, None, None, None, None, None, thumb, None, None, None, None, None, None, False,
             configured]]
