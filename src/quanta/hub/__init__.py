"""The Master event hub (port ``hub``, 3901, WebSocket over mutual TLS: ``wss``).

Remote Response Stacks and DMZ Switch Hosts connect to it (``quanta hub-client``), register,
and receive configuration pushes: today the CRL, so a revocation on the Master reaches every
remote Switch within seconds. A DMZ server also fetches the CRL from the Master's distribution
point on the http port (the seed's DMZ → 80 flow), so it stays current even without the hub.

Trust, both ways, before a frame is read: the hub presents the Master's server certificate and
the peer verifies it against the installation CA; the peer presents its host certificate
(``pki/host.crt``, :data:`quanta.pki.Purpose.HOST`, issued by ``quanta host export``), which the
TLS handshake verifies against the installation CA and the CRL, and the hub checks it is a host
certificate (a device certificate from the same CA is refused); then the hub peer's credential
(:data:`quanta.internal.HUB_PEER`), and the registered host name must be the certificate's.
The client reconnects with capped, jittered exponential back-off (tenacity).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from http import HTTPStatus
from pathlib import Path

import httpx
import msgspec
import tenacity
import websockets
from cryptography import x509
from cryptography.x509.oid import NameOID
from websockets.asyncio.server import ServerConnection, serve

from quanta.internal import HUB_PEER, bearer_ok, credential, host_credentials, http_client
from quanta.pki import Pki, client_context, host_refusal, tls_server_context
from quanta.runtime import bind_socket, configure_logging, wait_for_signal
from quanta.settings import DataDir, load_settings

log = logging.getLogger("quanta.hub")


class Register(msgspec.Struct, tag="register"):
    host: str
    role: str


class CrlPush(msgspec.Struct, tag="crl"):
    pem: str


_dec_client = msgspec.json.Decoder(Register)
_dec_hub = msgspec.json.Decoder(CrlPush)
_enc = msgspec.json.Encoder()


def verify_crl(pem: bytes, ca_file: Path) -> x509.CertificateRevocationList:
    """Parse a CRL and check it is signed by the installation CA; raise ValueError if not."""
    crl = x509.load_pem_x509_crl(pem)
    ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
    if not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise ValueError("CRL is not signed by this installation's CA")
    return crl


def install_crl(pem: bytes, pki_dir: Path) -> bool:
    """Write a verified CRL if it is newer than ours; the Switches watch the file. True if changed."""
    target = pki_dir / "crl.pem"
    new = verify_crl(pem, pki_dir / "ca.crt")
    if target.exists():
        try:
            old = x509.load_pem_x509_crl(target.read_bytes())
            if old.last_update_utc >= new.last_update_utc and target.read_bytes() == pem:
                return False
            if old.last_update_utc > new.last_update_utc:
                return False  # never roll back to an older list
        except ValueError:
            pass
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(pem)
    os.replace(tmp, target)
    return True


def server_tls(pki: Pki) -> ssl.SSLContext:
    """The hub's TLS: the Master's server certificate; the peer must present a certificate of the
    installation CA, not revoked (mutual TLS)."""
    return tls_server_context(pki.server_crt, pki.server_key, client_ca=pki.ca_crt, crl=pki.crl)


def client_tls(pki: Pki) -> ssl.SSLContext:
    """A remote host's TLS towards the hub: the hub's certificate must be the installation CA's
    and name the hub's host; this host presents its host certificate."""
    if not pki.host_crt.exists():
        raise FileNotFoundError(f"{pki.host_crt} is missing: this host was exported before hosts had their own "
                                "certificate; export it again with 'quanta host export' on the Master")
    return client_context(pki.ca_crt, pki.host_crt, pki.host_key)


def _peer_host(conn: ServerConnection) -> tuple[str | None, str | None]:
    """(host name, None) of the peer's host certificate, or (None, why it is refused)."""
    ssl_object = conn.transport.get_extra_info("ssl_object") if conn.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None, "no certificate from the installation CA"
    cert = x509.load_der_x509_certificate(der)
    why = host_refusal(cert)
    if why is not None:
        return None, why
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return (str(cn[0].value) if cn else ""), None


DUPLICATE_PING = 5.0  # seconds a registered host has to answer before a new link of its name replaces it


def _addr(conn: ServerConnection) -> str:
    a = conn.remote_address
    return f"{a[0]}:{a[1]}" if isinstance(a, tuple) and len(a) >= 2 else str(a)


class Hub:
    def __init__(self, root: Path) -> None:
        self.dd = DataDir(root)
        self.token = credential(host_credentials(root), HUB_PEER)
        self.peers: dict[ServerConnection, Register] = {}
        self.tls: ssl.SSLContext | None = None  # set by serve_hub; the CRL watcher refreshes its CRL

    def _authorise(self, conn: ServerConnection, request):  # type: ignore[no-untyped-def]
        host, why = _peer_host(conn)
        if why is not None:
            log.warning("hub connection from %s refused: %s", conn.remote_address, why)
            return conn.respond(HTTPStatus.FORBIDDEN, f"refused: {why}\n")
        if not bearer_ok(request.headers.get("Authorization"), self.token):
            log.warning("hub connection from %s (%s) refused: missing or wrong internal credential",
                        conn.remote_address, host)
            return conn.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong internal credential\n")
        return None

    async def handler(self, conn: ServerConnection) -> None:
        try:
            reg = _dec_client.decode(await asyncio.wait_for(conn.recv(), 10))
        except (msgspec.DecodeError, msgspec.ValidationError, asyncio.TimeoutError, TypeError) as e:
            log.warning("hub peer %s sent no valid registration (%s); closing", conn.remote_address, e)
            await conn.close(1008, "register first")
            return
        host, _ = _peer_host(conn)
        if host != reg.host:
            log.warning("hub peer %s registered as %r with the host certificate of %r; closing",
                        conn.remote_address, reg.host[:100], host)
            await conn.close(1008, "the registered host must be the certificate's")
            return
        why = await self._refusal(reg)
        if why is not None:
            log.warning("hub peer %s refused: %s", conn.remote_address, why)
            await conn.close(1008, why[:120])
            return
        self.peers[conn] = reg
        log.info("%s host %s registered with the hub", reg.role, reg.host)
        try:
            await conn.send(_enc.encode(CrlPush(pem=(self.dd.pki / "crl.pem").read_text())))
            await conn.wait_closed()
        finally:
            self.peers.pop(conn, None)
            log.info("%s host %s left the hub", reg.role, reg.host)

    async def _refusal(self, reg: Register) -> str | None:
        """Why a registration (already matched to its certificate) is refused, or None. A host is
        registered once: a second link under a name that is live (it answers a ping within
        :data:`DUPLICATE_PING`) is refused, so a copied host certificate cannot take over a running
        stack; a link that does not answer is dropped for the new one (a host that restarted). A
        host exported from this Master (``hosts.json``, quanta.topology) must register its own role."""
        from quanta.topology import TopologyError, exported_hosts

        try:
            exported = exported_hosts(self.dd.root).get(reg.host)
        except TopologyError as e:
            log.error("%s", e)
            exported = None
        if exported is not None and exported.get("role") != reg.role:
            return (f"host {reg.host} was exported as a {exported.get('role')} host, not {reg.role[:20]!r}")
        for old, other in list(self.peers.items()):
            if other.host != reg.host:
                continue
            try:
                await asyncio.wait_for(await old.ping(), DUPLICATE_PING)
            except (asyncio.TimeoutError, websockets.ConnectionClosed):
                log.warning("%s host %s registered again; its earlier link did not answer and is dropped", reg.role,
                            reg.host)
                self.peers.pop(old, None)
                await old.close(1001, "replaced by a new link of the same host")
                continue
            return f"host {reg.host} is already registered from {_addr(old)}"
        return None

    async def watch_crl(self) -> None:
        crl = self.dd.pki / "crl.pem"
        mtime = crl.stat().st_mtime
        while True:
            await asyncio.sleep(1)
            if crl.stat().st_mtime != mtime:
                mtime = crl.stat().st_mtime
                if self.tls is not None:  # a revoked host certificate is refused from the next handshake
                    self.tls.load_verify_locations(cafile=str(crl))
                msg = _enc.encode(CrlPush(pem=crl.read_text()))
                for conn in list(self.peers):
                    try:
                        await conn.send(msg)
                    except websockets.ConnectionClosed:
                        pass
                log.info("pushed the new CRL to %d remote host(s)", len(self.peers))


async def serve_hub(root: Path) -> None:
    settings = load_settings(root)
    configure_logging("hub", settings)
    hub = Hub(root)
    hub.tls = server_tls(Pki(hub.dd.pki))
    sock = bind_socket(settings.bind_host, settings.port("hub"), "hub")
    async with serve(hub.handler, sock=sock, ssl=hub.tls, process_request=hub._authorise, max_size=4 * 1024 * 1024,
                     server_header=None):
        log.info("master hub listening on wss %s:%d (mutual TLS)", settings.bind_host, settings.port("hub"))
        watcher = asyncio.create_task(hub.watch_crl())
        await wait_for_signal()
        watcher.cancel()


async def run_client(root: Path) -> None:
    """Response Stack / DMZ side: stay registered with the hub; keep the CRL current."""
    settings = load_settings(root)
    configure_logging("hub-client", settings)
    dd = DataDir(root)
    token = credential(host_credentials(root), HUB_PEER)
    stop = asyncio.Event()
    waiter = asyncio.create_task(wait_for_signal())
    waiter.add_done_callback(lambda _: stop.set())
    tasks = []
    if settings.hub_url:
        tasks.append(asyncio.create_task(_hub_loop(settings.hub_url, token, settings.server_name, settings.role, dd)))
    if settings.crl_url:
        tasks.append(asyncio.create_task(_crl_fetch_loop(settings.crl_url, dd)))
    await stop.wait()
    for t in tasks:
        t.cancel()


HUB_RETRY_MAX = 30.0  # the longest wait between two attempts to reach the hub
HUB_STABLE = 10.0  # a link that stayed up this long is reopened at once when it drops


class HubLinkDown(Exception):
    pass


def hub_url(url: str) -> str:
    """The hub speaks wss only; a ws:// URL from an older export is upgraded (same host and port)."""
    if url.startswith("ws://"):
        log.warning("hub_url %s is plain ws://; using wss:// (the hub accepts only TLS)", url)
        return "wss://" + url[len("ws://"):]
    return url


async def _hub_session(url: str, token: str, host: str, role: str, dd: DataDir) -> None:
    """One link to the hub: register, install every pushed CRL. Returns when a link that stayed up
    ends; raises (to be retried with back-off) when it could not be opened or ended quickly."""
    started = time.monotonic()
    try:
        async with websockets.connect(url, ssl=client_tls(Pki(dd.pki)),
                                      additional_headers={"Authorization": f"Bearer {token}"},
                                      open_timeout=10, max_size=4 * 1024 * 1024) as ws:
            await ws.send(_enc.encode(Register(host=host, role=role)))
            log.info("registered with the master hub at %s", url)
            async for raw in ws:
                msg = _dec_hub.decode(raw)
                if install_crl(msg.pem.encode(), dd.pki):
                    log.info("installed the CRL pushed by the master hub")
    except websockets.InvalidStatus as e:
        raise HubLinkDown(f"the hub refused this host: HTTP {e.response.status_code}") from None
    except (OSError, websockets.WebSocketException, asyncio.TimeoutError, msgspec.DecodeError, ValueError) as e:
        raise HubLinkDown(f"{type(e).__name__}: {e}") from None
    if time.monotonic() - started < HUB_STABLE:
        raise HubLinkDown("the hub closed the link")


def _log_retry(state: tenacity.RetryCallState) -> None:
    e = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning("master hub link down (%s); retrying in %.1fs", e, wait)


def hub_retrying(max_wait: float = HUB_RETRY_MAX) -> tenacity.AsyncRetrying:
    """Forever, with full-jitter exponential back-off from 0.5 s, capped at ``max_wait``."""
    return tenacity.AsyncRetrying(retry=tenacity.retry_if_exception_type(HubLinkDown), reraise=True,
                                  wait=tenacity.wait_random_exponential(multiplier=0.5, max=max_wait),
                                  before_sleep=_log_retry)


async def _hub_loop(url: str, token: str, host: str, role: str, dd: DataDir) -> None:
    url = hub_url(url)
    while True:  # a new back-off after every link that stayed up
        async for attempt in hub_retrying():
            with attempt:
                await _hub_session(url, token, host, role, dd)
        log.warning("master hub link at %s ended; reconnecting", url)


async def _crl_fetch_loop(url: str, dd: DataDir, interval: float = 60.0) -> None:
    while True:
        try:
            r = await http_client().get(url, timeout=10)
            r.raise_for_status()
            if install_crl(r.content, dd.pki):
                log.info("installed a newer CRL from %s", url)
        except (httpx.HTTPError, ValueError) as e:
            log.warning("CRL fetch from %s failed (%s); keeping the current list", url, e)
        await asyncio.sleep(interval)


__all__ = ["Hub", "install_crl", "run_client", "serve_hub", "verify_crl"]
