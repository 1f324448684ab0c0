"""Issue 12 with real processes over real mutual TLS: ``Tagging.Set`` (an approved action) changes a
device's tags on the server at once, on the connection it already holds (no reconnect), and the
management groups on that tag follow; hostile tag reports (oversize, too many, a flood) touch only
their own connection."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from conftest import Server, make_server, quanta, wait_until
from quanta import protocol as p
from test_data_plane import _ask, _device, _result

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery staple"


@pytest.fixture
def tagged(tmp_path: Path) -> Iterator[Server]:
    s = make_server(tmp_path)
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    quanta("user", "add", str(s.root), "--username", "bob", "--role", "Approver", "--password-file", str(pw))
    quanta("user", "add", str(s.root), "--username", "carol", "--role", "Viewer", "--password-file", str(pw))
    quanta("group", "set", str(s.root), "--name", "paris", "--tag", "site=paris")
    quanta("group", "add-member", str(s.root), "--name", "paris", "--username", "carol")
    s.password_file = pw  # type: ignore[attr-defined]
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _devices(server: Server, user: str | None = None) -> dict[str, dict[str, Any]]:
    """GET /Consumer/Devices over the real HTTPS port, as the administrator or as ``user``."""
    if user is None:
        creds = dict(line.split("=", 1) for line in (server.root / "admin.credentials").read_text().split())
    else:
        creds = {"username": user, "password": PASSWORD}
    with httpx.Client(base_url=f"https://127.0.0.1:{server.https}", verify=False, timeout=30) as c:
        r = c.post("/Consumer/Authentication/Token", json=creds)
        r.raise_for_status()
        got = c.get("/Consumer/Devices", headers={"Authorization": f"Bearer {r.json()['token']}"})
        got.raise_for_status()
        return {d["device_id"]: d for d in got.json()}


def _approve_pending(server: Server) -> int:
    from quanta.client import ConsumerClient

    with ConsumerClient.for_data_dir(server.root) as api:
        def pending() -> list[dict[str, Any]]:
            return api.http.get("/Consumer/Instructions", params={"status": "pending_approval"}).json()["items"]

        wait_until(pending, 30, "the action awaiting approval", server)
        iid = int(pending()[0]["id"])
    quanta("approve", str(server.root), str(iid), "--user", "bob", "--password-file",
           str(server.password_file))  # type: ignore[attr-defined]
    return iid


def _tag_action(server: Server, device: str, payload: str) -> dict[str, Any]:
    proc = _ask(server, payload, "--device", device, wait=60)
    _approve_pending(server)
    out = _result(proc)
    assert out["states"] == {"success": 1}, out
    return out


def test_tagging_set_reaches_the_server_without_a_reconnect(tagged: Server) -> None:
    s = tagged
    s.enroll("desk")
    s.start_agent("desk")
    s.wait_online({"desk"})
    assert _devices(s)["desk"]["tags"] == {}
    assert _devices(s, "carol") == {}  # not in the group yet

    _tag_action(s, "desk", 'Tagging.Set(Name: "site", Value: "paris");')
    wait_until(lambda: _devices(s)["desk"]["tags"] == {"site": "paris"}, 20, "the new tag on the server", s)
    assert set(_devices(s, "carol")) == {"desk"}  # the group on that tag follows

    _tag_action(s, "desk", 'Tagging.Set(Name: "site", Value: "lyon"); Tagging.Set(Name: "owner", Value: "ops");')
    wait_until(lambda: _devices(s)["desk"]["tags"] == {"site": "lyon", "owner": "ops"}, 20, "the changed tags", s)
    assert _devices(s, "carol") == {}

    _tag_action(s, "desk", 'Tagging.Clear(Name: "owner");')
    wait_until(lambda: _devices(s)["desk"]["tags"] == {"site": "lyon"}, 20, "the cleared tag", s)
    # all on the one connection the agent held from the start
    assert s.agent_log("desk").count("connected to switch") == 1, s.agent_log("desk")[-3000:]


def test_hostile_tag_reports_touch_only_their_own_connection(tagged: Server) -> None:
    s = tagged
    for n in ("good", "rogue", "flood"):
        s.enroll(n)
    s.start_agent("good")
    s.wait_online({"good"})
    # oversize and too many tags: that connection is closed as malformed, nothing is written
    for bad in ({"k": "v" * 1025}, {str(i): "" for i in range(p.MAX_TAGS + 1)}, {"k": "line\nbreak"}):
        rogue = _device(s, "rogue")
        rogue.send(msgspec.msgpack.encode({"type": "tags", "tags": bad}))
        with pytest.raises(Exception):
            while True:
                rogue.recv(timeout=15)
        assert rogue.close_code == 1002 and "malformed message" in (rogue.close_reason or ""), rogue.close_reason
    assert _devices(s)["rogue"]["tags"] == {}
    # a flood of reports from one device: its connection stays, and only its latest tags are kept
    flood = _device(s, "flood")
    s.wait_online({"flood"})
    for i in range(5000):
        flood.send(p.encode(p.TagReport(tags={"n": str(i), "pad": "x" * 500})))
    wait_until(lambda: _devices(s)["flood"]["tags"].get("n") == "4999", 30, "the flood's latest tags", s)
    flood.ping().wait(10)  # still connected
    # the others are untouched: the real agent answers, on its first connection
    out = _result(_ask(s, "@s = Device.GetSummary(); SELECT * FROM @s;", "--device", "good"))
    assert out["states"] == {"success": 1}, out
    assert s.agent_log("good").count("connected to switch") == 1
    log = s.log_text()
    assert "core link down" not in log and "closing switch link" not in log
