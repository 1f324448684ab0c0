"""SCALE module Network: connections and interfaces."""

from __future__ import annotations

import socket

import psutil

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, MethodError, method

_FAMILY = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}


@method(
    "Network", "GetConnections", "TCP and UDP sockets: one row per connection or listener. IpAddress/Port are the remote end.",
    columns=(
        C("Protocol", "string", "tcp, tcp6, udp or udp6"), C("LocalAddress", "string"), C("LocalPort", "integer"),
        C("IpAddress", "string", "remote address"), C("Port", "integer", "remote port"), C("State", "string"),
        C("ProcessId", "integer"), C("ProcessName", "string"),
    ),
)
def get_connections(env: MethodEnv, args: dict[str, object]):
    try:
        conns = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:
        raise MethodError("Access denied listing network connections on this platform") from None
    names: dict[int, str | None] = {}
    rows = []
    for c in conns:
        proto = ("tcp" if c.type == socket.SOCK_STREAM else "udp") + ("6" if c.family == socket.AF_INET6 else "")
        name = None
        if c.pid:
            if c.pid not in names:
                try:
                    names[c.pid] = psutil.Process(c.pid).name()
                except psutil.Error:
                    names[c.pid] = None
            name = names[c.pid]
        rows.append([
            proto, c.laddr.ip if c.laddr else None, c.laddr.port if c.laddr else None,
            c.raddr.ip if c.raddr else None, c.raddr.port if c.raddr else None,
            c.status if c.status != psutil.CONN_NONE else None, c.pid, name,
        ])
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
