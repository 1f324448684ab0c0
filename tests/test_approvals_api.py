"""Approvals through the Consumer API (issue 11): the Coordinator's 202 is passed on, the status
shows who approved of how many and why an approved action is not issued, the approval routes
resolve the instruction as the caller may see it (404 otherwise), an approved-but-not-issued
action can be cancelled and the Core then never runs it, and an action the Core never took before
its gather window ended becomes final.

The Consumer API runs in process (TestClient) against real SQLite stores; the Coordinator and the
Core are their real ASGI apps served by uvicorn on real sockets in this process, the Core started
only when a test wants it up (until then its port refuses connections, as a Core that is down).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy.pool import NullPool

from conftest import free_port, wait_until
from quanta import instructions as ins
from quanta import rbac
from quanta.consumer_api.app import ConsumerApi, create_app, hash_password
from quanta.coordinator import Coordinator
from quanta.coordinator.app import create_app as coordinator_app
from quanta.core.app import create_app as core_app
from quanta.core.service import Core
from quanta.db import make_engine, migrate, store, tables
from quanta.internal import CONSUMER_TO_CORE, COORDINATOR_TO_CORE, CONSUMER_TO_COORDINATOR, credential
from quanta.pki import Pki, Signer
from quanta.roles import FULL_ADMIN

PASSWORD = "correct horse battery staple"
SECRET = b"s" * 32
ACTION = 'NativeServices.RunCommand(CommandLine: "true");'


class Served:
    """An ASGI app served by uvicorn on 127.0.0.1:``port`` in a thread of its own."""

    def __init__(self, app: Any, port: int) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 20, "server started")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


@dataclass
class World:
    api: ConsumerApi
    client: TestClient
    coord: Coordinator
    master: sa.Engine
    responses: sa.Engine
    core_port: int
    tokens: dict[str, dict[str, str]] = field(default_factory=dict)
    core: Served | None = None

    def h(self, user: str) -> dict[str, str]:
        if user not in self.tokens:
            r = self.client.post("/Consumer/Authentication/Token", json={"username": user, "password": PASSWORD})
            assert r.status_code == 200, r.text
            self.tokens[user] = {"Authorization": f"Bearer {r.json()['token']}"}
        return self.tokens[user]

    def post(self, user: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.client.post(f"/Consumer/Instructions{path}", json=body or {}, headers=self.h(user))

    def get(self, user: str, path: str) -> Any:
        return self.client.get(f"/Consumer/Instructions{path}", headers=self.h(user))

    def ask(self, devices: list[str] | None = None, ttl: int = 60) -> int:
        r = self.client.post("/Consumer/Instructions", headers=self.h("req"),
                             json={"payload": ACTION, "devices": devices, "instruction_ttl": ttl})
        assert r.status_code == 201 and r.json()["status"] == ins.PENDING_APPROVAL, r.text
        return int(r.json()["id"])

    def row(self, iid: int) -> dict[str, Any]:
        r = store.get_instruction(self.master, iid)
        assert r is not None
        return r

    def start_core(self) -> Core:
        core = Core(self.master, self.responses, SECRET)
        self.core = Served(core_app(core, SECRET), self.core_port)
        return core


def _stores(tmp_path: Path) -> tuple[sa.Engine, sa.Engine, Signer]:
    urls = {w: f"sqlite:///{tmp_path / f'{w}.db'}" for w in ("master", "responses")}
    for which, url in urls.items():
        migrate(url, which)
    pki = Pki(tmp_path / "pki")
    pki.create("localhost")
    return make_engine(urls["master"]), make_engine(urls["responses"], poolclass=NullPool), Signer.from_file(pki.signing_key)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    urls = {w: f"sqlite:///{tmp_path / f'{w}.db'}" for w in ("master", "responses")}
    for which, url in urls.items():
        migrate(url, which)
    pki = Pki(tmp_path / "pki")
    pki.create("localhost")
    master = make_engine(urls["master"])
    responses = make_engine(urls["responses"], poolclass=NullPool)
    signer = Signer.from_file(pki.signing_key)
    core_port, coord_port = free_port(), free_port()
    core_url = f"http://127.0.0.1:{core_port}"
    coord = Coordinator(master, signer, core_url, credential(SECRET, COORDINATOR_TO_CORE), loop_interval=0.1,
                        retry_min=0.1, retry_max=0.3, issue_timeout=3.0)
    served = Served(coordinator_app(coord, SECRET), coord_port)
    api = ConsumerApi(master, responses, signer, core_url=core_url, core_token=credential(SECRET, CONSUMER_TO_CORE),
                      coordinator_url=f"http://127.0.0.1:{coord_port}",
                      coordinator_token=credential(SECRET, CONSUMER_TO_COORDINATOR))
    hashed = hash_password(PASSWORD)
    with master.begin() as c:
        c.execute(tables.users.insert(), [dict(username=u, password_hash=hashed, role=r, created_at=time.time())
                                          for u, r in (("req", FULL_ADMIN), ("admin2", FULL_ADMIN),
                                                       ("alice", "Approver"), ("bob", "Approver"),
                                                       ("far", "Approver"), ("viewer", "Viewer"),
                                                       ("questioner", "Questioner"))])
    for i, name in enumerate(("dev1", "dev2")):
        store.register_device(master, name, f"{i + 1:04x}")
    rbac.set_group(master, "g1", {"devices": ["dev1"]})
    rbac.set_group(master, "g2", {"devices": ["dev2"]})
    for u in ("alice", "bob", "viewer", "questioner"):
        rbac.add_member(master, u, "g1")
    rbac.add_member(master, "far", "g2")  # an Approver who sees dev2 only
    client = TestClient(create_app(api))
    w = World(api, client, coord, master, responses, core_port)
    try:
        yield w
    finally:
        client.close()
        if w.core is not None:
            w.core.stop()
        served.stop()
        master.dispose()
        responses.dispose()


# ------------------------------------------------------------------ who may act on an approval
def test_an_approver_who_may_not_see_it_gets_404_like_a_missing_one(world: World) -> None:
    iid = world.ask(["dev1"])
    missing = 10**9
    for user in ("far", "viewer"):  # far: an Approver of dev2's group; viewer: no approve right
        for verb in ("Approve", "Reject", "ApprovalCode", "Cancel"):
            body = {"reason": "r"} if verb == "Reject" else {}
            r, gone = world.post(user, f"/{iid}/{verb}", body), world.post(user, f"/{missing}/{verb}", body)
            if user == "viewer" and verb != "Cancel":  # it sees dev1: it finds it, the Coordinator refuses
                assert r.status_code == 403, (user, verb, r.text)
            elif user == "viewer":
                assert r.status_code == 403 and "requester or a Full Administrator" in r.text, r.text
            else:
                assert r.status_code == 404 and r.json() == {"detail": f"instruction {iid} not found"}, (verb, r.text)
            assert gone.status_code == 404 and gone.json() == {"detail": f"instruction {missing} not found"}
    assert world.row(iid)["status"] == ins.PENDING_APPROVAL
    assert ins.approvals_of(world.master, iid) == []
    # the same approver may act on one of dev2: visibility, not the role, was the reason
    iid2 = world.ask(["dev2"])
    r = world.post("far", f"/{iid2}/Reject", {"reason": "not on my devices"})
    assert r.status_code == 200 and r.json()["status"] == ins.REJECTED, r.text
    # careless input: a reason too long, an unknown field, a negative or huge id
    assert world.post("alice", f"/{iid}/Approve", {"reason": "x" * 2001}).status_code == 422
    assert world.post("alice", f"/{iid}/Approve", {"approver": "bob"}).status_code == 422
    assert world.post("alice", "/-1/Approve").status_code == 422
    assert world.post("alice", "/99999999999999999999/Approve").status_code == 422
    assert world.post("req", f"/{iid}/Reject", {}).status_code in (403, 422)  # no reason, and the requester
    assert world.row(iid)["status"] == ins.PENDING_APPROVAL


# ------------------------------------------------------------------ N of M through the Consumer API
def test_partial_approval_is_202_and_the_status_shows_the_approvals(world: World) -> None:
    ins.set_approvers_required(world.master, "*", 2)
    iid = world.ask(["dev1"])
    st = world.get("viewer", f"/{iid}").json()
    assert (st["approvers_required"], st["approvals"], st["issue_error"]) == (2, [], None)
    r = world.post("alice", f"/{iid}/Approve", {"reason": "ticket 1"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == ins.PENDING_APPROVAL and body["approvers"] == ["alice"]
    assert body["approvers_required"] == 2 and "1 more approval(s) needed" in body["message"]
    st = world.get("viewer", f"/{iid}").json()
    assert st["status"] == ins.PENDING_APPROVAL and st["approvers_required"] == 2
    [a] = st["approvals"]
    assert a["approver"] == "alice" and a["reason"] == "ticket 1" and abs(a["approved_at"] - time.time()) < 60
    again = world.post("alice", f"/{iid}/Approve")
    assert again.status_code == 409 and "already approved" in again.json()["detail"]
    # the second approval completes it; the Core is down: 202 again, approved, not issued, retrying
    r = world.post("bob", f"/{iid}/Approve", {"reason": "ticket 2"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["status"], body["issued"], body["retrying"]) == (ins.READY, False, True)
    assert body["approvers"] == ["alice", "bob"] and "as soon as the Core is back" in body["message"]
    st = world.get("viewer", f"/{iid}").json()
    assert st["status"] == ins.READY and st["decided_by"] == "bob"
    assert [x["approver"] for x in st["approvals"]] == ["alice", "bob"]
    assert st["issue_error"] and "unreachable" in st["issue_error"]
    # the Core comes up: the Coordinator's retry issues it; 200 from now on, issue_error cleared
    world.start_core()
    wait_until(lambda: world.row(iid)["status"] in ("active", "finished"), 30, "issued after the Core came back")
    st = world.get("viewer", f"/{iid}").json()
    assert st["issue_error"] is None and len(st["approvals"]) == 2
    # a question never had approvals
    q = world.client.post("/Consumer/Instructions", headers=world.h("req"),
                          json={"payload": "@x = Device.GetSummary();", "devices": ["dev1"]})
    assert q.status_code == 201, q.text
    st = world.get("req", f"/{q.json()['id']}").json()
    assert (st["approvers_required"], st["approvals"], st["issue_error"]) == (None, [], None)


def test_a_rejection_is_200_and_a_one_of_one_approval_with_the_core_up_is_200(world: World) -> None:
    world.start_core()
    iid = world.ask(["dev1"])
    r = world.post("alice", f"/{iid}/Approve", {"reason": "fine"})
    assert r.status_code == 200 and r.json()["status"] in ("active", "finished") and r.json()["issued"] is True
    iid2 = world.ask(["dev1"])
    r = world.post("bob", f"/{iid2}/Reject", {"reason": "no"})
    assert r.status_code == 200 and r.json() == {"id": iid2, "status": ins.REJECTED}
    # the Coordinator's audit rows name the approver's address, passed on by the Consumer API
    from quanta.accounts import audit

    rows = {(e.action, e.object): e for e in audit.query(world.master, limit=1000).items}
    assert rows[("approve", f"instruction:{iid}")].source == "testclient"  # TestClient's peer address
    assert rows[("reject", f"instruction:{iid2}")].source == "testclient"


# ------------------------------------------------------------------ cancel an approved, unissued action
def test_cancel_of_an_approved_unissued_action_sticks_and_the_core_never_runs_it(world: World) -> None:
    iid = world.ask(["dev1"], ttl=120)
    r = world.post("alice", f"/{iid}/Approve")
    assert r.status_code == 202 and r.json()["status"] == ins.READY, r.text
    assert world.post("alice", f"/{iid}/Cancel").status_code == 403  # an approver is not the requester
    r = world.post("req", f"/{iid}/Cancel")
    assert r.status_code == 200 and r.json() == {"id": iid, "status": ins.CANCELLED}, r.text
    row = world.row(iid)
    assert (row["status"], row["decided_by"], row["issue_error"]) == (ins.CANCELLED, "req", None)
    assert "after approval" in row["decision_reason"]
    assert [a["approver"] for a in ins.approvals_of(world.master, iid)] == ["alice"]  # still on record
    again = world.post("req", f"/{iid}/Cancel")
    assert again.status_code == 409 and "nothing to cancel" in again.json()["detail"]
    # the Core comes back; the retry finds it cancelled and stops; asked anyway (a stale retry,
    # another Coordinator), the Core refuses to bring it back
    core = world.start_core()
    wait_until(lambda: iid not in world.coord._issuing, 10, "the retry gave up")
    import httpx

    r = httpx.post(f"http://127.0.0.1:{world.core_port}/Core/Instructions/{iid}/Issue",
                   headers={"Authorization": f"Bearer {credential(SECRET, COORDINATOR_TO_CORE)}"}, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == ins.CANCELLED and r.json()["targeted"] == 0
    assert world.row(iid)["status"] == ins.CANCELLED and iid not in core.active
    assert store.state_counts(world.responses, iid) == {}  # no device was ever targeted
    assert world.get("req", f"/{iid}").json()["status"] == ins.CANCELLED


async def test_the_core_never_resurrects_an_instruction_cancelled_while_it_issues(tmp_path: Path) -> None:
    """The cancel lands between the Core's read of the row (created) and its activation: the
    activation is a compare-and-set, so the instruction stays cancelled and nothing is sent."""
    master, responses, signer = _stores(tmp_path)
    store.register_device(master, "dev1", "0001")
    with master.begin() as c:  # online: it would be sent at once
        c.execute(tables.devices.update().values(switch="switch-1", online=True))
    iid, _ = ins.create(master, created_by="req", name="act", kind="action", payload=ACTION, parameters={},
                     devices=["dev1"], instruction_ttl=60, response_ttl=600, status=ins.NEW)
    assert ins.sign(master, signer, iid, expect=(ins.NEW,))
    core = Core(master, responses, SECRET)
    targets = store.target_devices

    def cancelled_meanwhile(engine: sa.Engine, scope: Any) -> Any:  # the Consumer API's cancel, right then
        assert ins.cancel(master, iid, by="req", expect=ins.READY)
        return targets(engine, scope)

    store.target_devices = cancelled_meanwhile  # type: ignore[assignment]
    try:
        answer = await core.issue(iid)
    finally:
        store.target_devices = targets  # type: ignore[assignment]
    assert answer == {"id": iid, "status": ins.CANCELLED, "targeted": 0}
    assert store.get_instruction(master, iid)["status"] == ins.CANCELLED  # type: ignore[index]
    assert iid not in core.active
    counts = store.state_counts(responses, iid)
    assert counts and not set(counts) & {"pending", "sent"}, counts  # nothing left to send
    assert not ins.cancel(master, iid, by="req", expect=ins.READY)  # once
    with pytest.raises(ValueError):
        ins.cancel(master, iid, by="req", expect="active")  # the Core's business, not a row update
    master.dispose()
    responses.dispose()


# ------------------------------------------------------------------ the Core stays down past the window
def test_core_down_past_the_gather_window_ends_final_and_wait_returns(world: World) -> None:
    iid = world.ask(["dev1"], ttl=2)
    r = world.post("alice", f"/{iid}/Approve")
    assert r.status_code == 202 and r.json()["retrying"] is True, r.text
    t0 = time.monotonic()
    w = world.client.get(f"/Consumer/Instructions/{iid}/Wait", params={"timeout": 30}, headers=world.h("req"))
    assert w.status_code == 200 and time.monotonic() - t0 < 20, w.text
    st = w.json()
    assert st["status"] == ins.NEVER_ISSUED == "expired"
    assert st["issue_error"].startswith("never issued: the Core was unavailable"), st
    assert st["decided_by"] == "alice" and [a["approver"] for a in st["approvals"]] == ["alice"]
    assert ins.NEVER_ISSUED in ins.DONE_STATES
    with world.master.connect() as c:
        acts = [r.action for r in c.execute(sa.select(tables.audit_log.c.action)
                                            .where(tables.audit_log.c.target == f"instruction:{iid}"))]
    assert acts.count("never_issued") == 1
    # the Core comes back afterwards: nothing brings it back; cancel and approve are refused
    world.start_core()
    time.sleep(0.5)  # a few Coordinator ticks (0.1 s)
    assert world.row(iid)["status"] == ins.NEVER_ISSUED
    assert store.state_counts(world.responses, iid) == {}
    assert world.post("req", f"/{iid}/Cancel").status_code == 409
    assert world.post("bob", f"/{iid}/Approve").status_code == 409


async def test_the_sweep_ends_one_signed_before_a_restart_once(tmp_path: Path, db_url: str) -> None:
    """Signed and never issued while no Coordinator ran (no retry under way): the timer's sweep
    ends it, once, even with sweeps racing; one still inside its window is left alone (SQLite and
    PostgreSQL)."""
    _, responses, sig = _stores(tmp_path)
    migrate(db_url, "master")
    master = make_engine(db_url)
    past, _ = ins.create(master, created_by="req", name="act", kind="action", payload=ACTION, parameters={},
                      devices=["dev1"], instruction_ttl=1, response_ttl=600, status=ins.NEW)
    young, _ = ins.create(master, created_by="req", name="act", kind="action", payload=ACTION, parameters={},
                       devices=["dev1"], instruction_ttl=300, response_ttl=600, status=ins.NEW)
    for i in (past, young):
        assert ins.sign(master, sig, i, expect=(ins.NEW,))
    assert not ins.never_issued(master, young, why="too early")  # its window is open
    with master.begin() as c:  # its window ended an hour ago
        c.execute(tables.instructions.update().where(tables.instructions.c.id == past)
                  .values(expires_at=time.time() - 3600, issued_at=time.time() - 3700))
    other = Coordinator(master, sig, "http://127.0.0.1:9", "t")
    assert await other.db(other._unissued_past_window) == [(past, None)]
    results = await asyncio.gather(*(other._end_unissued(past, "gone") for _ in range(4)))
    assert sorted(results) == [False, False, False, True]
    ended, left = store.get_instruction(master, past), store.get_instruction(master, young)
    assert ended is not None and left is not None
    assert (ended["status"], left["status"]) == (ins.NEVER_ISSUED, ins.READY)
    assert ended["issue_error"] == "never issued: the Core was unavailable until its gather window ended (gone)"
    await other.tick()  # the sweep: nothing more to end; the young one is for the retry, not the sweep
    assert store.get_instruction(master, young)["status"] == ins.READY  # type: ignore[index]
    await other.stop()
    master.dispose()
    responses.dispose()


def test_cancel_racing_the_last_approval_still_cancels_and_nothing_runs(world: World,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The last approval lands between the Consumer API's read (pending) and its compare-and-set:
    the cancel follows the instruction to ``created`` and cancels it there."""
    iid = world.ask(["dev1"], ttl=120)
    real = ins.cancel
    calls: list[str] = []

    def approved_first(engine: sa.Engine, i: int, *, by: str, expect: str) -> bool:
        calls.append(expect)
        if len(calls) == 1:
            assert ins.approve(world.master, world.coord.signer, i, by="alice", reason="just now").status == ins.READY
        return real(engine, i, by=by, expect=expect)

    monkeypatch.setattr(ins, "cancel", approved_first)
    r = world.post("req", f"/{iid}/Cancel")
    assert r.status_code == 200 and r.json()["status"] == ins.CANCELLED, r.text
    assert calls == [ins.PENDING_APPROVAL, ins.READY]
    row = world.row(iid)
    assert (row["status"], row["decided_by"]) == (ins.CANCELLED, "req")
    world.start_core()
    r = world.post("alice", f"/{iid}/Approve")
    assert r.status_code == 409 and "cancelled, not pending approval" in r.json()["detail"]
    assert store.state_counts(world.responses, iid) == {}
