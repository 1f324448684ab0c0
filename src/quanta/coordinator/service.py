"""The Coordinator: approvals for actions (never by the requester; N distinct approvers where the
instruction set asks for more than one), an optional one-time code sent by email to the approver,
expiry of requests nobody decided on, scheduled instructions, and email notifications over SMTP.

Every database call runs in a worker thread (``Coordinator.db``), never on the event loop. An
approved instruction the Core cannot take (down, or its relay answering 5xx) stays approved and
signed (``created``) with the reason in ``issue_error``, and is issued by one background retry
with exponential back-off (tenacity) while its gather window lasts: never by two at once. If
the window ends first it becomes final, ``expired`` with the reason (never ``created`` forever).
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
from tenacity import AsyncRetrying, retry_if_exception, wait_exponential

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


def load_smtp(engine: sa.Engine, *, password: bool = True) -> SmtpConfig | None:
    """The SMTP settings; ``password=False`` leaves the stored password unread (None), for replacing
    one that no longer decrypts. Otherwise an undecryptable password raises ``SecretBoxError``."""
    with engine.connect() as c:
        row = c.execute(sa.select(smtp_settings).where(smtp_settings.c.id == 1)).first()
    if row is None:
        return None
    cfg = SmtpConfig(row.enabled, row.host, row.port, row.username,
                     secretbox.unseal(engine, row.password) if password else None,
                     row.starttls, row.from_addr, row.require_approval_code)
    if not password:
        return cfg
    if secretbox.needs_resealing(row.password):  # written in clear before secrets were sealed: seal it now
        try:
            save_smtp(engine, cfg)
        except secretbox.SecretBoxError as e:  # reading still works; the next save through a data directory seals
            log.warning("the SMTP password is stored in clear and cannot be sealed here: %s", e)
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


def show_approvers_required(engine: sa.Engine, instruction_set: str) -> dict[str, Any]:
    """The approval policy that applies to new actions of ``instruction_set``, how many enabled
    users may approve them, and a warning when that is too few for any request to pass."""
    with engine.connect() as c:
        n = ins.approvers_required(c, instruction_set)
        names = [r[0] for r in c.execute(sa.select(users.c.username).where(users.c.disabled == sa.false()))]
    eligible = sum(1 for u in names if rbac.allowed(engine, u, "approve", instruction_set))
    shown: dict[str, Any] = {"instruction_set": instruction_set, "approvers_required": n,
                             "eligible_approvers": eligible}
    if eligible < n:
        shown["warning"] = (f"only {eligible} enabled user(s) may approve actions of {instruction_set!r}: every "
                            f"request needing {n} approvers will expire unapproved until more are given the role")
    return shown


def _code_hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


class Coordinator:
    def __init__(self, master: sa.Engine, signer: Signer, core_url: str, core_token: str, *,
                 approval_ttl: float = 24 * 3600, loop_interval: float = 1.0, ca_file: str | None = None,
                 portal_url: str | None = None, retry_min: float = 0.5, retry_max: float = 15.0,
                 issue_timeout: float = 10.0) -> None:
        self.ca_file = ca_file
        self.master = master
        self.signer = signer
        self.core_url = core_url
        self.core_token = core_token
        self.approval_ttl = approval_ttl
        self.loop_interval = loop_interval
        self.portal_url = portal_url.rstrip("/") if portal_url else None  # https://host:port/Explorer/
        self.retry_min, self.retry_max = retry_min, retry_max
        # one Issue call's limit: well under the Consumer API's 30 s wait for the Coordinator, so a
        # Core that hangs gives the approver "approved, waiting for the Core", not a timeout
        self.issue_timeout = issue_timeout
        self._task: asyncio.Task[None] | None = None
        self._issuing: set[int] = set()  # instructions this process is asking the Core to issue now
        self._retries: set[asyncio.Task[None]] = set()

    def link(self, iid: int) -> str:
        """Where the portal shows instruction ``iid`` (empty if no portal address is known)."""
        return f"{self.portal_url}/#/i/{iid}" if self.portal_url else ""

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

    def _emails(self, roles: tuple[str, ...], exclude: str | None = None,
                also_exclude: tuple[str, ...] = ()) -> list[str]:
        skip = {exclude, *also_exclude}
        with self.master.connect() as c:
            rows = c.execute(sa.select(users.c.username, users.c.email).where(users.c.role.in_(roles),
                                                                             users.c.disabled == sa.false()))
            return [r.email for r in rows if r.email and r.username not in skip]

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
                          f"{self._needs(row)}Approve or reject it in the portal: {self.link(iid)}\n"
                          f"or with 'quanta approve' / 'quanta reject'. "
                          f"It expires unapproved at {time.ctime(row['approval_expires_at'] or 0)}.\n")

    @staticmethod
    def _needs(row: dict[str, Any]) -> str:
        n = row.get("approvers_required") or 1
        return f"It needs {n} approvals by different people other than {row['created_by']}.\n\n" if n > 1 else ""

    def _check_approver(self, iid: int, username: str, role: str) -> dict[str, Any]:
        """The instruction, if ``username`` may decide on it now (blocking: run it in a thread)."""
        row = self._instruction(iid)
        if row["status"] != ins.PENDING_APPROVAL:
            raise WorkflowError(409, f"instruction {row['id']} is {row['status']}, not pending approval")
        if username == row["created_by"]:
            raise WorkflowError(403, "you cannot approve or reject your own instruction: a second person must")
        iset = row.get("instruction_set") or "*"
        if not rbac.allowed(self.master, username, "approve", iset):
            raise WorkflowError(403, f"{username} ({role}) may not approve instructions of set {iset!r}")
        return row

    def _store_code(self, iid: int, username: str, code: str) -> None:
        with self.master.begin() as c:
            c.execute(approval_codes.insert().values(instruction_id=iid, username=username, code_hash=_code_hash(code),
                                                     expires_at=time.time() + CODE_TTL))

    async def request_code(self, iid: int, username: str, role: str) -> dict[str, Any]:
        await self.db(self._check_approver, iid, username, role)
        email = await self.db(self._email_of, username)
        if not email:
            raise WorkflowError(409, f"user {username!r} has no email address for a one-time code")
        code = f"{secrets.randbelow(10**6):06d}"
        await self.db(self._store_code, iid, username, code)
        sent = await self.notify([email], f"Quanta: your approval code for instruction {iid}",
                                 f"Your one-time code to approve instruction {iid} is {code}. "
                                 f"It is valid for {int(CODE_TTL // 60)} minutes.\n{self.link(iid)}\n")
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
                    used = c.execute(approval_codes.update().where(approval_codes.c.id == r.id,
                                                                   approval_codes.c.used == sa.false())
                                     .values(used=True))
                    return used.rowcount == 1  # a code is spent once, even by two racing requests
        return False

    async def approve(self, iid: int, username: str, role: str, code: str | None, reason: str | None,
                      source: str = "") -> dict[str, Any]:
        """Count ``username``'s approval. The answer's ``status`` says what happened: still
        ``pending_approval`` (more approvers needed), ``scheduled``, ``active``/``finished`` (issued),
        or ``created`` with ``issued: false`` (approved; the Core is unavailable and the Coordinator
        issues it as soon as the Core is back). Refusals raise WorkflowError (403, 404, 409)."""
        row = await self.db(self._check_approver, iid, username, role)
        cfg = await self.db(load_smtp, self.master)
        if cfg is not None and cfg.require_approval_code and not await self.db(self._use_code, iid, username, code):
            await self.db(store.audit, self.master, username, "approve_refused", f"instruction:{iid}",
                          source=source, reason="missing or wrong one-time code")
            raise WorkflowError(403, "a valid one-time code is required: request one, then approve with it")
        try:
            done = await self.db(ins.approve, self.master, self.signer, iid, by=username, reason=reason)
        except ins.ApprovalRefused as e:
            raise WorkflowError(e.status, str(e)) from None
        await self.db(store.audit, self.master, username, "approve", f"instruction:{iid}", source=source,
                      reason=reason, approvals=len(done.approvers), required=done.required)
        answer: dict[str, Any] = {"id": iid, "status": done.status, "approvers": list(done.approvers),
                                  "approvers_required": done.required}
        if not done.complete:
            more = done.required - len(done.approvers)
            answer["message"] = (f"approved by {username}; {more} more approval(s) needed from different people "
                                 f"other than {row['created_by']}")
            # the approvers who have not approved yet hear how far it is (never the requester)
            others = await self.db(self._emails, APPROVER_ROLES, row["created_by"], done.approvers)
            await self.notify(others, f"Quanta: instruction {iid} ({row['name']}): {len(done.approvers)} of "
                                      f"{done.required} approvals",
                              f"{username} approved instruction {iid} '{row['name']}' requested by "
                              f"{row['created_by']}; approved so far by {', '.join(done.approvers)}. It needs "
                              f"{more} more approval(s) by different people before it runs.\n"
                              f"Approve or reject it in the portal: {self.link(iid)}\n")
            return answer
        if done.status == ins.SCHEDULED:
            answer["message"] = f"approved; it runs at {time.ctime(row['scheduled_at'])}"
            return answer
        try:
            issued = await self.issue_now(iid)
        except ins.CoreError as e:
            waiting = ins.core_retryable(e)
            answer |= {"status": ins.READY, "issued": False, "retrying": waiting,
                       "message": f"approved, but not issued yet: {e}" +
                                  ("; the Coordinator issues it as soon as the Core is back" if waiting else "")}
            await self.notify([await self.db(self._email_of, row["created_by"])],
                              f"Quanta: instruction {iid} approved, waiting for the Core",
                              f"{username} approved instruction {iid} '{row['name']}', but the Core could not take it "
                              f"yet ({e}).\n{self.link(iid)}\n")
            return answer
        await self.notify([await self.db(self._email_of, row["created_by"])],
                          f"Quanta: instruction {iid} approved", f"{', '.join(done.approvers)} approved instruction "
                          f"{iid} '{row['name']}'. It was sent to {issued['targeted']} device(s).\n{self.link(iid)}\n")
        return answer | {"status": issued["status"], "targeted": issued["targeted"],
                         "issued": issued["status"] in ("active", "finished")}  # not if cancelled meanwhile

    async def reject(self, iid: int, username: str, role: str, reason: str, source: str = "") -> dict[str, Any]:
        row = await self.db(self._check_approver, iid, username, role)
        if not await self.db(ins.decide, self.master, iid, status=ins.REJECTED, by=username, reason=reason,
                             expect=ins.PENDING_APPROVAL):
            now = await self.db(self._instruction, iid)
            raise WorkflowError(409, f"instruction {iid} is {now['status']}, not pending approval: "
                                     f"it was decided by someone else meanwhile")
        await self.db(store.audit, self.master, username, "reject", f"instruction:{iid}", source=source,
                      reason=reason)
        await self.notify([await self.db(self._email_of, row["created_by"])], f"Quanta: instruction {iid} rejected",
                          f"{username} rejected instruction {iid} '{row['name']}': {reason}\n{self.link(iid)}\n")
        return {"id": iid, "status": ins.REJECTED}

    def _approval_state(self, iid: int) -> dict[str, Any]:
        row = self._instruction(iid)
        return {"id": iid, "status": row["status"], "approvers_required": row["approvers_required"] or 1,
                "approvals": ins.approvals_of(self.master, iid), "decided_by": row["decided_by"],
                "issue_error": row["issue_error"]}

    async def approval_state(self, iid: int) -> dict[str, Any]:
        """Who approved (when, why), how many are needed, and why the Core has not issued it yet."""
        return await self.db(self._approval_state, iid)

    # ---------------------------------------------------------------- issuing
    async def _note(self, iid: int, error: str | None) -> None:
        try:
            await self.db(ins.note_issue_error, self.master, iid, error)
        except sa.exc.SQLAlchemyError as e:  # the note is for people; the issue itself stands or is retried
            log.warning("instruction %d: could not record its issue state: %s", iid, type(e).__name__)

    async def _issue(self, iid: int) -> dict[str, Any]:
        """Ask the Core once; record (or clear) why it is not issued yet."""
        try:
            issued = await ins.issue_at_core(self.core_url, self.core_token, iid, verify=self.ca_file,
                                             timeout=self.issue_timeout)
        except ins.CoreError as e:
            await self._note(iid, str(e))
            raise
        await self._note(iid, None)
        return issued

    async def issue_now(self, iid: int) -> dict[str, Any]:
        """Issue a signed instruction now; if the Core is unavailable, leave it to one background
        retry (and raise the CoreError). Never two calls for one instruction at once."""
        if iid in self._issuing:
            raise ins.CoreError(f"instruction {iid} is already being issued")
        self._issuing.add(iid)
        try:
            issued = await self._issue(iid)
        except ins.CoreError as e:
            self._issuing.discard(iid)
            if ins.core_retryable(e):
                self.retry_issue(iid)
            raise
        self._issuing.discard(iid)
        return issued

    def retry_issue(self, iid: int) -> bool:
        """Start the background retry of ``iid`` unless one is already under way."""
        if iid in self._issuing:
            return False
        self._issuing.add(iid)
        task = asyncio.create_task(self._retry(iid))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)
        return True

    async def _retry(self, iid: int) -> None:
        try:
            row = await self.db(self._instruction, iid)
            window_ends = row["expires_at"] or 0.0

            def window_closed(_state: Any) -> bool:
                return time.time() >= window_ends

            backoff = wait_exponential(multiplier=self.retry_min, min=self.retry_min, max=self.retry_max)

            def wait(state: Any) -> float:  # never sleep past the window's end: the last try is at its end
                return max(0.0, min(backoff(state), window_ends - time.time()))

            retrying = AsyncRetrying(retry=retry_if_exception(ins.core_retryable), stop=window_closed, reraise=True,
                                     wait=wait)
            async for attempt in retrying:
                with attempt:
                    n = attempt.retry_state.attempt_number
                    if n > 1:
                        now = await self.db(self._instruction, iid)
                        if now["status"] != ins.READY:  # cancelled, or issued by someone else, meanwhile
                            log.info("instruction %d is %s: no longer asking the Core", iid, now["status"])
                            return
                        log.info("instruction %d: asking the Core again (attempt %d)", iid, n)
                    issued = await self._issue(iid)
            if issued["status"] in ("active", "finished"):
                log.info("instruction %d issued to %d device(s) after the Core came back", iid, issued["targeted"])
            else:  # cancelled (or ended unissued) meanwhile: the Core refused to bring it back
                log.info("instruction %d is %s: the Core did not issue it", iid, issued["status"])
        except ins.CoreError as e:
            if ins.core_retryable(e):
                log.error("instruction %d was approved but never issued: %s", iid, e)
                await self._end_unissued(iid, str(e))
            else:
                await self._note(iid, f"not issued: {e}")
        except WorkflowError:
            pass  # deleted meanwhile
        except sa.exc.SQLAlchemyError as e:  # the timer's sweep hands it to a new retry later
            log.error("instruction %d: master database unavailable while issuing (%s); retrying later", iid,
                      type(e).__name__)
        finally:
            self._issuing.discard(iid)

    async def _end_unissued(self, iid: int, last_error: str | None) -> bool:
        """The gather window of an approved instruction ended while the Core could not take it:
        make that final (NEVER_ISSUED, "expired"), with the reason, so waiters end. A compare-and-set
        from READY: one that was issued or cancelled meanwhile is left as it is."""
        why = "never issued: the Core was unavailable until its gather window ended" + (
            f" ({last_error})" if last_error else "")
        if not await self.db(ins.never_issued, self.master, iid, why=why):
            return False
        log.warning("instruction %d expired unissued: %s", iid, why)
        await self.db(store.audit, self.master, "coordinator", "never_issued", f"instruction:{iid}", reason=why)
        row = await self.db(self._instruction, iid)
        await self.notify([await self.db(self._email_of, row["created_by"])],
                          f"Quanta: instruction {iid} was never issued",
                          f"Instruction {iid} '{row['name']}' was approved, but the Core could not take it before "
                          f"its gather window ended; it did not run. Ask again once the Core is back.\n"
                          f"{why}\n{self.link(iid)}\n")
        return True

    async def stop(self) -> None:
        for task in list(self._retries):
            task.cancel()
        await asyncio.gather(*self._retries, return_exceptions=True)

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
                    issued = await self.issue_now(row["id"])
                    log.info("scheduled instruction %d issued to %d devices", row["id"], issued["targeted"])
                except ins.CoreError as e:
                    log.error("scheduled instruction %d: %s; the Core will be asked again", row["id"], e)
        for iid in await self.db(self._stuck_ready):
            if self.retry_issue(iid):  # e.g. signed before this Coordinator (re)started
                log.warning("instruction %d is signed but not issued; asking the Core again", iid)
        for iid, error in await self.db(self._unissued_past_window):
            if iid not in self._issuing:  # a retry under way ends it itself
                await self._end_unissued(iid, error)

    def _stuck_ready(self) -> list[int]:
        """Signed but never issued (the Core was down, or this process restarted): retry, while the
        window lasts. Young ones are still being issued by whoever signed them."""
        with self.master.connect() as c:
            return [r[0] for r in c.execute(sa.select(instructions.c.id).where(
                instructions.c.status == ins.READY, instructions.c.expires_at > time.time(),
                instructions.c.issued_at < time.time() - 5))]  # retry_issue skips those under way

    def _unissued_past_window(self) -> list[tuple[int, str | None]]:
        """Signed, never issued, and its gather window is over (the Core was down throughout, or
        this process was not running): they end as NEVER_ISSUED, never stay ``created``."""
        with self.master.connect() as c:
            return [(r.id, r.issue_error) for r in c.execute(
                sa.select(instructions.c.id, instructions.c.issue_error).where(
                    instructions.c.status == ins.READY, instructions.c.expires_at <= time.time()))]

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except sa.exc.OperationalError as e:
                log.error("master database unavailable: %s; retrying", str(e.orig).strip()[:200])
            except Exception:
                log.exception("coordinator tick failed; retrying")
            await asyncio.sleep(self.loop_interval)
