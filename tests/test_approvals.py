"""Approvals: one compare-and-set per decision, N-of-M approvers, no self-approval, and an
approved instruction the Core cannot take yet is retried, never issued twice.

The store tests race real threads on one instruction on SQLite and on PostgreSQL. The Core test
runs the Coordinator in this process against a real ``quanta core`` process that is down at
approval time and started afterwards. The end-to-end tests race two real HTTP clients against a
real server with real agents, and count the runs on the devices.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from conftest import Server, make_server, quanta, wait_until
from quanta import instructions as ins
from quanta.coordinator import Coordinator, WorkflowError
from quanta.db import make_engine, migrate
from quanta.db.tables import approvals, audit_log, instruction_sets, instructions, users
from quanta.signing import Signer

APPROVERS = [f"approver{i}" for i in range(8)]


def signer() -> Signer:
    key = ed25519.Ed25519PrivateKey.generate()
    return Signer(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))


@pytest.fixture
def master(db_url: str):  # type: ignore[no-untyped-def]
    migrate(db_url, "master")
    e = make_engine(db_url)
    with e.begin() as c:
        for name in ["req", *APPROVERS]:
            c.execute(users.insert().values(username=name, password_hash="x", email=f"{name}@example.com",
                                            role="Full Administrator" if name == "req" else "Approver",
                                            created_at=time.time()))
        c.execute(users.insert().values(username="viewer", password_hash="x", role="Viewer", created_at=time.time()))
    try:
        yield e
    finally:
        e.dispose()


def pending(engine: sa.Engine, *, iset: str | None = None, expires_in: float = 3600,
            scheduled_at: float | None = None) -> int:
    return ins.create(engine, created_by="req", name="act", kind="action", payload='NativeServices.RunCommand(CommandLine: "true");',
                      parameters={}, devices=["d1"], instruction_ttl=60, response_ttl=600, status=ins.PENDING_APPROVAL,
                      approval_expires_at=time.time() + expires_in, scheduled_at=scheduled_at, instruction_set=iset)[0]


def row(engine: sa.Engine, iid: int) -> Any:
    with engine.connect() as c:
        return c.execute(sa.select(instructions).where(instructions.c.id == iid)).one()


def approvers_of(engine: sa.Engine, iid: int) -> list[str]:
    return [a["approver"] for a in ins.approvals_of(engine, iid)]


def race(engine: sa.Engine, sig: Signer, iid: int, names: list[str]) -> dict[str, Any]:
    """Every name approves ``iid`` at once, each from its own thread; name -> Approval or the refusal."""
    start = threading.Barrier(len(names))

    def one(name: str) -> Any:
        start.wait()
        try:
            return ins.approve(engine, sig, iid, by=name, reason=f"ticket of {name}")
        except ins.ApprovalRefused as e:
            return e

    with ThreadPoolExecutor(len(names)) as pool:
        return dict(zip(names, pool.map(one, names)))


# ------------------------------------------------------------------------------ the store
def test_racing_approvers_one_decision_naming_its_real_author(master: sa.Engine) -> None:
    sig = signer()
    for _ in range(3):  # a race can be lucky once; three times on each database
        iid = pending(master)
        results = race(master, sig, iid, APPROVERS)
        won = [n for n, r in results.items() if isinstance(r, ins.Approval)]
        assert len(won) == 1, results
        [winner] = won
        assert results[winner].status == ins.READY and results[winner].approvers == (winner,)
        for name, r in results.items():
            if name != winner:
                assert isinstance(r, ins.ApprovalRefused) and r.status == 409, (name, r)
                assert "not pending approval" in str(r)
        r = row(master, iid)
        assert (r.status, r.decided_by, r.decision_reason) == (ins.READY, winner, f"ticket of {winner}")
        assert r.body is not None and r.signature is not None
        assert approvers_of(master, iid) == [winner]  # the losers' approvals were not recorded


def test_two_of_m_race_counts_exactly_two_and_the_second_decides(master: sa.Engine) -> None:
    ins.set_approvers_required(master, "Ops", 2)
    sig = signer()
    iid = pending(master, iset="Ops")
    assert row(master, iid).approvers_required == 2
    results = race(master, sig, iid, APPROVERS)
    counted = [n for n, r in results.items() if isinstance(r, ins.Approval)]
    assert len(counted) == 2, results
    first, second = sorted(counted, key=lambda n: len(results[n].approvers))
    assert results[first].status == ins.PENDING_APPROVAL and results[first].approvers == (first,)
    assert results[second].status == ins.READY and results[second].approvers == (first, second)
    r = row(master, iid)
    assert (r.status, r.decided_by) == (ins.READY, second)
    assert approvers_of(master, iid) == [first, second]
    assert all(isinstance(results[n], ins.ApprovalRefused) and results[n].status == 409
               for n in APPROVERS if n not in counted)


def test_requester_and_double_approval_do_not_count(master: sa.Engine) -> None:
    ins.set_approvers_required(master, "Ops", 2)
    sig = signer()
    iid = pending(master, iset="Ops")
    with pytest.raises(ins.ApprovalRefused, match="cannot approve or reject your own") as e:
        ins.approve(master, sig, iid, by="req", reason=None)
    assert e.value.status == 403
    assert ins.approve(master, sig, iid, by="approver0", reason="ok").status == ins.PENDING_APPROVAL
    for _ in range(2):
        with pytest.raises(ins.ApprovalRefused, match="approver0 has already approved") as e:
            ins.approve(master, sig, iid, by="approver0", reason="again")
        assert e.value.status == 409
    with pytest.raises(ins.ApprovalRefused, match="your own"):
        ins.approve(master, sig, iid, by="req", reason=None)
    assert row(master, iid).status == ins.PENDING_APPROVAL and approvers_of(master, iid) == ["approver0"]
    done = ins.approve(master, sig, iid, by="approver1", reason="second pair of eyes")
    assert done.complete and done.status == ins.READY and done.approvers == ("approver0", "approver1")
    assert row(master, iid).decided_by == "approver1"
    # the database itself refuses a second row for one person
    with pytest.raises(sa.exc.IntegrityError), master.begin() as c:
        c.execute(approvals.insert().values(instruction_id=iid, approver="approver0", approved_at=time.time()))


def test_policy_lookup_default_and_pending_requests_keep_their_number(master: sa.Engine) -> None:
    assert ins.set_approvers_required(master, "*", 3) is None
    assert ins.set_approvers_required(master, "Ops", 2) is None
    a, b, raw = pending(master, iset="Ops"), pending(master, iset="Other"), pending(master)
    assert [row(master, i).approvers_required for i in (a, b, raw)] == [2, 3, 3]
    assert ins.set_approvers_required(master, "Ops", 1) == 2  # lowering it later does not lower a pending one
    sig = signer()
    assert ins.approve(master, sig, a, by="approver0", reason=None).status == ins.PENDING_APPROVAL
    assert pending(master, iset="Ops") and row(master, pending(master, iset="Ops")).approvers_required == 1
    # careless operators
    for n in (0, -1, 101, 10**9):
        with pytest.raises(ValueError, match="between 1 and 100"):
            ins.set_approvers_required(master, "Ops", n)
    for name in ("", "x" * 129):
        with pytest.raises(ValueError, match="1 to 128 characters"):
            ins.set_approvers_required(master, name, 2)
    with pytest.raises(sa.exc.IntegrityError), master.begin() as c:  # the database agrees
        c.execute(instruction_sets.insert().values(name="Bad", approvers_required=0))


def test_rejection_after_one_of_two_ends_it(master: sa.Engine) -> None:
    ins.set_approvers_required(master, "Ops", 2)
    sig = signer()
    iid = pending(master, iset="Ops")
    ins.approve(master, sig, iid, by="approver0", reason=None)
    assert ins.decide(master, iid, status=ins.REJECTED, by="approver1", reason="no", expect=ins.PENDING_APPROVAL)
    with pytest.raises(ins.ApprovalRefused, match="is rejected, not pending approval") as e:
        ins.approve(master, sig, iid, by="approver2", reason=None)
    assert e.value.status == 409
    r = row(master, iid)
    assert (r.status, r.decided_by, r.decision_reason, r.body) == (ins.REJECTED, "approver1", "no", None)


def test_approval_after_expiry_or_cancel_is_refused(master: sa.Engine) -> None:
    sig = signer()
    late = pending(master, expires_in=-1)  # its window ended; the Coordinator has not expired it yet
    with pytest.raises(ins.ApprovalRefused, match="approval window has ended") as e:
        ins.approve(master, sig, late, by="approver0", reason=None)
    assert e.value.status == 409 and row(master, late).status == ins.PENDING_APPROVAL
    assert ins.decide(master, late, status=ins.APPROVAL_EXPIRED, by="coordinator", reason="late",
                      expect=ins.PENDING_APPROVAL)
    with pytest.raises(ins.ApprovalRefused, match="approval_expired, not pending approval"):
        ins.approve(master, sig, late, by="approver0", reason=None)
    gone = pending(master)
    assert ins.decide(master, gone, status=ins.CANCELLED, by="req", reason="cancelled before it ran",
                      expect=ins.PENDING_APPROVAL)
    with pytest.raises(ins.ApprovalRefused, match="cancelled, not pending approval") as e:
        ins.approve(master, sig, gone, by="approver0", reason=None)
    assert e.value.status == 409
    assert approvers_of(master, late) == [] and approvers_of(master, gone) == []
    assert row(master, gone).decided_by == "req"
    with pytest.raises(ins.ApprovalRefused, match="not found") as e:
        ins.approve(master, sig, 2**31 - 1, by="approver0", reason=None)
    assert e.value.status == 404


def test_approval_of_a_scheduled_action_schedules_it(master: sa.Engine) -> None:
    iid = pending(master, scheduled_at=time.time() + 3600)
    done = ins.approve(master, signer(), iid, by="approver0", reason="tonight")
    assert done.status == ins.SCHEDULED
    r = row(master, iid)
    assert (r.status, r.decided_by, r.body) == (ins.SCHEDULED, "approver0", None)


# ------------------------------------------------------------------------------ the Coordinator
def coordinator(master: sa.Engine, core_url: str = "http://127.0.0.1:9", **kw: Any) -> Coordinator:
    return Coordinator(master, signer(), core_url, "token", portal_url="https://quanta.example:8443/Explorer/",
                       loop_interval=0.2, **kw)


async def test_coordinator_refuses_viewers_requesters_and_repeats(master: sa.Engine) -> None:
    ins.set_approvers_required(master, "*", 2)
    coord = coordinator(master)
    iid = pending(master)
    for who, role, status, text in [("viewer", "Viewer", 403, "may not approve"),
                                    ("req", "Full Administrator", 403, "your own"),
                                    ("nobody", "Approver", 403, "may not approve")]:
        with pytest.raises(WorkflowError, match=text) as e:
            await coord.approve(iid, who, role, None, None)
        assert e.value.status == status
    first = await coord.approve(iid, "approver0", "Approver", None, "looks fine")
    assert first["status"] == ins.PENDING_APPROVAL and first["approvers"] == ["approver0"]
    assert "1 more approval(s) needed" in first["message"]
    with pytest.raises(WorkflowError, match="already approved") as e:
        await coord.approve(iid, "approver0", "Approver", None, None)
    assert e.value.status == 409
    with pytest.raises(WorkflowError, match="not found") as e:
        await coord.approve(10**6, "approver0", "Approver", None, None)
    assert e.value.status == 404
    state = await coord.approval_state(iid)
    assert state["approvers_required"] == 2 and [a["approver"] for a in state["approvals"]] == ["approver0"]
    assert state["approvals"][0]["reason"] == "looks fine"
    assert await coord.reject(iid, "approver1", "Approver", "not now") == {"id": iid, "status": ins.REJECTED}
    with pytest.raises(WorkflowError, match="rejected, not pending approval") as e:
        await coord.approve(iid, "approver2", "Approver", None, None)
    assert e.value.status == 409
    with master.connect() as c:
        acts = [r.action for r in c.execute(sa.select(audit_log.c.action).order_by(audit_log.c.id))]
    assert acts == ["approve", "reject"]
    assert coord.link(iid) == f"https://quanta.example:8443/Explorer/#/i/{iid}"


async def test_no_database_call_runs_on_the_event_loop(master: sa.Engine) -> None:
    """Every connection the Coordinator takes from the pool is taken off the event loop's thread."""
    import traceback

    watching, seen, on_loop = False, [], []

    def checkout(*_args: Any) -> None:
        if not watching:
            return
        seen.append(1)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        on_loop.append("".join(traceback.format_stack(limit=12)))

    ins.set_approvers_required(master, "*", 2)
    iid, other, late = pending(master), pending(master), pending(master, expires_in=-1)
    sa.event.listen(master.pool, "checkout", checkout)
    coord = coordinator(master, retry_min=0.05, retry_max=0.1)
    watching = True
    with pytest.raises(WorkflowError):
        await coord.request_code(iid, "approver0", "Approver")  # no SMTP settings here: 503, after storing the code
    await coord.submitted(iid)
    await coord.approve(iid, "approver0", "Approver", None, None)
    await coord.approve(iid, "approver1", "Approver", None, None)  # the Core is not there: retried in the background
    await coord.reject(other, "approver0", "Approver", "no")
    await coord.approval_state(iid)
    await coord.tick()
    await asyncio.sleep(0.3)  # a few background retries
    await coord.stop()
    watching = False
    assert row(master, late).status == ins.APPROVAL_EXPIRED and row(master, iid).status == ins.READY
    assert len(seen) > 10 and not on_loop, on_loop[:1]


async def test_a_core_that_hangs_gives_a_clear_answer_in_time(master: sa.Engine) -> None:
    """A Core that accepts the connection and never answers: the approval stands, and the approver
    hears so within the Coordinator's issue timeout (not the Consumer API's 30 s timeout, a 503)."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections complete in the backlog; nothing ever reads or answers
    try:
        coord = coordinator(master, f"http://127.0.0.1:{silent.getsockname()[1]}", issue_timeout=1.0,
                            retry_min=5.0, retry_max=5.0)
        iid = pending(master)
        t0 = time.monotonic()
        answer = await coord.approve(iid, "approver0", "Approver", None, "go")
        assert time.monotonic() - t0 < 5
        assert answer["status"] == ins.READY and answer["issued"] is False and answer["retrying"] is True
        assert "ReadTimeout" in answer["message"] and "as soon as the Core is back" in answer["message"]
        r = row(master, iid)
        assert (r.status, r.decided_by) == (ins.READY, "approver0") and "ReadTimeout" in r.issue_error
        assert coord.retry_issue(iid) is False  # the one retry already owns it
        await coord.stop()
    finally:
        silent.close()


@pytest.mark.slow
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_core_down_at_approval_is_retried_and_issued_once(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                          request: pytest.FixtureRequest, database: str) -> None:
    """The Core is down when the last approver approves: the answer says so (no error), the
    instruction stays approved with the reason; once a real Core process starts, the Coordinator's
    back-off retry issues it, once."""
    extra = ("--database-url", request.getfixturevalue("pg_url")) if database == "postgresql" else ()
    s = make_server(tmp_path, *extra)  # a data directory (databases, keys, ports); its server is never started
    from quanta.internal import COORDINATOR_TO_CORE, credential
    from quanta.pki import Pki
    from quanta.settings import DataDir, load_settings

    settings, dd = load_settings(s.root), DataDir(s.root)
    master = make_engine(dd.master_url(settings))
    with master.begin() as c:
        for name in ("req", "approver0"):
            c.execute(users.insert().values(username=name, password_hash="x", role="Approver", created_at=time.time()))
    token = credential(dd.internal_secret(), COORDINATOR_TO_CORE)
    coord = Coordinator(master, Signer.from_file(Pki(dd.pki).signing_key), settings.core_http_url(), token,
                        loop_interval=0.2, retry_min=0.2, retry_max=1.0)
    iid = pending(master)
    with master.begin() as c:  # a long gather window: the retry has time
        c.execute(instructions.update().where(instructions.c.id == iid).values(instruction_ttl=300))
    core_log = tmp_path / "core.log"
    caplog.set_level(logging.INFO, "quanta.coordinator")

    async def scenario() -> tuple[dict[str, Any], Any]:
        loop = asyncio.create_task(coord.run())
        try:
            answer = await coord.approve(iid, "approver0", "Approver", None, "go")
            r = row(master, iid)
            assert r.status == ins.READY and r.issue_error and "unreachable" in r.issue_error
            assert len(coord._retries) == 1  # exactly one background retry owns it
            await asyncio.sleep(1.5)  # a few back-off rounds against the closed port
            with core_log.open("wb") as out:
                core = subprocess.Popen([sys.executable, "-m", "quanta", "core", str(s.root)], stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            try:
                deadline = time.monotonic() + 60
                while row(master, iid).status == ins.READY:
                    assert time.monotonic() < deadline, core_log.read_text()
                    await asyncio.sleep(0.1)
                while coord._retries:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)  # several Coordinator ticks: nothing asks again
            finally:
                core.terminate()
                core.wait(20)
            return answer, row(master, iid)
        finally:
            loop.cancel()
            await coord.stop()

    answer, final = asyncio.run(scenario())
    assert answer["status"] == ins.READY and answer["issued"] is False and answer["retrying"] is True
    assert "the Coordinator issues it as soon as the Core is back" in answer["message"]
    assert final.status in ("active", "finished") and final.issue_error is None and final.decided_by == "approver0"
    text = core_log.read_text()
    assert text.count(f"instruction {iid} issued") == 1, text
    issued = [r for r in caplog.records if f"instruction {iid} issued to" in r.getMessage()]
    assert len(issued) == 1, [r.getMessage() for r in caplog.records]
    assert any("asking the Core again" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------ end to end
pw_text = "correct horse battery staple"


@pytest.fixture
def e2e(tmp_path: Path):  # type: ignore[no-untyped-def]
    from test_coordinator import Inbox
    from aiosmtpd.controller import Controller
    from conftest import free_port

    box = Inbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    s = make_server(tmp_path, "--port", f"smtp={port}")
    quanta("smtp", str(s.root), "--host", "127.0.0.1")
    pw = tmp_path / "pw"
    pw.write_text(pw_text)
    for name, role in (("alice", "Full Administrator"), ("bob", "Approver"), ("carol", "Approver")):
        quanta("user", "add", str(s.root), "--username", name, "--role", role, "--email", f"{name}@example.com",
               "--password-file", str(pw))
    s.start()
    for n in ("a1", "a2"):
        s.enroll(n)
        s.start_agent(n)
    s.wait_online({"a1", "a2"})
    try:
        yield s, box
    finally:
        s.stop()
        controller.stop()


def token(s: Server, user: str) -> str:
    from quanta.client import ConsumerClient

    with ConsumerClient.for_data_dir(s.root, user, pw_text) as c:  # signs in as the CLI does
        assert c.token
        return c.token


def post(s: Server, tok: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.post(f"https://127.0.0.1:{s.https}{path}", json=body or {}, verify=False, timeout=60,
                      headers={"Authorization": f"Bearer {tok}"})


def get(s: Server, tok: str, path: str) -> dict[str, Any]:
    r = httpx.get(f"https://127.0.0.1:{s.https}{path}", verify=False, timeout=30,
                  headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 200, r.text
    return r.json()


def issue_action(s: Server, tok: str, markers: Path) -> int:
    r = post(s, tok, "/Consumer/Instructions",
             {"payload": f'NativeServices.RunCommand(CommandLine: "mktemp -p {markers}");'})
    assert r.status_code == 201 and r.json()["status"] == ins.PENDING_APPROVAL, r.text
    return int(r.json()["id"])


def master_rows(s: Server, iid: int) -> list[str]:
    with make_engine(f"sqlite:///{s.root / 'master.db'}").connect() as c:
        return [r[0] for r in c.execute(sa.select(approvals.c.approver).where(approvals.c.instruction_id == iid)
                                        .order_by(approvals.c.id))]


@pytest.mark.slow
def test_e2e_two_approvers_race_over_https_one_decision_one_run(e2e: tuple[Server, Any], tmp_path: Path) -> None:
    s, box = e2e
    markers = tmp_path / "markers"
    markers.mkdir()
    alice, bob, carol = token(s, "alice"), token(s, "bob"), token(s, "carol")
    iid = issue_action(s, alice, markers)
    mail = box.wait_for("bob@example.com", f"approval needed for instruction {iid}")
    assert f"https://localhost:{s.https}/Explorer/#/i/{iid}" in mail  # the portal's address of it
    start = threading.Barrier(2)

    def approve(tok: str, reason: str) -> httpx.Response:
        start.wait()
        return post(s, tok, f"/Consumer/Instructions/{iid}/Approve", {"reason": reason})

    with ThreadPoolExecutor(2) as pool:
        rb, rc = pool.map(approve, (bob, carol), ("bob's ticket", "carol's ticket"))
    answers = {"bob": rb, "carol": rc}
    winners = [n for n, r in answers.items() if r.status_code == 200]
    assert len(winners) == 1, {n: (r.status_code, r.text) for n, r in answers.items()}
    [winner] = winners
    [loser] = [n for n in answers if n != winner]
    assert answers[loser].status_code == 409 and "not pending approval" in answers[loser].json()["detail"]
    st = get(s, alice, f"/Consumer/Instructions/{iid}")
    assert st["decided_by"] == winner and st["decision_reason"] == f"{winner}'s ticket", st
    wait_until(lambda: get(s, alice, f"/Consumer/Instructions/{iid}")["status"] == "finished", 60, "finished", s)
    assert len(list(markers.iterdir())) == 2  # each of the two devices ran it exactly once
    assert master_rows(s, iid) == [winner]


@pytest.mark.slow
def test_e2e_two_of_m_runs_after_two_distinct_non_requesters(e2e: tuple[Server, Any], tmp_path: Path) -> None:
    s, box = e2e
    r = quanta("role", "approvers", str(s.root), "--instruction-set", "*", "--required", "2")
    assert "2" in r.stdout
    bad = quanta("role", "approvers", str(s.root), "--instruction-set", "*", "--required", "0", check=False)
    assert bad.returncode == 2 and "between 1 and 100" in bad.stderr
    markers = tmp_path / "markers"
    markers.mkdir()
    alice, bob, carol = token(s, "alice"), token(s, "bob"), token(s, "carol")
    iid = issue_action(s, alice, markers)
    assert "needs 2 approvals by different people" in box.wait_for("carol@example.com", f"instruction {iid}")
    assert post(s, alice, f"/Consumer/Instructions/{iid}/Approve").status_code == 403  # the requester
    first = post(s, bob, f"/Consumer/Instructions/{iid}/Approve", {"reason": "one"})
    assert first.status_code == 202 and first.json()["status"] == ins.PENDING_APPROVAL, first.text
    st = get(s, carol, f"/Consumer/Instructions/{iid}")
    assert st["approvers_required"] == 2 and [a["approver"] for a in st["approvals"]] == ["bob"], st
    # the other approver hears of the partial approval, with the link; bob (who approved) and the
    # requester do not
    partial = box.wait_for("carol@example.com", f"instruction {iid} (adhoc): 1 of 2 approvals")
    assert "approved so far by bob" in partial and f"Explorer/#/i/{iid}" in partial
    assert not [m for m in box.messages if f"{iid} (adhoc): 1 of 2" in m["data"] and
                ("bob@" in m["to"] or "alice@" in m["to"])]
    again = post(s, bob, f"/Consumer/Instructions/{iid}/Approve", {"reason": "one again"})
    assert again.status_code == 409 and "already approved" in again.json()["detail"]
    time.sleep(2)  # a run would have started by now: the agents are online and poked at once
    assert list(markers.iterdir()) == [] and get(s, alice, f"/Consumer/Instructions/{iid}")["status"] == ins.PENDING_APPROVAL
    second = post(s, carol, f"/Consumer/Instructions/{iid}/Approve", {"reason": "two"})
    assert second.status_code == 200 and second.json()["status"] in ("active", "finished"), second.text
    assert second.json()["approvers"] == ["bob", "carol"]
    wait_until(lambda: get(s, alice, f"/Consumer/Instructions/{iid}")["status"] == "finished", 60, "finished", s)
    assert len(list(markers.iterdir())) == 2
    assert master_rows(s, iid) == ["bob", "carol"]
    assert get(s, alice, f"/Consumer/Instructions/{iid}")["decided_by"] == "carol"
    # a rejection after one of two approvals ends it; approving afterwards is a clear 409
    iid2 = issue_action(s, alice, markers)
    assert post(s, carol, f"/Consumer/Instructions/{iid2}/Approve").json()["status"] == ins.PENDING_APPROVAL
    rej = post(s, bob, f"/Consumer/Instructions/{iid2}/Reject", {"reason": "wrong devices"})
    assert rej.status_code == 200 and rej.json()["status"] == ins.REJECTED
    late = post(s, bob, f"/Consumer/Instructions/{iid2}/Approve")
    assert late.status_code == 409 and "not pending approval" in late.json()["detail"]
    # cancelled by the requester: approving it is a 409 too
    iid3 = issue_action(s, alice, markers)
    assert post(s, alice, f"/Consumer/Instructions/{iid3}/Cancel").status_code == 200
    late = post(s, carol, f"/Consumer/Instructions/{iid3}/Approve")
    assert late.status_code == 409 and "cancelled, not pending approval" in late.json()["detail"]
    # an id the database cannot hold is refused cleanly
    huge = post(s, bob, "/Consumer/Instructions/99999999999999999999/Approve")
    assert huge.status_code in (404, 422), huge.text
    assert len(list(markers.iterdir())) == 2
    assert json.loads(quanta("role", "approvers", str(s.root), "--instruction-set", "*").stdout)["approvers_required"] == 2
    assert re.search(r"Explorer/#/i/\d+", box.wait_for("alice@example.com", f"instruction {iid2} rejected"))


def test_policy_shows_too_few_eligible_approvers(master: sa.Engine) -> None:
    from quanta.coordinator.service import show_approvers_required

    assert show_approvers_required(master, "Ops") == {"instruction_set": "Ops", "approvers_required": 1,
                                                      "eligible_approvers": 9}  # req (admin) and 8 Approvers
    ins.set_approvers_required(master, "Ops", 10)
    shown = show_approvers_required(master, "Ops")
    assert shown["approvers_required"] == 10 and "only 9 enabled user(s) may approve" in shown["warning"]


def test_a_one_time_code_is_spent_once_even_by_racing_requests(master: sa.Engine) -> None:
    coord = coordinator(master)
    iid = pending(master)
    coord._store_code(iid, "approver0", "123456")
    start = threading.Barrier(6)

    def use(_: int) -> bool:
        start.wait()
        return coord._use_code(iid, "approver0", "123456")

    with ThreadPoolExecutor(6) as pool:
        assert sorted(pool.map(use, range(6))) == [False] * 5 + [True]
    assert not coord._use_code(iid, "approver1", "123456")  # another approver's code is not yours


def test_migration_records_earlier_approvals_and_downgrades(db_url: str) -> None:
    from alembic import command

    from quanta.db import alembic_config

    cfg = alembic_config(db_url, "master")
    command.upgrade(cfg, "master_0020_certs")
    command.upgrade(cfg, "master_0010_defs")
    command.upgrade(cfg, "master_0003")
    e = make_engine(db_url)
    try:
        base = dict(kind="action", payload="x", parameters={}, created_by="req", created_at=1.0, targeted=0,
                    decided_by=None, decided_at=None, decision_reason=None)
        with e.begin() as c:
            old = sa.table("instructions", sa.column("parameters", sa.JSON), *(sa.column(n) for n in (
                "id", "name", "kind", "payload", "created_by", "created_at", "targeted", "status",
                "decided_by", "decided_at", "decision_reason")))
            c.execute(old.insert(), [
                dict(base, id=1, name="ran", status="finished", decided_by="bob", decided_at=2.0, decision_reason="ok"),
                dict(base, id=2, name="no", status="rejected", decided_by="bob", decided_at=2.0, decision_reason="no"),
                dict(base, id=3, name="gone", status="cancelled", decided_by="req", decided_at=2.0,
                     decision_reason="cancelled before it ran"),
                dict(base, id=4, name="asked", status="pending_approval"),
                dict(base, id=5, name="q", status="finished")])
        command.upgrade(cfg, "master_0022")
        with e.connect() as c:
            rows = c.execute(sa.select(approvals.c.instruction_id, approvals.c.approver, approvals.c.reason)).all()
        assert [tuple(r) for r in rows] == [(1, "bob", "ok")]
        command.downgrade(cfg, "master_0020_certs")
        with e.connect() as c:
            assert "approvals" not in sa.inspect(c).get_table_names()
            assert "issue_error" not in {col["name"] for col in sa.inspect(c).get_columns("instructions")}
    finally:
        e.dispose()
