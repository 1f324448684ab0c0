"""The Coordinator: approvals for actions (never by the requester), an optional one-time code
sent by email to the approver, expiry of requests nobody decided on, scheduled instructions, and
email notifications over SMTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import smtplib
import ssl
import time
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import sqlalchemy as sa

from quanta import instructions as ins
from quanta import secretbox
from quanta import rbac
from quanta.db import store
from quanta.db.tables import approval_codes, instructions, smtp_settings, users
from quanta.pki import Signer

log = logging.getLogger("quanta.coordinator")

APPROVER_ROLES = ("Full Administrator", "Approver")
CODE_TTL = 600.0


class WorkflowError(Exception):
    """A refused decision; ``status`` is the HTTP status the API should answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class SmtpConfig:
    enabled: bool
    host: str
    port: int
    username: str | None
    password: str | None
    starttls: bool
    from_addr: str
    require_approval_code: bool


def load_smtp(engine: sa.Engine) -> SmtpConfig | None:
    with engine.connect() as c:
        row = c.execute(sa.select(smtp_settings).where(smtp_settings.c.id == 1)).first()
    if row is None:
        return None
    cfg = SmtpConfig(row.enabled, row.host, row.port, row.username, secretbox.unseal(engine, row.password),
                     row.starttls, row.from_addr, row.require_approval_code)
    if secretbox.needs_resealing(row.password):  # written in clear before secrets were sealed: seal it now
        save_smtp(engine, cfg)
    return cfg


def save_smtp(engine: sa.Engine, cfg: SmtpConfig) -> None:
    values = dict(enabled=cfg.enabled, host=cfg.host, port=cfg.port, username=cfg.username,
                  password=secretbox.seal(engine, cfg.password),
                  starttls=cfg.starttls, from_addr=cfg.from_addr, require_approval_code=cfg.require_approval_code)
    with engine.begin() as c:
        if c.execute(sa.select(smtp_settings.c.id).where(smtp_settings.c.id == 1)).first():
            c.execute(smtp_settings.update().where(smtp_settings.c.id == 1).values(**values))
        else:
            c.execute(smtp_settings.insert().values(id=1, **values))


def send_mail(cfg: SmtpConfig, to: list[str], subject: str, body: str) -> None:
    """Send one email (blocking). Anonymous unless a username is set; STARTTLS if configured."""
    msg = EmailMessage()
    msg["From"] = cfg.from_addr
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg.set_content(body)
    with smtplib.SMTP(cfg.host, cfg.port, timeout=15) as smtp:
        if cfg.starttls:
            smtp.starttls(context=ssl.create_default_context())
        if cfg.username:
            smtp.login(cfg.username, cfg.password or "")
        smtp.send_message(msg)


def _code_hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


class Coordinator:
    def __init__(self, master: sa.Engine, signer: Signer, core_url: str, core_token: str, *,
                 approval_ttl: float = 24 * 3600, loop_interval: float = 1.0, ca_file: str | None = None) -> None:
        self.ca_file = ca_file
        self.master = master
        self.signer = signer
        self.core_url = core_url
        self.core_token = core_token
        self.approval_ttl = approval_ttl
        self.loop_interval = loop_interval
        self._task: asyncio.Task[None] | None = None

    async def db(self, fn: Any, *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kw)

    # ---------------------------------------------------------------- email
    async def notify(self, to: list[str], subject: str, body: str) -> bool:
        to = [a for a in to if a]
        if not to:
            return False
        cfg = await self.db(load_smtp, self.master)
        if cfg is None or not cfg.enabled:
            log.info("email disabled; not sending %r", subject)
            return False
        for attempt in range(3):
            try:
                await self.db(send_mail, cfg, to, subject, body)
                log.info("emailed %r to %d recipient(s)", subject, len(to))
                return True
            except (OSError, smtplib.SMTPException) as e:
                log.warning("email %r to %s via %s:%d failed (%s); attempt %d of 3", subject, to, cfg.host, cfg.port,
                            type(e).__name__, attempt + 1)
                await asyncio.sleep(1 + attempt)
        log.error("giving up emailing %r", subject)
        return False

    def _emails(self, roles: tuple[str, ...], exclude: str | None = None) -> list[str]:
        with self.master.connect() as c:
            rows = c.execute(sa.select(users.c.username, users.c.email).where(users.c.role.in_(roles),
                                                                             users.c.disabled == sa.false()))
            return [r.email for r in rows if r.email and r.username != exclude]

    def _email_of(self, username: str) -> str | None:
        with self.master.connect() as c:
            return c.execute(sa.select(users.c.email).where(users.c.username == username)).scalar()

    def _instruction(self, iid: int) -> dict[str, Any]:
        row = store.get_instruction(self.master, iid)
        if row is None:
            raise WorkflowError(404, f"instruction {iid} not found")
        return row

    # ---------------------------------------------------------------- workflow
    async def submitted(self, iid: int) -> None:
        row = await self.db(self._instruction, iid)
        approvers = await self.db(self._emails, APPROVER_ROLES, row["created_by"])
        await self.notify(approvers, f"Quanta: approval needed for instruction {iid} ({row['name']})",
                          f"{row['created_by']} asks to run action instruction {iid} '{row['name']}' on "
                          f"{'every device' if row['scope'] is None else ', '.join(row['scope'])}.\n\n"
                          f"Payload:\n{row['payload']}\n\nParameters: {row['parameters']}\n\n"
                          f"Approve or reject it in the portal or with 'quanta approve'. "
                          f"It expires unapproved at {time.ctime(row['approval_expires_at'] or 0)}.\n")

    def _check_approver(self, row: dict[str, Any], username: str, role: str) -> None:
        if row["status"] != ins.PENDING_APPROVAL:
            raise WorkflowError(409, f"instruction {row['id']} is {row['status']}, not pending approval")
        if username == row["created_by"]:
            raise WorkflowError(403, "you cannot approve or reject your own instruction: a second person must")
        iset = row.get("instruction_set") or "*"
        if not rbac.allowed(self.master, username, "approve", iset):
            raise WorkflowError(403, f"{username} ({role}) may not approve instructions of set {iset!r}")

    async def request_code(self, iid: int, username: str, role: str) -> dict[str, Any]:
        row = await self.db(self._instruction, iid)
        self._check_approver(row, username, role)
        email = await self.db(self._email_of, username)
        if not email:
            raise WorkflowError(409, f"user {username!r} has no email address for a one-time code")
        code = f"{secrets.randbelow(10**6):06d}"
        with self.master.begin() as c:
            c.execute(approval_codes.insert().values(instruction_id=iid, username=username, code_hash=_code_hash(code),
                                                     expires_at=time.time() + CODE_TTL))
        sent = await self.notify([email], f"Quanta: your approval code for instruction {iid}",
                                 f"Your one-time code to approve instruction {iid} is {code}. "
                                 f"It is valid for {int(CODE_TTL // 60)} minutes.\n")
        if not sent:
            raise WorkflowError(503, "the one-time code could not be emailed; check the SMTP settings")
        return {"id": iid, "sent_to": email}

    def _use_code(self, iid: int, username: str, code: str | None) -> bool:
        if not code:
            return False
        with self.master.begin() as c:
            rows = c.execute(sa.select(approval_codes).where(
                approval_codes.c.instruction_id == iid, approval_codes.c.username == username,
                approval_codes.c.used == sa.false(), approval_codes.c.expires_at > time.time())).all()
            for r in rows:
                if hmac.compare_digest(r.code_hash, _code_hash(code)):
                    c.execute(approval_codes.update().where(approval_codes.c.id == r.id).values(used=True))
                    return True
        return False

    async def approve(self, iid: int, username: str, role: str, code: str | None, reason: str | None) -> dict[str, Any]:
        row = await self.db(self._instruction, iid)
        self._check_approver(row, username, role)
        cfg = await self.db(load_smtp, self.master)
        if cfg is not None and cfg.require_approval_code and not await self.db(self._use_code, iid, username, code):
            await self.db(store.audit, self.master, username, "approve_refused", f"instruction:{iid}",
                          reason="missing or wrong one-time code")
            raise WorkflowError(403, "a valid one-time code is required: request one, then approve with it")
        await self.db(ins.mark_approved, self.master, iid, username, reason)
        if row["scheduled_at"] and row["scheduled_at"] > time.time():
            ok = await self.db(ins.decide, self.master, iid, status=ins.SCHEDULED, by=username, reason=reason,
                               expect=ins.PENDING_APPROVAL)
            if not ok:
                raise WorkflowError(409, f"instruction {iid} was decided by someone else meanwhile")
            await self.db(store.audit, self.master, username, "approve", f"instruction:{iid}", scheduled=True)
            return {"id": iid, "status": ins.SCHEDULED}
        if not await self.db(ins.sign, self.master, self.signer, iid, expect=(ins.PENDING_APPROVAL,)):
            raise WorkflowError(409, f"instruction {iid} was decided by someone else meanwhile")
        await self.db(store.audit, self.master, username, "approve", f"instruction:{iid}", reason=reason)
        issued = await ins.issue_at_core(self.core_url, self.core_token, iid, verify=self.ca_file)
        await self.notify([await self.db(self._email_of, row["created_by"])],
                          f"Quanta: instruction {iid} approved", f"{username} approved instruction {iid} "
                          f"'{row['name']}'. It was sent to {issued['targeted']} device(s).\n")
        return {"id": iid, "status": issued["status"], "targeted": issued["targeted"]}

    async def reject(self, iid: int, username: str, role: str, reason: str) -> dict[str, Any]:
        row = await self.db(self._instruction, iid)
        self._check_approver(row, username, role)
        if not await self.db(ins.decide, self.master, iid, status=ins.REJECTED, by=username, reason=reason,
                             expect=ins.PENDING_APPROVAL):
            raise WorkflowError(409, f"instruction {iid} was decided by someone else meanwhile")
        await self.db(store.audit, self.master, username, "reject", f"instruction:{iid}", reason=reason)
        await self.notify([await self.db(self._email_of, row["created_by"])], f"Quanta: instruction {iid} rejected",
                          f"{username} rejected instruction {iid} '{row['name']}': {reason}\n")
        return {"id": iid, "status": ins.REJECTED}

    # ---------------------------------------------------------------- timers
    def _due(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        now = time.time()
        with self.master.connect() as c:
            expired = [dict(r._mapping) for r in c.execute(sa.select(instructions).where(
                instructions.c.status == ins.PENDING_APPROVAL, instructions.c.approval_expires_at < now))]
            scheduled = [dict(r._mapping) for r in c.execute(sa.select(instructions).where(
                instructions.c.status == ins.SCHEDULED, instructions.c.scheduled_at <= now))]
        return expired, scheduled

    async def tick(self) -> None:
        expired, scheduled = await self.db(self._due)
        for row in expired:
            if await self.db(ins.decide, self.master, row["id"], status=ins.APPROVAL_EXPIRED, by="coordinator",
                             reason="nobody approved it in time", expect=ins.PENDING_APPROVAL):
                log.info("instruction %d expired unapproved", row["id"])
                await self.db(store.audit, self.master, "coordinator", "approval_expired", f"instruction:{row['id']}")
                await self.notify([await self.db(self._email_of, row["created_by"])],
                                  f"Quanta: instruction {row['id']} expired unapproved",
                                  f"Nobody approved instruction {row['id']} '{row['name']}' in time; it was not run.\n")
        for row in scheduled:
            if await self.db(ins.sign, self.master, self.signer, row["id"], expect=(ins.SCHEDULED,)):
                try:
                    issued = await ins.issue_at_core(self.core_url, self.core_token, row["id"], verify=self.ca_file)
                    log.info("scheduled instruction %d issued to %d devices", row["id"], issued["targeted"])
                except ins.CoreError as e:
                    log.error("scheduled instruction %d: %s; the Core will be asked again", row["id"], e)
                    # it is 'created' and signed; the next tick retries the Core (idempotent issue)
        for row in await self.db(self._stuck_ready):
            try:
                await ins.issue_at_core(self.core_url, self.core_token, row, verify=self.ca_file)
            except ins.CoreError as e:
                log.warning("instruction %d still waiting for the Core: %s", row, e)

    def _stuck_ready(self) -> list[int]:
        """Signed but never issued (the Core was down at the time): retry, while the window lasts."""
        with self.master.connect() as c:
            return [r[0] for r in c.execute(sa.select(instructions.c.id).where(
                instructions.c.status == ins.READY, instructions.c.expires_at > time.time(),
                instructions.c.issued_at < time.time() - 5))]

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except sa.exc.OperationalError as e:
                log.error("master database unavailable: %s; retrying", str(e.orig).strip()[:200])
            except Exception:
                log.exception("coordinator tick failed; retrying")
            await asyncio.sleep(self.loop_interval)
