"""The Master event hub (port ``hub``, 3901, WebSocket).

Remote Response Stacks and DMZ Switch Hosts connect to it (``quanta hub-client``), register,
and receive configuration pushes: today the CRL, so a revocation on the Master reaches every
remote Switch within seconds. A DMZ server also fetches the CRL from the Master's distribution
point on the http port (the seed's DMZ → 80 flow), so it stays current even without the hub.
The internal token is checked before the WebSocket is accepted.
"""

from __future__ import annotations

import asyncio
import logging
import os
from http import HTTPStatus
from pathlib import Path

import httpx
import msgspec
import websockets
from cryptography import x509
from websockets.asyncio.server import ServerConnection, serve

from quanta import protocol as p
from quanta.internal import HUB_PEER, bearer_ok, credential, http_client
from quanta.runtime import bind_socket, setup_logging, wait_for_signal
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


class Hub:
    def __init__(self, root: Path) -> None:
        self.dd = DataDir(root)
        self.token = credential(self.dd.internal_secret(), HUB_PEER)
        self.peers: dict[ServerConnection, Register] = {}

    def _authorise(self, conn: ServerConnection, request):  # type: ignore[no-untyped-def]
        if not bearer_ok(request.headers.get("Authorization"), self.token):
            log.warning("hub connection from %s refused: missing or wrong internal credential", conn.remote_address)
            return conn.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong internal credential\n")
        return None

    async def handler(self, conn: ServerConnection) -> None:
        try:
            reg = _dec_client.decode(await asyncio.wait_for(conn.recv(), 10))
        except (msgspec.DecodeError, msgspec.ValidationError, asyncio.TimeoutError, TypeError) as e:
            log.warning("hub peer %s sent no valid registration (%s); closing", conn.remote_address, e)
            await conn.close(1008, "register first")
            return
        self.peers[conn] = reg
        log.info("%s host %s registered with the hub", reg.role, reg.host)
        try:
            await conn.send(_enc.encode(CrlPush(pem=(self.dd.pki / "crl.pem").read_text())))
            await conn.wait_closed()
        finally:
            self.peers.pop(conn, None)
            log.info("%s host %s left the hub", reg.role, reg.host)

    async def watch_crl(self) -> None:
        crl = self.dd.pki / "crl.pem"
        mtime = crl.stat().st_mtime
        while True:
            await asyncio.sleep(1)
            if crl.stat().st_mtime != mtime:
                mtime = crl.stat().st_mtime
                msg = _enc.encode(CrlPush(pem=crl.read_text()))
                for conn in list(self.peers):
                    try:
                        await conn.send(msg)
                    except websockets.ConnectionClosed:
                        pass
                log.info("pushed the new CRL to %d remote host(s)", len(self.peers))


async def serve_hub(root: Path) -> None:
    settings = load_settings(root)
    setup_logging("hub", settings.log_level)
    hub = Hub(root)
    sock = bind_socket(settings.bind_host, settings.port("hub"), "hub")
    async with serve(hub.handler, sock=sock, process_request=hub._authorise, max_size=4 * 1024 * 1024):
        log.info("master hub listening on ws %s:%d", settings.bind_host, settings.port("hub"))
        watcher = asyncio.create_task(hub.watch_crl())
        await wait_for_signal()
        watcher.cancel()


async def run_client(root: Path) -> None:
    """Response Stack / DMZ side: stay registered with the hub; keep the CRL current."""
    settings = load_settings(root)
    setup_logging("hub-client", settings.log_level)
    dd = DataDir(root)
    token = credential(dd.internal_secret(), HUB_PEER)
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


async def _hub_loop(url: str, token: str, host: str, role: str, dd: DataDir) -> None:
    delay = 0.5
    while True:
        try:
            async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                                          open_timeout=10, max_size=4 * 1024 * 1024) as ws:
                await ws.send(_enc.encode(Register(host=host, role=role)))
                log.info("registered with the master hub at %s", url)
                delay = 0.5
                async for raw in ws:
                    msg = _dec_hub.decode(raw)
                    if install_crl(msg.pem.encode(), dd.pki):
                        log.info("installed the CRL pushed by the master hub")
        except (OSError, websockets.WebSocketException, asyncio.TimeoutError, msgspec.DecodeError, ValueError) as e:
            log.warning("master hub link down (%s); retrying in %.1fs", e, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


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
