"""Instruction records in the master database: create, sign, and hand to the Core.

Shared by the Consumer API (questions go straight out) and the Coordinator (actions after
approval, scheduled instructions when their time comes). The body is signed only when the
instruction is about to be issued, so its gather window starts then, not at request time.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import sqlalchemy as sa

from quanta import protocol as p
from quanta.db.tables import instructions
from quanta.internal import bearer, http_client
from quanta.pki import Signer
from quanta.states import (APPROVAL_EXPIRED, DONE_STATES, NEW, PENDING_APPROVAL, READY,  # noqa: F401
                           REJECTED, SCHEDULED)


class CoreError(RuntimeError):
    pass


def create(engine: sa.Engine, *, created_by: str, name: str, kind: str, payload: str, parameters: dict[str, Any],
           devices: list[str] | None, instruction_ttl: int, response_ttl: int, status: str,
           scheduled_at: float | None = None, approval_expires_at: float | None = None,
           instruction_set: str | None = None) -> int:
    with engine.begin() as c:
        iid = c.execute(instructions.insert().values(
            name=name, kind=kind, payload=payload, parameters=parameters, scope=devices, created_by=created_by,
            created_at=time.time(), status=status, instruction_ttl=instruction_ttl, response_ttl=response_ttl,
            scheduled_at=scheduled_at, approval_expires_at=approval_expires_at,
            instruction_set=instruction_set)).inserted_primary_key[0]
    return int(iid)


def sign(engine: sa.Engine, signer: Signer, iid: int, *, expect: tuple[str, ...]) -> bool:
    """Sign the body with a gather window starting now and mark it ready for the Core.

    Only moves from one of the ``expect`` states (compare-and-set), so two deciders cannot both
    issue it. Returns False if the instruction was not in such a state.
    """
    with engine.begin() as c:
        row = c.execute(sa.select(instructions).where(instructions.c.id == iid)).first()
        if row is None or row.status not in expect:
            return False
        now = time.time()
        body = p.InstructionBody(id=iid, name=row.name, kind=row.kind, payload=row.payload,
                                 parameters=dict(row.parameters or {}), issued_at=now,
                                 expires_at=now + (row.instruction_ttl or 60))
        raw = p.encode_body(body)
        res = c.execute(instructions.update().where(instructions.c.id == iid, instructions.c.status == row.status)
                        .values(body=raw, signature=signer.sign(raw), issued_at=now, expires_at=body.expires_at,
                                response_expires_at=now + (row.response_ttl or 7 * 86400), status=READY))
        return res.rowcount == 1


def decide(engine: sa.Engine, iid: int, *, status: str, by: str, reason: str | None, expect: str) -> bool:
    """Record a decision (reject, expire) with compare-and-set on the current status."""
    with engine.begin() as c:
        res = c.execute(instructions.update().where(instructions.c.id == iid, instructions.c.status == expect)
                        .values(status=status, decided_by=by, decided_at=time.time(), decision_reason=reason))
        return res.rowcount == 1


def mark_approved(engine: sa.Engine, iid: int, by: str, reason: str | None) -> None:
    with engine.begin() as c:
        c.execute(instructions.update().where(instructions.c.id == iid)
                  .values(decided_by=by, decided_at=time.time(), decision_reason=reason))


class CoreRefused(CoreError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


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
        raise CoreError(f"the Core at {core_url} is unreachable: {e}") from None
    if r.status_code != 200:
        raise CoreRefused(f"the Core refused to {verb.lower()} instruction {iid}: {r.status_code} {r.text}",
                          r.status_code)
    return r.json()


async def issue_at_core(core_url: str, core_token: str, iid: int, verify: Any = None) -> dict[str, Any]:
    return await call_core(core_url, core_token, iid, "Issue", verify)
