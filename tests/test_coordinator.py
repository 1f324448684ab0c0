"""Coordinator: actions run only after a second person approves; one-time codes and
notifications go through a real SMTP server (aiosmtpd); unapproved requests expire."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from conftest import Server, free_port, make_server, quanta, wait_until
from quanta.client import ApiError, ConsumerClient

pytestmark = pytest.mark.slow


class Inbox:
    def __init__(self) -> None:
        self.messages: list[dict[str, str]] = []

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]  # aiosmtpd hook
        self.messages.append({"to": ",".join(envelope.rcpt_tos), "data": envelope.content.decode(errors="replace")})
        return "250 OK"

    def wait_for(self, to: str, subject: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if to in m["to"] and subject in m["data"]:
                    return m["data"]
            time.sleep(0.1)
        raise AssertionError(f"no mail to {to} about {subject!r}; got {[m['data'][:200] for m in self.messages]}")


@pytest.fixture
def inbox():  # type: ignore[no-untyped-def]
    box = Inbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    box.port = port  # type: ignore[attr-defined]
    try:
        yield box
    finally:
        controller.stop()


@pytest.fixture
def coord_server(tmp_path: Path, inbox: Inbox, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    s = make_server(tmp_path, "--port", f"smtp={inbox.port}")
    marker = request.node.get_closest_marker("approval_ttl")
    ttl = marker.args[0] if marker else 60
    text = (s.root / "quanta.toml").read_text()
    assert "approval_ttl = 86400" in text
    (s.root / "quanta.toml").write_text(text.replace("approval_ttl = 86400", f"approval_ttl = {ttl}"))
    quanta("smtp", str(s.root), "--host", "127.0.0.1")
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery staple")
    quanta("user", "add", str(s.root), "--username", "alice", "--role", "Full Administrator", "--email",
           "alice@example.com", "--password-file", str(pw))
    quanta("user", "add", str(s.root), "--username", "bob", "--role", "Approver", "--email", "bob@example.com",
           "--password-file", str(pw))
    quanta("user", "add", str(s.root), "--username", "val", "--role", "Viewer", "--email", "val@example.com",
           "--password-file", str(pw))
    s.start()
    for n in ("a1", "a2"):
        s.enroll(n)
        s.start_agent(n)
    s.wait_online({"a1", "a2"})
    s.password_file = pw  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        s.stop()


def client(s: Server, user: str) -> ConsumerClient:
    return ConsumerClient.for_data_dir(s.root, user, "correct horse battery staple")


def action(marker_dir: Path) -> str:
    return f'NativeServices.RunCommand(CommandLine: "mktemp -p {marker_dir}");'


def test_second_person_approval_email_and_no_self_approval(coord_server: Server, inbox: Inbox, tmp_path: Path) -> None:
    s = coord_server
    markers = tmp_path / "markers"
    markers.mkdir()
    # the requester's CLI waits for the approval, then shows the results
    ask = subprocess.Popen([sys.executable, "-m", "quanta", "ask", str(s.root), action(markers), "--json", "--wait", "60", "--wait-approval"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mail = inbox.wait_for("bob@example.com", "approval needed")
    iid = int(re.search(r"instruction (\d+)", mail).group(1))
    assert "mktemp" in mail and "admin asks to run action" in mail
    assert f"https://localhost:{s.https}/Explorer/#/i/{iid}" in mail  # where the portal shows it
    assert list(markers.iterdir()) == [], "an action ran before approval"
    # the requester (admin) cannot approve their own instruction
    r = quanta("approve", str(s.root), str(iid), check=False)
    assert r.returncode == 2 and "cannot approve or reject your own" in r.stderr
    # a viewer cannot approve either
    with client(s, "val") as val, pytest.raises(ApiError, match="may not approve"):
        val.decide(iid, "Approve")
    time.sleep(1)
    assert list(markers.iterdir()) == []
    # the second person approves from the CLI
    quanta("approve", str(s.root), str(iid), "--user", "bob", "--password-file", str(s.password_file),  # type: ignore[attr-defined]
           "--reason", "change ticket 42")
    stdout, stderr = ask.communicate(timeout=90)
    assert ask.returncode == 0, stderr
    out = json.loads(stdout)
    assert out["status"] == "finished" and out["states"] == {"success": 2}, out
    assert len(list(markers.iterdir())) == 2  # each device ran it exactly once
    with client(s, "bob") as bob:
        st = bob.status(iid)
        assert st["decided_by"] == "bob" and st["decision_reason"] == "change ticket 42"
        with pytest.raises(ApiError, match="not pending approval"):
            bob.decide(iid, "Approve")  # a decided instruction cannot be decided again


@pytest.mark.approval_ttl(8)
def test_rejection_and_expiry_notify_the_requester(coord_server: Server, inbox: Inbox, tmp_path: Path) -> None:
    s = coord_server
    markers = tmp_path / "markers"
    markers.mkdir()
    with client(s, "alice") as alice, client(s, "bob") as bob:
        iid = alice.issue(action(markers))["id"]
        with pytest.raises(ApiError, match="422"):
            bob.decide(iid, "Reject")  # a rejection needs a reason
        assert bob.decide(iid, "Reject", reason="not during business hours")["status"] == "rejected"
        assert "not during business hours" in inbox.wait_for("alice@example.com", f"instruction {iid} rejected")
        assert alice.status(iid)["status"] == "rejected"
        # nobody decides: it expires (approval_ttl is 8 s in this server's settings)
        iid2 = alice.issue(action(markers))["id"]
        wait_until(lambda: alice.status(iid2)["status"] == "approval_expired", 60, "approval expiry", s)
        inbox.wait_for("alice@example.com", f"instruction {iid2} expired unapproved")
        with pytest.raises(ApiError, match="not pending approval"):
            bob.decide(iid2, "Approve")
    assert list(markers.iterdir()) == []


def test_one_time_code_by_email(coord_server: Server, inbox: Inbox, tmp_path: Path) -> None:
    s = coord_server
    quanta("smtp", str(s.root), "--require-approval-code")
    markers = tmp_path / "markers"
    markers.mkdir()
    with client(s, "alice") as alice, client(s, "bob") as bob:
        iid = alice.issue(action(markers))["id"]
        with pytest.raises(ApiError, match="one-time code is required"):
            bob.decide(iid, "Approve")
        assert bob.decide(iid, "ApprovalCode")["sent_to"] == "bob@example.com"
        code = re.search(r"code to approve instruction \d+ is (\d{6})", inbox.wait_for("bob@example.com", "approval code")).group(1)
        wrong = f"{(int(code) + 1) % 1_000_000:06d}"
        with pytest.raises(ApiError, match="one-time code is required"):
            bob.decide(iid, "Approve", code=wrong)
        assert bob.decide(iid, "Approve", code=code)["status"] == "active"
        final = alice.wait(iid, 30)
        assert final["states"] == {"success": 2}
    assert len(list(markers.iterdir())) == 2
    # the audit log has every decision, and the SMTP password never appears in it
    import sqlalchemy as sa

    from quanta.db import make_engine
    from quanta.db.tables import audit_log

    with make_engine(f"sqlite:///{s.root / 'master.db'}").connect() as conn:
        actions = [r[0] for r in conn.execute(sa.select(audit_log.c.action))]
    assert {"approve_refused", "approve", "issue", "smtp_change"} <= set(actions)
