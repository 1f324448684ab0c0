"""The Master hub (3901) over mutual TLS: who may connect.

A real hub listener (websockets + the hub's TLS context) on a loopback port; real clients:
without a certificate, with another installation's, with a device certificate of this
installation, with a revoked host certificate, with a wrong credential, registering under
another host's name — all refused; a host certificate with the hub credential registers and
receives the CRL. A remote host refuses a hub whose certificate is not the installation CA's.
The reconnect back-off is jittered and capped.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import tenacity
import websockets
from conftest import free_port, quanta
from cryptography import x509
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from quanta.hub import HUB_RETRY_MAX, Hub, HubLinkDown, Register, _enc, _hub_session, hub_retrying, hub_url, server_tls
from quanta.internal import HUB_PEER, SWITCH_TO_CORE, credential
from quanta.pki import Pki, Purpose, client_context
from quanta.settings import DataDir


def _init(root: Path) -> Path:
    quanta("init", str(root), "--server-name", "localhost", "--port", f"core={free_port()}")
    return root


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _init(tmp_path_factory.mktemp("hub") / "master")


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _init(tmp_path_factory.mktemp("stranger") / "other")


@pytest.fixture(scope="module")
def certs(master: Path, stranger: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    out = tmp_path_factory.mktemp("certs")
    pki, other = Pki(DataDir(master).pki), Pki(DataDir(stranger).pki)
    made = {}
    for name, issuer, purpose in (("host", pki, Purpose.HOST), ("revoked", pki, Purpose.HOST),
                                  ("device", pki, Purpose.DEVICE), ("server", pki, Purpose.SERVER),
                                  ("stranger", other, Purpose.HOST)):
        cn = "dmz1" if name in ("host", "stranger") else name
        issuer.issue(cn, out / f"{name}.crt", out / f"{name}.key", purpose=purpose)
        made[name] = (out / f"{name}.crt", out / f"{name}.key")
    return made


class Running:
    def __init__(self, hub: Hub, port: int) -> None:
        self.hub, self.port = hub, port


@pytest.fixture
def hub(master: Path) -> Iterator[Running]:
    loop = asyncio.new_event_loop()
    h = Hub(master)
    h.tls = server_tls(Pki(h.dd.pki))
    async def start():  # type: ignore[no-untyped-def]
        return await serve(h.handler, "127.0.0.1", 0, ssl=h.tls, process_request=h._authorise)

    server = loop.run_until_complete(start())
    watcher = loop.create_task(h.watch_crl())
    running = Running(h, server.sockets[0].getsockname()[1])
    running.loop = loop  # type: ignore[attr-defined]
    try:
        yield running
    finally:
        watcher.cancel()
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()


def _client_tls(master: Path, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    pki = Pki(DataDir(master).pki)
    return client_context(pki.ca_crt, *(cert or (None, None)))


def _attempt(h: Running, master: Path, cert: tuple[Path, Path] | None, token: str | None,
             register_as: str = "dmz1") -> str:
    """What happens to a client: 'crl' (registered, got the CRL), 'http NNN', 'closed ...', 'tls ...'."""
    async def go() -> str:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        try:
            async with connect(f"wss://localhost:{h.port}/Hub", ssl=_client_tls(master, cert),
                               additional_headers=headers, open_timeout=5) as ws:
                await ws.send(_enc.encode(Register(host=register_as, role="dmz")))
                raw = await asyncio.wait_for(ws.recv(), 5)
                return "crl" if b"BEGIN X509 CRL" in (raw if isinstance(raw, bytes) else raw.encode()) else "other"
        except websockets.InvalidStatus as e:
            return f"http {e.response.status_code}"
        except websockets.ConnectionClosed as e:
            return f"closed {e.rcvd.code if e.rcvd else ''}"
        except (ssl.SSLError, OSError, websockets.InvalidMessage, EOFError) as e:
            return f"tls {type(e).__name__}"

    return h.loop.run_until_complete(go())  # type: ignore[attr-defined]


def test_only_a_host_certificate_with_the_hub_credential_gets_in(hub: Running, master: Path,
                                                                 certs: dict[str, tuple[Path, Path]]) -> None:
    secret = DataDir(master).internal_secret()
    good = credential(secret, HUB_PEER)
    assert _attempt(hub, master, certs["host"], good) == "crl"
    assert _attempt(hub, master, None, good).startswith(("tls", "closed"))  # no certificate: the handshake fails
    assert _attempt(hub, master, certs["stranger"], good).startswith(("tls", "closed"))  # another CA
    assert _attempt(hub, master, certs["device"], good) == "http 403"  # this CA, but a device
    assert _attempt(hub, master, certs["host"], None) == "http 401"
    assert _attempt(hub, master, certs["host"], credential(secret, SWITCH_TO_CORE)) == "http 401"
    assert _attempt(hub, master, certs["host"], good, register_as="response1") == "closed 1008"
    assert not hub.hub.peers


def test_a_revoked_host_certificate_is_refused_at_the_next_handshake(hub: Running, master: Path,
                                                                      certs: dict[str, tuple[Path, Path]]) -> None:
    good = credential(DataDir(master).internal_secret(), HUB_PEER)
    assert _attempt(hub, master, certs["revoked"], good, register_as="revoked") == "crl"
    cert = x509.load_pem_x509_certificate(certs["revoked"][0].read_bytes())
    Pki(DataDir(master).pki).revoke(cert.serial_number, "revoked")
    result = "crl"
    for _ in range(50):  # the hub's watcher loads the new CRL within about a second
        result = _attempt(hub, master, certs["revoked"], good, register_as="revoked")
        if result != "crl":
            break
        hub.loop.run_until_complete(asyncio.sleep(0.2))  # type: ignore[attr-defined]  # lets the watcher run
    assert result.startswith(("tls", "closed")), result
    assert _attempt(hub, master, certs["host"], good) == "crl"  # others still get in


def test_a_host_refuses_a_hub_that_is_not_the_installations(master: Path, stranger: Path, tmp_path: Path) -> None:
    """A DMZ host dialling a hub whose certificate another CA issued fails the handshake."""
    mdd = DataDir(master)
    host_dir = tmp_path / "dmz"
    (host_dir / "pki").mkdir(parents=True)
    pki = Pki(mdd.pki)
    (host_dir / "pki" / "ca.crt").write_bytes(pki.ca_crt.read_bytes())
    (host_dir / "pki" / "crl.pem").write_bytes(pki.crl.read_bytes())
    pki.issue("dmz1", host_dir / "pki" / "host.crt", host_dir / "pki" / "host.key", purpose=Purpose.HOST)
    fake = Hub(stranger)  # a hub of another installation

    async def go() -> str:
        async with serve(fake.handler, "127.0.0.1", 0, ssl=server_tls(Pki(DataDir(stranger).pki)),
                         process_request=fake._authorise) as srv:
            port = srv.sockets[0].getsockname()[1]
            try:
                await _hub_session(f"wss://localhost:{port}/Hub", "t", "dmz1", "dmz", DataDir(host_dir))
            except HubLinkDown as e:
                return str(e)
        return "connected"

    assert "CERTIFICATE_VERIFY_FAILED" in asyncio.run(go())


def test_hub_urls_are_wss_and_the_back_off_is_jittered_and_capped() -> None:
    assert hub_url("ws://m:3901/Hub") == "wss://m:3901/Hub" and hub_url("wss://m:3901/Hub") == "wss://m:3901/Hub"
    r = hub_retrying()
    waits = []
    for n in (1, 2, 3, 5, 8, 12, 20, 40, 80):
        state = tenacity.RetryCallState(r, None, (), {})
        state.attempt_number = n
        waits.append([r.wait(state) for _ in range(20)])
    assert all(0 <= w <= HUB_RETRY_MAX for ws in waits for w in ws)
    assert all(len(set(ws)) > 1 for ws in waits)  # jitter: not every host retries at the same moment
    assert max(waits[-1]) > 5  # it backs off
    assert max(waits[0]) <= 1.0  # but the first retry is quick
