"""``quanta preflight``: check, from the host it runs on, every flow a role needs.

Outgoing flows are checked in stages, each under a time limit: TCP connect, TLS handshake with
certificate and name verification, then the service answering (WebSocket upgrade for a Switch,
an HTTP health endpoint, the SMTP banner, a database login). Incoming flows are checked by
connecting to this host's own listener. Every failure carries a hint that names the port, the
component and the two hosts between which the port must be open.

Role ``agent`` accepts either an agent directory (written by ``quanta enroll``: the checks use
its ``Switch=`` and ``BackgroundChannelUrl=`` settings, its CA and its device certificate, exactly
as the agent would) or a server data directory (the checks use the Switch rows of
``SwitchConfiguration``, ``server_name`` and ``ports.https``, and present the server certificate,
which carries clientAuth, as the client certificate; they also fetch the CRL on ``ports.http``).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from quanta.pki import client_context
from quanta.settings import DataDir

from . import model as m

ROLES = ("master", "response", "dmz", "catalog", "agent")
DEFAULT_TIMEOUT = 3.0
PEER_ROLE = {m.MASTER: "master", m.RESPONSE: "response", m.DMZ: "dmz", m.CATALOG: "catalog", m.MAIL: "smtp",
             m.SERVER: "server"}
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass
class Check:
    name: str
    direction: str  # "outgoing" | "incoming"
    target: str  # host:port
    status: str = "pass"  # pass | fail | skip
    detail: str = ""
    hint: str = ""
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Probe:
    """One outgoing flow to check."""

    name: str
    host: str
    port: int
    service: str  # tcp | tls | https | http | wss | smtp
    component: str  # what should answer, for hints
    src: str  # the device the flow starts at
    dst: str  # the device that answers
    path: str = "/"
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Failed(Exception):
    def __init__(self, detail: str, hint: str) -> None:
        super().__init__(detail)
        self.detail, self.hint = detail, hint


# ------------------------------------------------------------------------------ probes
def _unreachable(p: Probe, err: str) -> Failed:
    return Failed(f"TCP connect to {p.host}:{p.port} failed: {err}",
                  f"port {p.port} unreachable: is the {p.component} running? is TCP {p.port} open from the "
                  f"{p.src} to the {p.dst} ({p.host})?")


def _connect(p: Probe, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((p.host, p.port), timeout=timeout)
    except socket.timeout:
        raise _unreachable(p, f"no answer within {timeout:g}s (filtered?)") from None
    except OSError as e:
        raise _unreachable(p, e.strerror or str(e)) from None
    sock.settimeout(timeout)
    return sock


def _cert_names(host: str, port: int, timeout: float) -> list[str]:
    """The names a server's certificate carries (fetched without verification, for the hint)."""
    from cryptography import x509

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as s:
            der = s.getpeercert(binary_form=True)
    except OSError:
        return []
    if not der:
        return []
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in san]


def _tls(p: Probe, sock: socket.socket, timeout: float) -> ssl.SSLSocket:
    if p.ca is None or not p.ca.exists():
        sock.close()
        raise Failed(f"no CA file to verify {p.host} with ({p.ca})", "run 'quanta init' or 'quanta enroll' first")
    ctx = client_context(p.ca, p.cert, p.key)
    try:
        return ctx.wrap_socket(sock, server_hostname=p.host)
    except ssl.SSLCertVerificationError as e:
        sock.close()
        if e.verify_code in (62, 64) or "mismatch" in str(e.verify_message):
            names = _cert_names(p.host, p.port, timeout)
            raise Failed(f"TLS: {e.verify_message}",
                         f"certificate name mismatch: expected {p.host}, got {', '.join(names) or 'no names'}; "
                         f"connect with a name the certificate carries, or re-issue it ('quanta init --server-name')"
                         ) from None
        raise Failed(f"TLS: {e.verify_message}",
                     f"certificate of {p.host}:{p.port} not trusted ({e.verify_message}): is {p.ca} the CA of this "
                     f"Quanta server?") from None
    except (ssl.SSLError, OSError) as e:
        sock.close()
        raise Failed(f"TLS handshake with {p.host}:{p.port} failed: {e}",
                     f"TCP {p.port} answers but the TLS handshake failed: is it the {p.component}, and is a "
                     f"proxy in between?") from None


def _read_head(sock: socket.socket, p: Probe, limit: int = 65536) -> bytes:
    buf = b""
    try:
        while b"\r\n\r\n" not in buf and len(buf) < limit:
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
    except ssl.SSLError as e:
        raise Failed(f"{p.host}:{p.port} closed the TLS session: {e.reason or e}",
                     f"the {p.component} refused this client certificate (revoked, or issued by another CA?)"
                     ) from None
    except socket.timeout:
        raise Failed(f"{p.host}:{p.port} accepted the connection but did not answer within the time limit",
                     f"the {p.component} is stuck or something else listens on TCP {p.port}") from None
    except OSError as e:
        raise Failed(f"{p.host}:{p.port}: {e}", f"the {p.component} dropped the connection") from None
    return buf


def _status(head: bytes) -> tuple[int, str]:
    line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return 0, line
    return int(parts[1]), line


def _http(p: Probe, sock: socket.socket, path: str) -> tuple[int, str]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {p.host}:{p.port}\r\nUser-Agent: quanta-preflight\r\n"
                 f"Connection: close\r\n\r\n".encode())
    return _status(_read_head(sock, p))


def run_probe(p: Probe, timeout: float) -> Check:
    started = time.monotonic()
    check = Check(p.name, "outgoing", f"{p.host}:{p.port}")
    sock: socket.socket | None = None
    try:
        sock = _connect(p, timeout)
        check.detail = "TCP connect ok"
        if p.service in ("https", "wss", "tls", "background"):
            sock = _tls(p, sock, timeout)
            check.detail = "TCP, TLS (certificate and name verified)"
        if p.service == "background":
            # the Background Channel authenticates every request: sign one as the device would and ask
            # for content that does not exist; 404 means TLS, device authentication and the store answered
            from quanta.background.auth import sign_request

            path = p.path.rstrip("/") + "/" + "0" * 64
            headers = sign_request("GET", path, p.cert.read_bytes(), p.key.read_bytes()) if p.cert and p.key else {}
            extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {p.host}:{p.port}\r\n{extra}User-Agent: quanta-preflight\r\n"
                         f"Connection: close\r\n\r\n".encode())
            code, line = _status(_read_head(sock, p))
            if code == 401 and p.cert is None:
                check.detail += f", unauthenticated GET {p.path}/<sha256> refused (401; no device certificate here)"
            elif code == 401:
                raise Failed(f"GET {path} answered {line!r}",
                             "the Background Channel refused this device's certificate (revoked, or issued by "
                             "another installation's CA?)")
            elif code not in (200, 404):
                raise Failed(f"GET {path} answered {line!r}",
                             f"TCP {p.port} on {p.host} answers, but not as the {p.component}: is BackgroundChannelUrl "
                             "right?")
            else:
                check.detail += f", device-authenticated GET {p.path}/<sha256> answered {code}"
        if p.service in ("https", "http"):
            code, line = _http(p, sock, p.path)
            if code == 404 and p.extra.get("fallback"):
                sock.close()
                sock = _connect(p, timeout)
                if p.service == "https":
                    sock = _tls(p, sock, timeout)
                code, line = _http(p, sock, p.extra["fallback"])
                p = Probe(**{**p.__dict__, "path": p.extra["fallback"]})
            if code != 200:
                raise Failed(f"GET {p.path} answered {line!r}",
                             f"TCP {p.port} on {p.host} answers, but not as the {p.component} (expected 200 from "
                             f"{p.path}): is another service on that port?")
            check.detail += f", GET {p.path} 200"
        elif p.service == "wss":
            key = base64.b64encode(os.urandom(16)).decode()
            sock.sendall(f"GET {p.path} HTTP/1.1\r\nHost: {p.host}:{p.port}\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                         f"User-Agent: quanta-preflight\r\n\r\n".encode())
            head = _read_head(sock, p)
            code, line = _status(head)
            accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
            if code != 101 or accept.encode() not in head:
                raise Failed(f"WebSocket upgrade answered {line!r}",
                             f"TCP {p.port} on {p.host} answers TLS but did not upgrade to WebSocket: is it the "
                             f"{p.component}?")
            check.detail += ", WebSocket upgrade 101"
        elif p.service == "smtp":
            banner = _read_head_line(sock, p)
            if not banner.startswith("220"):
                raise Failed(f"SMTP banner {banner!r}", f"TCP {p.port} on {p.host} is not an SMTP server")
            check.detail += f", SMTP banner {banner[:40]!r}"
    except Failed as e:
        check.status, check.detail, check.hint = "fail", e.detail, e.hint
    finally:
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        check.seconds = round(time.monotonic() - started, 3)
    return check


def _read_head_line(sock: socket.socket, p: Probe) -> str:
    buf = b""
    try:
        while b"\n" not in buf and len(buf) < 4096:
            chunk = sock.recv(1024)
            if not chunk:
                break
            buf += chunk
    except OSError:
        raise Failed(f"{p.host}:{p.port} sent no banner", f"is the {p.component} running on TCP {p.port}?") from None
    return buf.decode("latin-1", "replace").strip()


def check_listener(name: str, host: str, port: int, component: str, setting: str, timeout: float) -> Check:
    started = time.monotonic()
    c = Check(name, "incoming", f"{host}:{port}")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            c.detail = "listener bound and accepting"
    except OSError as e:
        c.status = "fail"
        c.detail = f"nothing accepts on {host}:{port} ({e.strerror or e})"
        c.hint = f"port {port} not listening: is the {component} running on this host? ({setting})"
    c.seconds = round(time.monotonic() - started, 3)
    return c


def check_database(name: str, url: str, component: str, timeout: float, src: str) -> Check:
    import sqlalchemy as sa

    from quanta.db import is_sqlite, normalise_url

    started = time.monotonic()
    u = sa.engine.make_url(normalise_url(url))
    target = u.database or "" if is_sqlite(url) else f"{u.host}:{u.port or 5432}"
    c = Check(name, "outgoing" if not is_sqlite(url) else "local", target)
    try:
        if is_sqlite(url):
            if not Path(u.database or "").exists():
                raise Failed(f"{u.database} does not exist", "run 'quanta init DIR' first")
            engine = sa.create_engine(u, connect_args={"timeout": timeout})
        else:
            engine = sa.create_engine(u, connect_args={"connect_timeout": max(1, int(timeout))}, poolclass=sa.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        finally:
            engine.dispose()
        c.detail = "database login ok" if not is_sqlite(url) else "SQLite file opens"
    except Failed as e:
        c.status, c.detail, c.hint = "fail", e.detail, e.hint
    except Exception as e:  # noqa: BLE001 - any driver error is a failed login, reported with its text
        c.status = "fail"
        c.detail = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        c.hint = (f"database login to {target} failed: is the {component} running, is TCP {u.port or 5432} open "
                  f"from the {src} to {u.host}, and are the credentials in database_url right?")
    c.seconds = round(time.monotonic() - started, 3)
    return c


# ------------------------------------------------------------------------------- plans
def _local_host(bind_host: str) -> str:
    if bind_host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bind_host == "::":
        return "::1"
    return bind_host


def _agent_plan(root: Path) -> tuple[list[Probe], list[Any]]:
    from quanta.agent.config import CONF, load_agent_config

    probes: list[Probe] = []
    if (root / CONF).exists():
        cfg = load_agent_config(root)
        ca, cert, key = cfg.ca, cfg.cert, cfg.key
        switches = [(f"switch {sw}", sw.host, sw.port) for sw in cfg.switches]
        background = cfg.background_url
        crl = None
        src = f"agent {cfg.device_name}"
    else:
        live = m.load_live(root)
        s = live.settings
        pki = DataDir(root).pki
        # a server has no device certificate (its own is refused as one), so from here a Switch is
        # checked up to its TLS certificate and the Background Channel up to its refusal (401)
        ca, cert, key = pki / "ca.crt", None, None
        switches = [(f"switch {sw.name}", sw.host, sw.port) for sw in live.enabled_switches]
        background = f"https://{s.server_name}:{s.port('https')}/Background"
        crl = (s.server_name, s.port("http"))
        src = "agent host"
    for name, host, port in switches:
        service = "wss" if cert else "tls"
        probes.append(Probe(f"{name} ({service})", host, port, service, f"Switch ({name}, SwitchConfiguration.Port {port})",
                            src, f"Switch host", path="/agent", ca=ca, cert=cert, key=key))
    if background:
        u = urlsplit(background)
        host, port = u.hostname or "", u.port or 443
        probes.append(Probe("Background Channel (https)", host, port, "background", "web tier (Background Channel)",
                            src, "Quanta Server", path=u.path.rstrip("/") or "/Background", ca=ca, cert=cert, key=key))
    if crl:
        probes.append(Probe("CRL distribution point (http)", crl[0], crl[1], "http",
                            "HTTP tier (CRL distribution point, quanta http)", src, "Quanta Server", path="/crl.pem"))
    return probes, []


def plan(root: Path, role: str, topology: str, peers: dict[str, str]) -> tuple[list[Probe], list[Check], list[tuple]]:
    """Probes (outgoing), ready-made results (skips) and listener checks for a role."""
    if role == "agent":
        probes, _ = _agent_plan(root)
        return probes, [], []
    live = m.load_live(root)
    s = live.settings
    host = m.host_of_role(topology, role)
    placement = m.PLACEMENT[topology]
    rows = m.build_table(live, topology)
    internal = m.internal_rows(live, topology)
    pki = DataDir(root).pki
    probes: list[Probe] = []
    skips: list[Check] = []
    listeners: list[tuple] = []
    implemented = set(m.IMPLEMENTED_LISTENERS) | {"dmz_switch", "dmz_background", "https"}
    if topology != "single-server":
        implemented |= m.REMOTE_ONLY_LISTENERS
    if placement.get("catalog") == placement.get("http"):
        implemented.add("catalog")
    seen: set[tuple[str, int]] = set()
    for r in rows + internal:
        if r.device != host or r.kind != "flow" or r.direction not in ("Incoming", "internal"):
            continue
        for n in r.numbers:
            local = s.internal_host if r.component in ("core", "hub", "coordinator", "integrate") else \
                _local_host(s.bind_host)
            if (local, n) in seen:
                continue
            seen.add((local, n))
            name = f"listener {r.label}"
            if r.component not in implemented:
                skips.append(Check(name, "incoming", f"{local}:{n}", "skip",
                                   f"no Quanta component listens on this port yet ({r.component})"))
                continue
            listeners.append((name, local, n, r.check.get("component") or r.component, r.setting or ""))
    for r in rows:
        if r.device != host or r.direction != "Outgoing" and r.kind != "none":
            continue
        if r.kind == "none" and r.check.get("service") == "sqlite":
            dd = DataDir(root)
            url = dd.master_url(s)
            listeners.append(("db", url, r.label, "database", host))
            continue
        if r.kind != "flow":
            continue
        if r.check.get("service") == "database":
            dd = DataDir(root)
            url = dd.responses_url(s) if r.check["url_role"] == "responses" else dd.master_url(s)
            listeners.append(("db", url, r.label, r.check["component"], host))
            continue
        peer_key = PEER_ROLE.get(r.peer_device, r.peer_device)
        peer_host = peers.get(peer_key)
        n = r.numbers[0]
        if peer_key == "smtp" and not peer_host:
            # the live mail settings (quanta smtp) say where the Coordinator sends email
            from quanta.coordinator import load_smtp
            from quanta.db import make_engine

            import sqlalchemy as sa

            try:
                smtp = load_smtp(make_engine(DataDir(root).master_url(s)))
            except sa.exc.SQLAlchemyError:
                smtp = None  # the database check below reports why
            if smtp is not None and smtp.enabled:
                peer_host, n = smtp.host, smtp.port
            elif smtp is not None:
                skips.append(Check(f"{r.label} ({r.protocol})", "outgoing", f"{smtp.host}:{smtp.port}", "skip",
                                   "email is disabled (quanta smtp DIR --enable)"))
                continue
        name = f"{r.label} ({r.protocol})"
        if not peer_host:
            skips.append(Check(name, "outgoing", f"?:{n}", "skip",
                               f"address of the {r.peer_device} not configured: pass --peer {peer_key}=HOST"))
            continue
        service = r.check.get("service", "tcp")
        probes.append(Probe(name, peer_host, n, service, r.check.get("component", r.peer_device), host,
                            r.peer_device, path=r.check.get("path", "/"), ca=pki / "ca.crt",
                            cert=pki / "server.crt", key=pki / "server.key"))
    return probes, skips, listeners


def run_preflight(root: Path, role: str, topology: str = "single-server", peers: dict[str, str] | None = None,
                  timeout: float = DEFAULT_TIMEOUT) -> list[Check]:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    probes, skips, listeners = plan(Path(root), role, topology, peers or {})
    jobs: list[Any] = []
    with ThreadPoolExecutor(max_workers=16) as pool:
        for p in probes:
            jobs.append(pool.submit(run_probe, p, timeout))
        for item in listeners:
            if item[0] == "db":
                _, url, label, component, src = item
                jobs.append(pool.submit(check_database, label, url, component, timeout, src))
            else:
                name, h, n, component, setting = item
                jobs.append(pool.submit(check_listener, name, h, n, component, setting, timeout))
        results = [j.result() for j in jobs]
    return results + skips


def failed(checks: list[Check]) -> bool:
    return any(c.status == "fail" for c in checks)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
