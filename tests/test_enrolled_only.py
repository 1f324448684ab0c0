"""Only enrolled devices are registered: a name a Switch announces that was never enrolled (or is
revoked) is neither created nor targeted, through the Core and through a real server with real
agents over mutual TLS."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import sqlalchemy as sa

from conftest import Server, quanta, wait_until
from quanta import protocol as p
from quanta.core.service import Core, SwitchLink
from quanta.db import make_engine, migrate, store, tables



def test_the_core_registers_only_enrolled_devices(db_url: str) -> None:
    migrate(db_url, "master")
    migrate(db_url, "responses")
    engine = make_engine(db_url)
    store.register_devices(engine, [("known", "s1"), ("revoked", "s2")])
    store.mark_revoked(engine, "revoked")
    now = time.time()
    with engine.begin() as c:
        c.execute(tables.instructions.insert().values(
            id=7, name="q", kind="question", payload="@x = Device.GetSummary();", parameters={}, scope=None,
            created_by="t", created_at=now, expires_at=now + 600, response_expires_at=now + 3600,
            status="created", body=b"body", signature=b"sig"))
    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(data)

    async def go() -> dict:
        core = Core(engine, engine, b"s" * 32)
        await core.start()
        link = SwitchLink("switch-1", "127.0.0.1", 1, "inc", send)
        info = [p.DeviceInfo(device_id=d, fqdn=f"{d}.x", os="Linux", agent_version="1")
                for d in ("known", "revoked", "localhost", "interaction-cert")]
        await core.handle(link, p.DevicesOnline(devices=info))
        try:
            return await core.issue(7)
        finally:
            await core.stop()

    issued = asyncio.run(go())
    devs = {d["device_id"]: d for d in store.list_devices(engine)}
    assert set(devs) == {"known", "revoked"}
    assert devs["known"]["online"] and not devs["revoked"]["online"]
    assert issued["targeted"] == 1  # a question to every device waits for no phantom


@pytest.mark.slow
def test_an_agent_that_was_never_enrolled_is_not_registered(server: Server) -> None:
    """A certificate of the server's CA whose name has no enrolment (here: enrolled, then its
    record removed, as for a certificate issued outside ``quanta enroll``) connects over real
    TLS; it is not created, and a question to every device finishes with the enrolled one."""
    server.enroll("member")
    server.enroll("stray")
    master = make_engine(f"sqlite:///{server.root / 'master.db'}")
    try:
        with master.begin() as c:
            c.execute(tables.devices.delete().where(tables.devices.c.device_id == "stray"))
        server.start_agent("stray")
        server.start_agent("member")
        server.wait_online({"member"})
        wait_until(lambda: "connected to switch" in server.agent_log("stray"), 30, "the stray agent's hello", server)
        r = quanta("ask", str(server.root), "@x = Device.GetSummary();", "--json", "--wait", "30")
        out = json.loads(r.stdout)
        assert out["states"] == {"success": 1}, out
        assert [x["device"] for x in out["responses"]] == ["member"]
        with master.connect() as c:
            ids = {row[0] for row in c.execute(sa.select(tables.devices.c.device_id))}
        assert ids == {"member"}
    finally:
        master.dispose()
