"""Issue 10 with real processes, real sockets and real mutual TLS: what one device sends touches only
its own answer; final counts stay final; a device that lost its journal is not given an action again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from websockets.sync.client import ClientConnection, connect

from conftest import Server, make_server, quanta, wait_until
from quanta import protocol as p
from test_switch_bad_input import _ctx

pytestmark = pytest.mark.slow

SUMMARY = "@s = Device.GetSummary(); SELECT * FROM @s;"


def _ask(server: Server, *args: str, wait: int = 20) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "quanta", "ask", str(server.root), *args, "--json", "--wait-approval", "--wait",
                             str(wait)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    stdout, stderr = proc.communicate(timeout=120)
    assert stdout.strip(), stderr
    return json.loads(stdout)


def _next(ws: ClientConnection, kind: type, timeout: float = 30) -> Any:
    while True:
        msg = p.decode_from_switch_for_agent(ws.recv(timeout=timeout))
        if isinstance(msg, kind):
            return msg


def _device(server: Server, name: str) -> ClientConnection:
    """A hand-driven device: its own enrolled certificate, a hello, the Switch's welcome."""
    ws = connect(f"wss://localhost:{server.switch}/agent", ssl=_ctx(server, name), open_timeout=30, max_size=None)
    ws.send(p.encode(p.Hello(device_id=name, fqdn=name, os="Linux", agent_version="x")))
    _next(ws, p.Welcome)
    return ws


def _api(server: Server, path: str) -> Any:
    """GET a Consumer API path as the administrator, over the real HTTPS port."""
    creds = dict(line.split("=", 1) for line in (server.root / "admin.credentials").read_text().split())
    with httpx.Client(base_url=f"https://127.0.0.1:{server.https}", verify=False, timeout=30) as c:
        r = c.post("/Consumer/Authentication/Token", json=creds)
        r.raise_for_status()
        got = c.get(path, headers={"Authorization": f"Bearer {r.json()['token']}"})
        got.raise_for_status()
        return got.json()


def _raw(fields: dict[str, Any]) -> Callable[[int], bytes]:
    return lambda iid: msgspec.msgpack.encode({"type": "response", "instruction_id": iid, "status": "success",
                                               "columns": ["X"], **fields})


HOSTILE = {
    "extension value": _raw({"rows": [[msgspec.msgpack.Ext(1, b"x")]]}),
    "map with a nil key": _raw({"rows": [[{None: 1}]]}),
    "integer past int64": _raw({"rows": [[2**64 - 1]]}),
    "NUL in the error text": _raw({"status": "error", "error": "a\x00b"}),
}


def test_hostile_answers_are_refused_one_by_one_and_the_core_link_holds(server: Server) -> None:
    for n in ("good1", "good2", "rogue"):
        server.enroll(n)
    server.start_agent("good1")
    server.start_agent("good2")
    server.wait_online({"good1", "good2"})
    rogue = _device(server, "rogue")
    server.wait_online({"rogue"})
    for label, make in HOSTILE.items():
        proc = _ask(server, SUMMARY)
        deliver = _next(rogue, p.Deliver)
        iid = p.decode_body(deliver.instruction.body).id
        rogue.send(make(iid))
        out = _result(proc)
        assert out["states"] == {"success": 2, "error": 1}, (label, out)
        [bad] = [r for r in out["responses"] if r["device"] == "rogue"]
        assert bad["error"].startswith("response refused by the switch: "), (label, bad)
        # its answer is final and acknowledged: the device may forget it (no resend loop)
        assert iid in _next(rogue, p.ResponseAck).instruction_ids, label
    log = server.log_text()
    assert "device answer refused: out of the protocol's bounds (device rogue at" in log
    assert "core link down" not in log and "closing switch link" not in log
    assert "lost connection" not in server.agent_log("good1") + server.agent_log("good2")
    # an answer whose instruction id itself is out of range is not attributable: only that
    # connection is closed, with the reason
    rogue.send(_raw({})(2**64 - 1))
    with pytest.raises(Exception):
        while True:
            rogue.recv(timeout=15)
    assert rogue.close_code == 1002 and "malformed message" in (rogue.close_reason or "")
    out = _result(_ask(server, SUMMARY, "--device", "good1", "--device", "good2"))
    assert out["states"] == {"success": 2}


def test_a_late_answer_is_held_and_the_final_counts_stay_final(server: Server) -> None:
    for n in ("dev1", "ghost"):
        server.enroll(n)
    server.start_agent("dev1")
    server.wait_online({"dev1"})
    out = _result(_ask(server, SUMMARY, wait=3))
    assert out["status"] == "finished" and out["states"] == {"success": 1, "offline": 1}, out
    iid = out["instruction_id"]
    ghost = _device(server, "ghost")  # comes online after the end, and answers anyway
    ghost.send(p.encode(p.Response(instruction_id=iid, status="success", columns=["X"], rows=[["late"]])))
    assert iid in _next(ghost, p.ResponseAck).instruction_ids  # kept, so acknowledged
    page = _api(server, f"/Consumer/Instructions/{iid}/Responses")
    assert page["held"] == {"late": 1}
    assert {r["device"]: r["status"] for r in page["rows"]} == {"dev1": "success", "ghost": "offline"}
    [h] = _api(server, f"/Consumer/Instructions/{iid}/Held")["items"]
    assert h["device"] == "ghost" and h["rows"] == [["late"]] and "had already ended" in h["reason"]
    assert _api(server, f"/Consumer/Instructions/{iid}")["states"] == {"success": 1, "offline": 1}
    assert "held 1 late answers" in server.log_text()


@pytest.fixture
def approvals(tmp_path: Path) -> Iterator[Server]:
    s = make_server(tmp_path)
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery staple")
    quanta("user", "add", str(s.root), "--username", "bob", "--role", "Approver", "--password-file", str(pw))
    s.password_file = pw  # type: ignore[attr-defined]
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_a_device_that_lost_its_journal_is_not_given_an_action_again(approvals: Server, tmp_path: Path) -> None:
    s = approvals
    agent_dir = s.enroll("a1")
    s.enroll("a2")  # targeted but offline: the action stays active for its whole window
    s.start_agent("a1")
    s.wait_online({"a1"})
    markers = tmp_path / "markers"
    markers.mkdir()
    action = f'NativeServices.RunCommand(CommandLine: "mktemp -p {markers}");'
    proc = _ask(s, action, "--device", "a1", "--device", "a2", wait=90)
    pending = "/Consumer/Instructions?status=pending_approval"
    wait_until(lambda: _api(s, pending)["items"], 30, "the action awaiting approval")
    [iid] = [i["id"] for i in _api(s, pending)["items"]]
    quanta("approve", str(s.root), str(iid), "--user", "bob", "--password-file", str(s.password_file))  # type: ignore[attr-defined]
    wait_until(lambda: len(list(markers.iterdir())) == 1, 30, "the action ran once")
    wait_until(lambda: _api(s, f"/Consumer/Instructions/{iid}")["states"] == {"success": 1, "offline": 1}, 30,
               "answer committed")
    # the device loses its journal, and its Switch dies (so the Switch's own memory is gone too),
    # while the action is still active
    s.stop_agent("a1")
    (agent_dir / "state" / "journal.msgpack").unlink()
    [switch_pid] = s.pids(f"quanta switch {s.root}")
    os.kill(switch_pid, signal.SIGKILL)
    wait_until(lambda: s.pids(f"quanta switch {s.root}") not in ([], [switch_pid]), 30, "switch restart", s)
    s.start_agent("a1")
    wait_until(lambda: s.agent_log("a1").count("connected to switch") >= 2, 60, "a1 reconnected", s)
    assert _api(s, f"/Consumer/Instructions/{iid}")["status"] == "active"
    # a question asked now reaches a1 after everything the Switch would have re-delivered
    out = _result(_ask(s, SUMMARY, "--device", "a1"))
    assert out["states"] == {"success": 1}, out
    assert len(list(markers.iterdir())) == 1, "the action ran again on the device that lost its journal"
    proc.kill()
    proc.communicate()
