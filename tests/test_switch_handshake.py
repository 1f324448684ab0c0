"""The Switch's TLS stack at the handshake: aiofastnet's engine no longer decodes every peer
certificate through a temporary file (quanta.switch.tls.skip_peer_decoding), and the certificate
the Switch reads itself (binary DER) is still there. A real picows server and client over real
mutual TLS, in one process."""

from __future__ import annotations

import asyncio
import ssl
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from picows import WSListener, WSMsgType, WSTransport, ws_connect, ws_create_server

from quanta.pki import Pki, peer_device
from quanta.switch.tls import direct_engine_available, lean_tls


@pytest.mark.skipif(not direct_engine_available(), reason="aiofastnet's direct OpenSSL engine is not available here")
def test_the_handshake_writes_no_file_and_keeps_the_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = Pki(tmp_path / "pki")
    pki.create("localhost")
    pki.issue("dev-1", tmp_path / "d.crt", tmp_path / "d.key")
    spool = tmp_path / "tmpdir"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))  # where the engine's decode wrote its file
    seen: list[tuple[object, bytes | None, list[str]]] = []
    written: list[str] = []

    class Server(WSListener):
        def on_ws_connected(self, t: WSTransport) -> None:
            under = t.underlying_transport
            der = under.get_extra_info("ssl_object").getpeercert(binary_form=True)
            written.extend(p.name for p in spool.iterdir())
            seen.append((under.get_extra_info("peercert"), der, []))
            t.send(WSMsgType.BINARY, b"hi")

    class Client(WSListener):
        def __init__(self) -> None:
            self.got = asyncio.get_event_loop().create_future()

        def on_ws_frame(self, t: WSTransport, frame) -> None:  # type: ignore[no-untyped-def]
            if not self.got.done():
                self.got.set_result(frame.get_payload_as_bytes())

    async def main() -> None:
        ctx = lean_tls(pki.server_context(require_client_cert=True))
        server = await ws_create_server(lambda _r: Server(), "127.0.0.1", 0, ssl=ctx, use_aiofastnet=True)
        port = server.sockets[0].getsockname()[1]
        cctx = ssl.create_default_context(cafile=str(pki.ca_crt))
        cctx.load_cert_chain(tmp_path / "d.crt", tmp_path / "d.key")
        for _ in range(3):
            t, c = await ws_connect(Client, f"wss://localhost:{port}/", ssl_context=cctx)
            assert await asyncio.wait_for(c.got, 10) == b"hi"
            t.disconnect()
        server.close()

    asyncio.run(main())
    assert len(seen) == 3 and not written, written
    for peercert, der, _ in seen:
        assert peercert == {}  # the engine's decoded dict: no longer made (nothing reads it)
        assert der is not None
        serial, cn, refusal = peer_device(der)
        assert cn == "dev-1" and refusal is None
        assert serial == x509.load_pem_x509_certificate((tmp_path / "d.crt").read_bytes()).serial_number
