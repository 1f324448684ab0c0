"""TLS policy of every listener, and the CRL distribution point of every certificate Quanta issues.

A real server: its HTTPS port (web tier), its Coordinator and a Switch port are asked by Python
``ssl`` clients: a TLS 1.2 client offering only CBC suites and a TLS 1.1 client fail the
handshake; a TLS 1.2 client with an AEAD suite and a TLS 1.3 client succeed. A control server
without the policy accepts the same CBC and TLS 1.1 clients, so these clients can tell.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Server, make_server
from cryptography import x509

from quanta.pki import TLS12_CIPHERS, tls_server_context
from quanta.settings import DataDir, load_settings

CBC = "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:AES128-SHA"
RSA_KX = "AES128-GCM-SHA256:AES256-GCM-SHA384"


def _client(*, version: ssl.TLSVersion, ciphers: str | None = None, cert: tuple[Path, Path] | None = None,
            ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if ca is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile=str(ca))
    ctx.minimum_version = ctx.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client really offer TLS 1.1
    if ciphers is not None:
        ctx.set_ciphers(ciphers + ":@SECLEVEL=0")
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def _handshake(port: int, ctx: ssl.SSLContext) -> tuple[str, str] | str:
    """(version, cipher) of a completed handshake, else the error."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            if tls.version() == "TLSv1.3":
                tls.settimeout(2)  # a refused client certificate shows after the handshake in 1.3
                try:
                    tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    tls.recv(1)
                except ssl.SSLError as e:
                    return f"error: {e}"
                except (TimeoutError, OSError):
                    pass
            return tls.version() or "", tls.cipher()[0]
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
        return f"error: {e}"


def _assert_policy(port: int, cert: tuple[Path, Path] | None = None) -> None:
    fails = {"TLS 1.2 CBC": _client(version=ssl.TLSVersion.TLSv1_2, ciphers=CBC, cert=cert),
             "TLS 1.2 RSA key exchange": _client(version=ssl.TLSVersion.TLSv1_2, ciphers=RSA_KX, cert=cert),
             "TLS 1.1": _client(version=ssl.TLSVersion.TLSv1_1, cert=cert),
             "TLS 1.0": _client(version=ssl.TLSVersion.TLSv1, cert=cert)}
    for what, ctx in fails.items():
        got = _handshake(port, ctx)
        assert isinstance(got, str), f"port {port} accepted a {what} client: {got}"
    for what, ctx in {"TLS 1.2 AES-GCM": _client(version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256",
                                                 cert=cert),
                      "TLS 1.2 ChaCha20": _client(version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-CHACHA20-POLY1305",
                                                  cert=cert),
                      "TLS 1.3": _client(version=ssl.TLSVersion.TLSv1_3, cert=cert)}.items():
        got = _handshake(port, ctx)
        assert isinstance(got, tuple), f"port {port} refused a {what} client: {got}"
        version, cipher = got
        assert ("GCM" in cipher or "CHACHA20" in cipher) and version in ("TLSv1.2", "TLSv1.3"), (what, got)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    s = make_server(tmp_path_factory.mktemp("tls"))
    s.start()
    try:
        yield s, s.enroll("dev-tls")
    finally:
        s.stop()


def test_the_https_port_offers_only_tls12_and_13_with_aead(running: tuple[Server, Path]) -> None:
    s, _ = running
    _assert_policy(s.https)


def test_the_coordinator_offers_only_tls12_and_13_with_aead(running: tuple[Server, Path]) -> None:
    s, _ = running
    _assert_policy(load_settings(s.root).port("coordinator"))


def test_a_switch_port_offers_only_tls12_and_13_with_aead(running: tuple[Server, Path]) -> None:
    s, agent = running
    _assert_policy(s.switch, cert=(agent / "device.crt", agent / "device.key"))


def test_a_control_server_without_the_policy_accepts_the_refused_clients(running: tuple[Server, Path],
                                                                         tmp_path: Path) -> None:
    """The refused clients above really offer CBC and TLS 1.1: a permissive server accepts them."""
    pki = DataDir(running[0].root).pki
    loose = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    loose.minimum_version = ssl.TLSVersion.TLSv1
    loose.set_ciphers("ALL:@SECLEVEL=0")
    loose.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
    strict = tls_server_context(pki / "server.crt", pki / "server.key")
    results: dict[str, object] = {}
    for name, server_ctx in (("loose", loose), ("strict", strict)):
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]

        def accept(ctx: ssl.SSLContext = server_ctx, sock: socket.socket = listener) -> None:
            for _ in range(2):
                conn, _addr = sock.accept()
                try:
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)
                except (ssl.SSLError, OSError):
                    pass

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        results[name] = (_handshake(port, _client(version=ssl.TLSVersion.TLSv1_2, ciphers=CBC)),
                         _handshake(port, _client(version=ssl.TLSVersion.TLSv1_1)))
        t.join(10)
        listener.close()
    cbc, tls11 = results["loose"]  # type: ignore[misc]
    assert isinstance(cbc, tuple) and "GCM" not in cbc[1] and isinstance(tls11, tuple) and tls11[0] == "TLSv1.1"
    assert all(isinstance(r, str) for r in results["strict"])  # type: ignore[union-attr]
    assert "CBC" in TLS12_CIPHERS and "ECDHE+AESGCM" in TLS12_CIPHERS


def _crl_dp(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    return [n.value for dp in ext for n in (dp.full_name or [])]


def test_issued_certificates_name_the_crl_on_the_http_port(running: tuple[Server, Path]) -> None:
    s, agent = running
    settings = load_settings(s.root)
    pki = DataDir(s.root).pki
    want = f"http://{settings.server_name}:{settings.port('http')}/crl.pem"
    for crt in (pki / "server.crt", agent / "device.crt", agent / "interaction.crt"):
        assert _crl_dp(x509.load_pem_x509_certificate(crt.read_bytes())) == [want], crt
    # and the CRL is there, signed by the installation CA
    r = httpx.get(want.replace(settings.server_name, "127.0.0.1", 1), timeout=10)
    assert r.status_code == 200
    crl = x509.load_pem_x509_crl(r.content)
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]


def test_no_secret_or_credential_reaches_a_log_line(running: tuple[Server, Path]) -> None:
    """Refusals are logged (who, what), never what was presented; the server's logs hold no
    credential, no installation secret and no administrator password."""
    from quanta.internal import CONSUMER_TO_COORDINATOR, HOPS, SWITCH_TO_CORE, credential

    s, _ = running
    dd = DataDir(s.root)
    secret = dd.internal_secret()
    port = load_settings(s.root).port("coordinator")
    presented = credential(secret, SWITCH_TO_CORE)  # a real credential, at the wrong hop
    r = httpx.get(f"https://127.0.0.1:{port}/Coordinator/health", verify=False, timeout=10,
                  headers={"Authorization": f"Bearer {presented}"})
    assert r.status_code == 401
    ok = httpx.get(f"https://127.0.0.1:{port}/Coordinator/health", verify=False, timeout=10,
                   headers={"Authorization": f"Bearer {credential(secret, CONSUMER_TO_COORDINATOR)}"})
    assert ok.status_code == 200
    password = dict(line.split("=", 1) for line in dd.admin_credentials.read_text().split())["password"]
    login = httpx.post(f"https://127.0.0.1:{s.https}/Consumer/Authentication/Token", verify=False, timeout=10,
                       json={"username": "admin", "password": password + "x"})
    assert login.status_code in (401, 429)
    texts = s.log_text() + "".join(p.read_text(errors="replace") for p in dd.logs.glob("*") if p.is_file())
    assert "refused" in texts
    for needle in [secret.hex(), password, *(credential(secret, h) for h in HOPS)]:
        assert needle not in texts
