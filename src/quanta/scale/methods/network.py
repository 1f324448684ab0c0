"""SCALE module Network: connections and interfaces."""

from __future__ import annotations

import socket

import psutil

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, MethodError, method

_FAMILY = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}


def _proto(c) -> str:
    return ("tcp" if c.type == socket.SOCK_STREAM else "udp") + ("6" if c.family == socket.AF_INET6 else "")


def _net_connections(kind: str):
    try:
        return psutil.net_connections(kind=kind)
    except psutil.AccessDenied:
        raise MethodError("Access denied listing network connections on this platform") from None


class _Names:
    """Process names by id, looked up once per call."""

    def __init__(self) -> None:
        self.names: dict[int, str | None] = {}

    def __call__(self, pid: int | None) -> str | None:
        if not pid:
            return None
        if pid not in self.names:
            try:
                self.names[pid] = psutil.Process(pid).name()
            except psutil.Error:
                self.names[pid] = None
        return self.names[pid]


@method(
    "Network", "GetConnections",
    "Established TCP connections, IPv4 and IPv6, one row each, with the model's columns. Listening sockets are in "
    "Network.GetListeningEndpoints.",
    columns=(
        C("Class", "string", "IPv4 or IPv6"),
        C("LatencyMs", "integer", "smoothed round-trip time; NULL (the model fills it on Windows only)"),
        C("LocalAddress", "string"), C("LocalPort", "integer"),
        C("PacketLossPercent", "integer", "NULL (as the model on every platform but Windows)"),
        C("ProcessId", "integer"), C("ProcessName", "string"),
        C("RemoteAddress", "string"), C("RemotePort", "integer"),
    ),
)
def get_connections(env: MethodEnv, args: dict[str, object]):
    name = _Names()
    rows = []
    for c in _net_connections("tcp"):
        if c.status != psutil.CONN_ESTABLISHED or not c.raddr:
            continue
        rows.append(env.take([
            _FAMILY.get(c.family, str(c.family)), None, c.laddr.ip if c.laddr else None,
            c.laddr.port if c.laddr else None, None, c.pid, name(c.pid), c.raddr.ip, c.raddr.port,
        ]))
    return rows


@method(
    "Network", "GetListeningEndpoints",
    "Sockets waiting for connections: TCP listeners and bound UDP sockets (IPv4 and IPv6), one row each.",
    columns=(
        C("Protocol", "string", "tcp, tcp6, udp or udp6"), C("LocalAddress", "string", "the address listened on"),
        C("LocalPort", "integer"), C("ProcessId", "integer"), C("ProcessName", "string"),
    ),
)
def get_listening_endpoints(env: MethodEnv, args: dict[str, object]):
    name = _Names()
    rows = []
    for c in _net_connections("inet"):
        if not c.laddr:
            continue
        if c.type == socket.SOCK_STREAM and c.status != psutil.CONN_LISTEN:
            continue
        if c.type == socket.SOCK_DGRAM and c.raddr:  # a connected UDP socket is not an endpoint
            continue
        rows.append(env.take([_proto(c), c.laddr.ip, c.laddr.port, c.pid, name(c.pid)]))
    rows.sort(key=lambda r: (r[0], r[2], r[1]))
    return rows


@method(
    "Network", "GetInterfaces", "Network interfaces: one row per address (IPv4, IPv6 and link-layer).",
    columns=(
        C("Name", "string"), C("Family", "string", "IPv4, IPv6 or MAC"), C("IpAddress", "string"), C("Netmask", "string"),
        C("MacAddress", "string"), C("IsUp", "boolean"), C("SpeedMbps", "integer"), C("Mtu", "integer"),
    ),
)
def get_interfaces(env: MethodEnv, args: dict[str, object]):
    stats = psutil.net_if_stats()
    rows = []
    for name, addrs in psutil.net_if_addrs().items():
        st = stats.get(name)
        mac = next((a.address for a in addrs if a.family == psutil.AF_LINK), None)
        for a in addrs:
            fam = _FAMILY.get(a.family, "MAC" if a.family == psutil.AF_LINK else str(a.family))
            ip = a.address if a.family in _FAMILY else None
            rows.append([name, fam, ip, a.netmask if ip else None, mac, st.isup if st else None, st.speed if st else None, st.mtu if st else None])
    return rows
