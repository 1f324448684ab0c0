"""The agent's interaction port (7766): a prompt from an (approved) action reaches the user
session's client, and the user's answer comes back as the instruction's result."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websockets
from websockets.sync.client import connect

from conftest import Server, quanta, wait_until

pytestmark = pytest.mark.slow

QUESTION = ('Interaction.ShowQuestion(Title: "Maintenance", Description: "Reboot tonight at 22:00?", '
            'TimeoutSeconds: %d);')


def _approve_as_bob(server: Server, tmp_path: Path, iid: int) -> None:
    quanta("approve", str(server.root), str(iid), "--user", "bob", "--password-file", str(tmp_path / "pw"))


def test_user_answers_a_prompt(server: Server, tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("a sufficiently long password")
    quanta("user", "add", str(server.root), "--username", "bob", "--role", "Approver", "--password-file",
           str(tmp_path / "pw"))
    agent = server.enroll("desk1")
    server.start_agent("desk1")
    server.wait_online({"desk1"})
    wait_until(lambda: "interaction port listening" in server.agent_log("desk1"), 15, "interaction port")
    # a client without the session token is refused before anything else is read
    import ssl

    ctx = ssl.create_default_context(cafile=str(agent / "ca.crt"))
    port = int([ln for ln in (agent / "agent.conf").read_text().splitlines()
                if ln.startswith("Module.Interaction.Port=")][0].split("=")[1])
    with connect(f"wss://127.0.0.1:{port}/", ssl=ctx, server_hostname="quanta-interaction.desk1",
                 open_timeout=20) as ws:
        ws.send(json.dumps({"type": "auth", "token": "guess"}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert "authenticate first" in closed.value.rcvd.reason

    # the user's session client answers "Yes"
    user = subprocess.Popen([sys.executable, "-m", "quanta", "prompt", str(agent), "--answer", "Yes", "--once"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    asker = subprocess.Popen([sys.executable, "-m", "quanta", "ask", str(server.root), QUESTION % 60, "--json",
                              "--wait", "60", "--wait-approval"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from quanta.client import ConsumerClient

    with ConsumerClient.for_data_dir(server.root) as api:
        wait_until(lambda: api.http.get("/Consumer/Instructions", params={"status": "pending_approval"}).json()["items"],
                   20, "pending action", server)
        iid = api.http.get("/Consumer/Instructions", params={"status": "pending_approval"}).json()["items"][0]["id"]
    _approve_as_bob(server, tmp_path, iid)
    out = json.loads(asker.communicate(timeout=90)[0])
    user_out, _ = user.communicate(timeout=30)
    assert "Reboot tonight at 22:00?" in user_out and "answered 1 prompt" in user_out
    assert out["states"] == {"success": 1}
    assert out["responses"][0]["rows"] == [{"Response": "Yes"}]


def test_unanswered_prompt_times_out(server: Server, tmp_path: Path) -> None:
    from quanta.agent.config import load_agent_config
    from quanta.agent.runtime import run_instruction
    from quanta import protocol as p
    from quanta.agent.interaction import InteractionHub

    agent = server.enroll("desk2")
    cfg = load_agent_config(agent)
    hub = InteractionHub("t")
    import asyncio

    hub.loop = asyncio.new_event_loop()  # no user session connected: the prompt just waits
    body = p.InstructionBody(id=1, name="q", kind="action", payload=QUESTION % 1, parameters={}, issued_at=0,
                             expires_at=time.time() + 60)
    started = time.monotonic()
    r = run_instruction(body, cfg, hub.ask)
    assert r.status == "success" and r.rows == [["TimedOut"]]
    assert time.monotonic() - started < 5
    # and without an interaction port at all, a clear error
    r = run_instruction(body, cfg, None)
    assert r.status == "error" and "no interactive user session" in r.error
