"""The portal's approval views in real Chromium (issue 11): an action that needs 2 of M approvers
shows its progress ("1 of 2 approvals: bob") on the approval card and the instruction page, the
card says what happened at once after approving (not "Awaiting approval"), an approver who has
approved is not offered the buttons again, and an approved action the Core has not taken (or
never took) is shown with its reason. Hostile names and reasons stay text."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa

from conftest import Server, make_server, quanta, wait_until
from test_portal import HOSTILE, PASSWORD, Page, _need_browser, browser  # noqa: F401  (browser: the module-scoped fixture)

try:
    from playwright.sync_api import expect
except ImportError:  # _need_browser skips
    expect = None  # type: ignore[assignment]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("portal-approvals")
    s = make_server(tmp)
    pw = tmp / "pw"
    pw.write_text(PASSWORD)
    for name, role in (("alice", "Full Administrator"), ("bob", "Approver"), ("carol", "Approver")):
        quanta("user", "add", str(s.root), "--username", name, "--role", role, "--password-file", str(pw))
    quanta("role", "approvers", str(s.root), "--instruction-set", "*", "--required", "2")
    s.start()
    s.base = f"https://localhost:{s.https}"  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        s.stop()


def _token(s: Server, user: str) -> str:
    r = httpx.post(f"{s.base}/Consumer/Authentication/Token", json={"username": user, "password": PASSWORD},  # type: ignore[attr-defined]
                   verify=False)
    r.raise_for_status()
    return str(r.json()["token"])


def _ask_action(s: Server) -> int:
    r = httpx.post(f"{s.base}/Consumer/Instructions", verify=False,  # type: ignore[attr-defined]
                   headers={"Authorization": f"Bearer {_token(s, 'alice')}"},
                   json={"payload": 'Tagging.Set(Name: "portal", Value: "x");', "name": "tag-it"})
    assert r.status_code == 201 and r.json()["status"] == "pending_approval", r.text
    return int(r.json()["id"])


def test_two_of_m_card_shows_progress_and_updates_at_once(browser, server: Server) -> None:  # type: ignore[no-untyped-def]
    iid = _ask_action(server)
    bob, carol, alice = (Page(browser, server) for _ in range(3))
    try:
        bob.login("bob", PASSWORD)
        bp = bob.page
        bp.goto("/Explorer/#/approvals")
        card = bp.locator(f"#approval-{iid}")
        expect(card.locator("[data-test=approval-progress]")).to_have_text("0 of 2 approvals")
        card.locator(".reason").fill(HOSTILE)  # a hostile reason: shown as text wherever it appears
        card.locator("[data-test=approve]").click()
        expect(card.locator("[data-test=approval-progress]")).to_have_text("1 of 2 approvals: bob")
        card.locator(".msg-ok >> text=your approval counted; 1 more needed").wait_for()
        expect(card.locator("[data-test=approve]")).to_have_count(0)  # no second try at it
        # seen again later: the progress and that bob already approved, no buttons to press
        bp.reload()
        card = bp.locator(f"#approval-{iid}")
        expect(card.locator("[data-test=approval-progress]")).to_have_text("1 of 2 approvals: bob")
        card.locator("text=You approved this action").wait_for()
        assert not card.locator("[data-test=approve]").is_visible()
        # the instruction page says how far it is
        alice.login("alice", PASSWORD)
        ap = alice.page
        ap.goto(f"/Explorer/#/i/{iid}")
        expect(ap.locator("#approval-progress")).to_have_text("1 of 2 approvals: bob. ")
        ap.wait_for_selector("#progress >> text=needs 2 approvals by different people other than alice")
        # the second approver completes it: the card says so at once, not "Awaiting approval"
        carol.login("carol", PASSWORD)
        cp = carol.page
        cp.goto("/Explorer/#/approvals")
        ccard = cp.locator(f"#approval-{iid}")
        expect(ccard.locator("[data-test=approval-progress]")).to_have_text("1 of 2 approvals: bob")
        ccard.locator("[data-test=approve]").click()
        expect(ccard.locator("[data-test=approval-progress]")).to_have_text("2 of 2 approvals: bob, carol")
        ccard.locator(".msg-ok >> text=Approved").wait_for()
        expect(ccard.locator(".approval-badge")).not_to_have_text("Awaiting approval")
        # and the requester's open page follows live: approved by both, no longer awaiting
        ap.wait_for_selector("#approved-by >> text=approved by bob, carol")
        expect(ap.locator("#approval-progress")).to_have_count(0)
        for p in (bp, cp, ap):
            assert p.evaluate("document.querySelectorAll('img').length") == 0
            assert p.evaluate("window.__pwned") is None
    finally:
        for t in (bob, carol, alice):
            t.close()


def test_approved_but_not_issued_and_never_issued_are_shown_with_their_reason(browser, server: Server) -> None:  # type: ignore[no-untyped-def]
    """Two instructions put in those states in the database (a Core that refuses or stays away
    cannot be arranged on a live server without stopping it): the pages say why, as text."""
    from quanta.db import make_engine
    from quanta.db.tables import instructions

    waiting, never = _ask_action(server), _ask_action(server)
    now = time.time()
    engine = make_engine(f"sqlite:///{server.root / 'master.db'}")
    try:
        with engine.begin() as c:
            # approved, no body: the Core refuses it (409, not signed) and it stays created with the reason
            c.execute(instructions.update().where(instructions.c.id == waiting).values(
                status="created", issued_at=now - 60, expires_at=now + 3600, decided_by="bob",
                issue_error=f"the Core at {HOSTILE} is unreachable"))
            c.execute(instructions.update().where(instructions.c.id == never).values(
                status="expired", issued_at=now - 120, expires_at=now - 60, decided_by="bob",
                issue_error="never issued: the Core was unavailable until its gather window ended"))
    finally:
        engine.dispose()
    alice = Page(browser, server)
    try:
        alice.login("alice", PASSWORD)
        ap = alice.page
        ap.goto(f"/Explorer/#/i/{waiting}")
        ap.wait_for_selector("#status >> text=Approved, not issued yet")
        expect(ap.locator("#not-issued")).to_contain_text("Approved, not issued yet: ")
        wait_until(lambda: "not issued" in (ap.text_content("#not-issued") or ""), 10, "reason shown")
        ap.goto(f"/Explorer/#/i/{never}")
        ap.wait_for_selector("#status >> text=Never issued")
        expect(ap.locator("#not-issued")).to_contain_text("the Core was unavailable until its gather window ended")
        assert ap.evaluate("document.querySelectorAll('img').length") == 0
        assert ap.evaluate("window.__pwned") is None
    finally:
        alice.close()
    with make_engine(f"sqlite:///{server.root / 'master.db'}").connect() as c:
        assert c.execute(sa.select(instructions.c.status).where(instructions.c.id == never)).scalar() == "expired"
