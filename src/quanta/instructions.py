"""Instruction records in the master database: create, sign, and hand to the Core.

Shared by the Consumer API (questions go straight out) and the Coordinator (actions after
approval, scheduled instructions when their time comes). The body is signed only when the
instruction is about to be issued, so its gather window starts then, not at request time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import sqlalchemy as sa

from quanta import protocol as p
from quanta.db.tables import approvals, instruction_sets, instructions
from quanta.internal import bearer, http_client
from quanta.pki import Signer
from quanta.states import (APPROVAL_EXPIRED, CANCELLED, DONE_STATES, NEVER_ISSUED, NEW,  # noqa: F401
                           PENDING_APPROVAL, READY, REJECTED, SCHEDULED)

MAX_APPROVERS = 100  # the instruction_sets check constraint agrees
DEFAULT_SET = "*"  # the policy of sets without their own row, and of raw SCALE


class CoreError(RuntimeError):
    pass


def approvers_required(conn: sa.Connection, instruction_set: str | None) -> int:
    """Distinct approvers an action of ``instruction_set`` needs: its own row, else "*", else 1."""
    names = [instruction_set, DEFAULT_SET] if instruction_set and instruction_set != DEFAULT_SET else [DEFAULT_SET]
    rows = dict(c for c in conn.execute(sa.select(instruction_sets.c.name, instruction_sets.c.approvers_required)
                                          .where(instruction_sets.c.name.in_(names))).all())
    for n in names:
        if n in rows:
            return int(rows[n])
    return 1


def set_approvers_required(engine: sa.Engine, instruction_set: str, n: int) -> int | None:
    """Set how many distinct approvers (never the requester) actions of ``instruction_set`` need
    ("*": every set without its own setting, and raw SCALE). Returns the previous setting (None:
    there was none). Pending requests keep the number they were requested with."""
    if not 1 <= n <= MAX_APPROVERS:
        raise ValueError(f"approvers required must be between 1 and {MAX_APPROVERS}, not {n}")
    if not instruction_set or len(instruction_set) > 128:
        raise ValueError("an instruction set name is 1 to 128 characters")
    with engine.begin() as c:
        before = c.execute(sa.select(instruction_sets.c.approvers_required)
                           .where(instruction_sets.c.name == instruction_set)).scalar()
        if before is None:
            c.execute(instruction_sets.insert().values(name=instruction_set, approvers_required=n))
        else:
            c.execute(instruction_sets.update().where(instruction_sets.c.name == instruction_set)
                      .values(approvers_required=n))
    return before


def create(engine: sa.Engine, *, created_by: str, name: str, kind: str, payload: str, parameters: dict[str, Any],
           devices: list[str] | None, instruction_ttl: int, response_ttl: int, status: str,
           scheduled_at: float | None = None, approval_expires_at: float | None = None,
           instruction_set: str | None = None, signer: Signer | None = None,
           then: Callable[[sa.Connection, int, str], None] | None = None) -> tuple[int, str]:
    """Store an instruction; one that waits for approval takes its set's approver count now. With
    ``signer``, a NEW one is signed in the same transaction and stored READY. ``then(conn, id,
    status)`` runs in that transaction too (the audit row), so the instruction, its signature and
    its audit row commit together, in one round trip to the database. Returns (id, status)."""
    with engine.begin() as c:
        required = approvers_required(c, instruction_set) if status == PENDING_APPROVAL else None
        iid = int(c.execute(instructions.insert().values(
            name=name, kind=kind, payload=payload, parameters=parameters, scope=devices, created_by=created_by,
            created_at=time.time(), status=status, instruction_ttl=instruction_ttl, response_ttl=response_ttl,
            scheduled_at=scheduled_at, approval_expires_at=approval_expires_at,
            instruction_set=instruction_set, approvers_required=required)).inserted_primary_key[0])
        if signer is not None and status == NEW and _sign_row(c, signer, iid, (NEW,)):
            status = READY
        if then is not None:
            then(c, iid, status)
    return iid, status


def storage_owner(c: sa.Connection, signer: Signer, row: Any) -> str:
    """Who owns the ``Storage.*`` tables of instruction ``row`` on the devices (signed into its
    body): for an instruction of a definition, the definition's pack and the fingerprint of its
    publisher's key (``pack:Quanta-Inventory@<fingerprint>``), so no other pack, whatever its
    definitions are called, and no other publisher, whatever its pack is called, shares them; for
    raw SCALE, the server's own signing key (``adhoc@<fingerprint>``): every ad-hoc instruction of
    this installation shares one owner, apart from every pack."""
    from quanta.db.tables import definitions, publishers
    from quanta.signing import fingerprint

    if row.instruction_set is None:
        return f"adhoc@{signer.fingerprint}"
    found = c.execute(sa.select(definitions.c.pack, publishers.c.public_key)
                      .join(publishers, publishers.c.name == definitions.c.publisher)
                      .where(definitions.c.name == row.name)).first()
    if found is None:  # its definition (or its publisher) was removed since it was created
        return f"orphan@{signer.fingerprint}"
    pack = found.pack.rsplit(" ", 1)[0]  # stored as "<name> <version>": the version does not count
    return f"pack:{pack}@{fingerprint(found.public_key.encode())}"


def _signed(signer: Signer, row: Any, now: float, owner: str) -> dict[str, Any]:
    """The columns that make ``row`` ready for the Core: its body signed with a window from now."""
    body = p.InstructionBody(id=row.id, name=row.name, kind=row.kind, payload=row.payload,
                             parameters=dict(row.parameters or {}), issued_at=now,
                             expires_at=now + (row.instruction_ttl or 60), owner=owner)
    raw = p.encode_body(body)
    return dict(body=raw, signature=signer.sign(raw), issued_at=now, expires_at=body.expires_at,
                response_expires_at=now + (row.response_ttl or 7 * 86400), status=READY, issue_error=None)


def sign(engine: sa.Engine, signer: Signer, iid: int, *, expect: tuple[str, ...]) -> bool:
    """Sign the body with a gather window starting now and mark it ready for the Core.

    Only moves from one of the ``expect`` states (compare-and-set), so two deciders cannot both
    issue it. Returns False if the instruction was not in such a state.
    """
    with engine.begin() as c:
        return _sign_row(c, signer, iid, expect)


def _sign_row(c: sa.Connection, signer: Signer, iid: int, expect: tuple[str, ...]) -> bool:
    """In the caller's transaction: sign instruction ``iid`` and make it READY, a compare-and-set
    from one of ``expect``."""
    row = c.execute(sa.select(instructions).where(instructions.c.id == iid)).first()
    if row is None or row.status not in expect:
        return False
    res = c.execute(instructions.update().where(instructions.c.id == iid, instructions.c.status == row.status)
                    .values(**_signed(signer, row, time.time(), storage_owner(c, signer, row))))
    return res.rowcount == 1


def decide(engine: sa.Engine, iid: int, *, status: str, by: str, reason: str | None, expect: str) -> bool:
    """Move the instruction from ``expect`` to ``status`` (rejected, approval_expired, cancelled) in
    one compare-and-set that writes the decision (who, when, why) in the same statement. False:
    it was no longer ``expect`` (someone else decided first), and nothing was written."""
    with engine.begin() as c:
        res = c.execute(instructions.update().where(instructions.c.id == iid, instructions.c.status == expect)
                        .values(status=status, decided_by=by, decided_at=time.time(), decision_reason=reason))
        return res.rowcount == 1


# Before the Core takes it, an instruction in one of these can be cancelled (a compare-and-set from
# that state; the Core activates only from READY, with a compare-and-set too, so a cancelled one
# never runs).
CANCELLABLE = (PENDING_APPROVAL, SCHEDULED, READY)


def cancel(engine: sa.Engine, iid: int, *, by: str, expect: str) -> bool:
    """Cancel an instruction the Core has not taken: ``expect`` (one of :data:`CANCELLABLE`) ->
    cancelled, one compare-and-set writing who cancelled. False: it changed meanwhile (approved,
    issued, decided by someone else); nothing was written. Approvals already given stay recorded."""
    if expect not in CANCELLABLE:
        raise ValueError(f"an instruction that is {expect} cannot be cancelled here")
    reason = ("cancelled after approval, before the Core issued it" if expect == READY
              else "cancelled before it ran")
    with engine.begin() as c:
        res = c.execute(instructions.update().where(instructions.c.id == iid, instructions.c.status == expect)
                        .values(status=CANCELLED, decided_by=by, decided_at=time.time(), decision_reason=reason,
                                issue_error=None))
        return res.rowcount == 1


def never_issued(engine: sa.Engine, iid: int, *, why: str, now: float | None = None) -> bool:
    """End an approved, signed instruction the Core never took, once its gather window is over:
    READY -> NEVER_ISSUED ("expired"), a compare-and-set that also writes ``why`` to issue_error.
    The approver's decision (decided_by, reason) stays as it was. False: it is not READY any more
    (issued, cancelled), or its window is still open; nothing was written."""
    now = time.time() if now is None else now
    with engine.begin() as c:
        res = c.execute(instructions.update().where(instructions.c.id == iid, instructions.c.status == READY,
                                                    instructions.c.expires_at <= now)
                        .values(status=NEVER_ISSUED, issue_error=why[:2000]))
        return res.rowcount == 1


class ApprovalRefused(Exception):
    """An approval that cannot count; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Approval:
    """What one approval did: ``approvers`` so far (in order), of ``required``; ``status`` is the
    instruction's status afterwards (pending_approval until the last one needed)."""

    status: str
    approvers: tuple[str, ...]
    required: int

    @property
    def complete(self) -> bool:
        return self.status != PENDING_APPROVAL


def approve(engine: sa.Engine, signer: Signer, iid: int, *, by: str, reason: str | None,
            now: float | None = None) -> Approval:
    """Record ``by``'s approval of a pending action, in one transaction.

    The first statement is a compare-and-set on the instruction (still pending, its approval window
    still open) that also takes its row lock, so approvals of one instruction are serialised: a
    concurrent rejection, expiry, cancel or the approval that completed the count is seen, and this
    one is refused. The approval that brings the count of distinct approvers (never the requester)
    to the number required moves the instruction on in the same transaction, with one
    compare-and-set that writes the decision (who, when, why) and signs the body; a later one finds
    it no longer pending.
    """
    now = time.time() if now is None else now
    with engine.begin() as c:
        held = c.execute(instructions.update().where(
            instructions.c.id == iid, instructions.c.status == PENDING_APPROVAL,
            sa.or_(instructions.c.approval_expires_at.is_(None), instructions.c.approval_expires_at > now))
            .values(status=instructions.c.status)).rowcount
        row = c.execute(sa.select(instructions).where(instructions.c.id == iid)).first()
        if row is None:
            raise ApprovalRefused(404, f"instruction {iid} not found")
        if held != 1:
            if row.status == PENDING_APPROVAL:
                raise ApprovalRefused(409, f"instruction {iid}'s approval window has ended; it expires unapproved")
            raise ApprovalRefused(409, f"instruction {iid} is {row.status}, not pending approval")
        now = max(now, time.time())  # the lock may have been waited for: record when it counted
        if by == row.created_by:
            raise ApprovalRefused(403, "you cannot approve or reject your own instruction: a second person must")
        if c.execute(sa.select(approvals.c.id).where(approvals.c.instruction_id == iid,
                                                     approvals.c.approver == by)).first():
            raise ApprovalRefused(409, f"{by} has already approved instruction {iid}; another person must approve it")
        try:  # the unique (instruction, approver) key is the backstop of the check above
            c.execute(approvals.insert().values(instruction_id=iid, approver=by, approved_at=now, reason=reason))
        except sa.exc.IntegrityError:
            raise ApprovalRefused(409, f"{by} has already approved instruction {iid}") from None
        names = tuple(r[0] for r in c.execute(sa.select(approvals.c.approver).where(approvals.c.instruction_id == iid)
                                              .order_by(approvals.c.id)))  # ids are taken under the lock
        required = row.approvers_required or 1
        if len(names) < required:
            return Approval(PENDING_APPROVAL, names, required)
        decision = dict(decided_by=by, decided_at=now, decision_reason=reason)
        if row.scheduled_at and row.scheduled_at > now:
            values = dict(status=SCHEDULED, **decision)
        else:
            values = dict(_signed(signer, row, now, storage_owner(c, signer, row)), **decision)
        done = c.execute(instructions.update().where(instructions.c.id == iid,
                                                     instructions.c.status == PENDING_APPROVAL).values(**values))
        if done.rowcount != 1:  # cannot happen while the row lock is held; never decide twice
            raise ApprovalRefused(409, f"instruction {iid} was decided by someone else meanwhile")
        return Approval(values["status"], names, required)


def approvals_of(engine: sa.Engine, iid: int) -> list[dict[str, Any]]:
    with engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(
            sa.select(approvals.c.approver, approvals.c.approved_at, approvals.c.reason)
            .where(approvals.c.instruction_id == iid).order_by(approvals.c.id))]


def note_issue_error(engine: sa.Engine, iid: int, error: str | None) -> None:
    """Say (or clear, with None) why an approved instruction is still waiting for the Core."""
    with engine.begin() as c:
        q = instructions.update().where(instructions.c.id == iid)
        if error is not None:
            q = q.where(instructions.c.status == READY)
        else:  # the reason an instruction was never issued stays with it
            q = q.where(instructions.c.status != NEVER_ISSUED)
        c.execute(q.values(issue_error=error[:2000] if error else None))


class CoreRefused(CoreError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def core_retryable(e: BaseException) -> bool:
    """The Core could not be reached, or is (or its relay is) unavailable: asking again may work.
    A refusal (404, 409: not signed, unknown) will not change by asking again."""
    return isinstance(e, CoreError) and (not isinstance(e, CoreRefused) or e.status >= 500)


async def call_core(core_url: str, core_token: str, iid: int, verb: str, verify: Any = None,
                    params: dict[str, Any] | None = None, timeout: float = 30) -> dict[str, Any]:
    """POST ``/Core/Instructions/{iid}/{verb}`` (Issue, Cancel, Wait) at the Core: local (http,
    core port) or a remote Response Stack's web tier (https, /Core), verified against the
    installation CA when ``verify`` is a CA path. Raises CoreError if unreachable, CoreRefused if
    refused."""
    try:
        r = await http_client(verify).post(f"{core_url.rstrip('/')}/Core/Instructions/{iid}/{verb}",
                                                         params=params, headers=bearer(core_token), timeout=timeout)
    except httpx.HTTPError as e:
        raise CoreError(f"the Core at {core_url} is unreachable: {str(e) or type(e).__name__}") from None
    if r.status_code != 200:
        raise CoreRefused(f"the Core refused to {verb.lower()} instruction {iid}: {r.status_code} {r.text}",
                          r.status_code)
    return r.json()


async def issue_at_core(core_url: str, core_token: str, iid: int, verify: Any = None,
                        timeout: float = 30) -> dict[str, Any]:
    return await call_core(core_url, core_token, iid, "Issue", verify, timeout=timeout)
