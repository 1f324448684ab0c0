"""Instructions: issue, list, status, long-poll, cancel, and the approval relays to the Coordinator."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from quanta import instructions as ins
from quanta import states
from quanta.accounts import validate
from quanta.consumer_api.deps import (Api, CurrentUser, ScopedCaller, VisibleInstruction, authenticated, scoped,
                                      visible_instruction)
from quanta.consumer_api.errors import ApiError, BadGateway, Conflict, Forbidden, Invalid, NotFound
from quanta.consumer_api.models import DecisionRequest, InstructionPage, InstructionStatus, IssueRequest
from quanta.consumer_api.service import ADMIN_ROLE
from quanta.db import store

log = logging.getLogger("quanta.consumer_api")
router = APIRouter()

WAIT_MAX = 60.0  # longest long poll (GET .../Wait) a client may ask for
CORE_WAIT = 25.0  # longest single Wait asked of the Core (its own limit is 30 s)
MAX_OFFSET = 2**31 - 1


@router.post("/Consumer/Instructions", status_code=201, dependencies=[Depends(authenticated)])
async def issue(req: IssueRequest, user: CurrentUser, api: Api) -> dict[str, Any]:
    iid, status = await api.db(api.plan_and_create, user, req)
    if status == ins.PENDING_APPROVAL:
        try:
            await api.coordinator(f"/Coordinator/Instructions/{iid}/Submitted")
        except ApiError as e:  # stored and pending either way; approvers can still find it
            log.warning("could not notify the Coordinator about instruction %d: %s", iid, e.detail)
        return {"id": iid, "status": status, "targeted": 0,
                "message": "actions need a second person's approval before they run"}
    if status == ins.SCHEDULED:
        return {"id": iid, "status": status, "targeted": 0}
    issued = await api.core_issue(iid)
    return {"id": iid, "status": issued["status"], "targeted": issued["targeted"]}


# An instruction's statuses (quanta.states), what ?status= may name.
STATUSES = (states.NEW, states.PENDING_APPROVAL, states.SCHEDULED, states.READY, "active", "finished",
            states.CANCELLED, states.REJECTED, states.APPROVAL_EXPIRED, states.NEVER_ISSUED)
UnixTimeQuery = Annotated[float | None, Query(ge=0, le=2**34, description="unix time")]


@router.get("/Consumer/Instructions", response_model=InstructionPage, dependencies=[Depends(scoped)])
async def list_instructions(caller: ScopedCaller, api: Api, offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
                            limit: Annotated[int, Query(ge=1, le=500)] = 50,
                            status: Annotated[str | None, Query(max_length=1000,
                                                                description="comma-separated statuses")] = None,
                            created_by: Annotated[str | None, Query(min_length=1, max_length=128,
                                                                    description="requested by this user")] = None,
                            name: Annotated[str | None, Query(min_length=1, max_length=255,
                                                              description="part of the name, any case")] = None,
                            since: UnixTimeQuery = None, until: UnixTimeQuery = None) -> InstructionPage:
    """Recent instructions the caller may see, newest first, with their counts per state over the
    caller's devices (read-only; for the portal). The history search: ``status`` (any of these),
    ``created_by``, ``name`` (a part of it) and created in [``since``, ``until``)."""
    statuses = [x.strip() for x in status.split(",") if x.strip()] if status else None
    unknown = [x for x in statuses or [] if x not in STATUSES]
    if unknown:
        raise Invalid(f"unknown status {unknown[0][:40]!r}; statuses: {', '.join(STATUSES)}")
    if any(validate.has_control(v) for v in (created_by or "", name or "")):
        raise Invalid("created_by and name have no control characters")
    if since is not None and until is not None and until <= since:
        raise Invalid("until must be later than since")
    match = store.InstructionMatch(created_by, name, since, until)
    return await api.db(api.list_instructions, caller.access, offset, limit, statuses,
                        None if match == store.InstructionMatch() else match)


@router.get("/Consumer/Instructions/{instruction_id}", response_model=InstructionStatus,
            dependencies=[Depends(visible_instruction)])
async def status(seen: VisibleInstruction, api: Api) -> InstructionStatus:
    return await api.db(api.status, seen.id, seen.access, seen.row)


@router.get("/Consumer/Instructions/{instruction_id}/Wait", response_model=InstructionStatus,
            dependencies=[Depends(visible_instruction)])
async def wait(seen: VisibleInstruction, api: Api,
               timeout: Annotated[float, Query(ge=0, le=WAIT_MAX)] = 25.0) -> InstructionStatus:
    """The instruction's status once it is done (finished, cancelled, rejected, approval
    expired) or after ``timeout`` seconds, whichever comes first: a long poll. While it is
    active the Core tells the moment it ends; before it runs (approval, schedule) the status
    is looked at twice a second."""
    instruction_id = seen.id
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    core_ended = False
    while True:
        s = await api.db(api.status, instruction_id, seen.access)
        if s is None:
            raise NotFound(f"instruction {instruction_id} not found")
        left = deadline - loop.time()
        if s.status in ins.DONE_STATES or left <= 0:
            return s
        if s.status == "active" and not core_ended:
            try:
                r = await api.call_core(instruction_id, "Wait", params={"timeout": round(min(left, CORE_WAIT), 3)},
                                        timeout=CORE_WAIT + 10)
                # Ended there: the status says so now, unless this Core does not hold it (a
                # Core restarting, another Response Stack's): then look at the status below.
                core_ended = bool(r.get("ended"))
                continue
            except ins.CoreError as e:  # Core away or restarting: fall back to looking
                log.debug("Wait on instruction %d at the Core failed: %s", instruction_id, e)
        await asyncio.sleep(min(left, 0.5 if s.status != "active" else 0.2))


@router.post("/Consumer/Instructions/{instruction_id}/Cancel", dependencies=[Depends(visible_instruction)])
async def cancel(seen: VisibleInstruction, api: Api) -> dict[str, Any]:
    """Stop an instruction: before it runs (pending approval, scheduled, or approved and not yet
    taken by the Core) or while it gathers. Before the Core has it, one compare-and-set: the Core
    activates only a ``created`` instruction, so a cancelled one never runs."""
    instruction_id, row, user = seen.id, seen.row, seen.user
    if user.role != ADMIN_ROLE and user.username != row["created_by"]:
        raise Forbidden("only the requester or a Full Administrator may cancel an instruction")
    if row["status"] in ins.CANCELLABLE:
        was = row["status"]
        # it may move on meanwhile (approved: pending -> created; issued: created -> active): cancel
        # it where it is then, a bounded number of times
        for _ in range(3):
            if await api.db(ins.cancel, api.master, instruction_id, by=user.username, expect=was):
                break
            now = await api.db(store.get_instruction, api.master, instruction_id)
            if now is not None and now["status"] == "active":  # the Core took it meanwhile: stop it there
                return await _cancel_active(api, instruction_id, user.username, was)
            if now is None or now["status"] not in ins.CANCELLABLE or now["status"] == was:
                raise Conflict(f"instruction {instruction_id} changed meanwhile (it is "
                               f"{now['status'] if now else 'gone'}); nothing to cancel")
            was = now["status"]
        else:
            raise Conflict(f"instruction {instruction_id} keeps changing; look again")
    elif row["status"] == "active":
        return await _cancel_active(api, instruction_id, user.username, row["status"], user.source)
    else:
        raise Conflict(f"instruction {instruction_id} is {row['status']}: nothing to cancel")
    await api.db(store.audit, api.master, user.username, "cancel", f"instruction:{instruction_id}",
                 source=user.source, was=row["status"])
    return {"id": instruction_id, "status": "cancelled"}


async def _cancel_active(api: Any, instruction_id: int, username: str, was: str, source: str) -> dict[str, Any]:
    try:
        await api.call_core(instruction_id, "Cancel")
    except ins.CoreRefused:
        raise Conflict(f"instruction {instruction_id} is no longer active") from None
    except ins.CoreError as e:
        raise BadGateway(str(e)) from None
    await api.db(store.audit, api.master, username, "cancel", f"instruction:{instruction_id}", source=source, was=was)
    return {"id": instruction_id, "status": "cancelled"}


# The approval relays go through visible_instruction: an approver who may not see an instruction
# (its instruction set, or none of its devices in their management groups) gets the same 404 as
# for one that does not exist. The Coordinator then checks the approve right, the one-time code
# and that the approver is not the requester. Its answer is passed on with its status: 202 when
# the approval counted but the instruction is not running yet (more approvers needed:
# pending_approval; or approved and waiting for the Core: created, issued false, retrying).
async def _relay(api: Any, path: str, body: dict[str, Any]) -> JSONResponse:
    status_code, answer = await api.coordinator_reply(path, body)
    return JSONResponse(answer, status_code=status_code)


@router.post("/Consumer/Instructions/{instruction_id}/ApprovalCode", dependencies=[Depends(visible_instruction)])
async def approval_code(seen: VisibleInstruction, api: Api) -> JSONResponse:
    """Email the caller a one-time code to approve this instruction with."""
    return await _relay(api, f"/Coordinator/Instructions/{seen.id}/Code",
                        {"username": seen.user.username, "role": seen.user.role})


@router.post("/Consumer/Instructions/{instruction_id}/Approve", dependencies=[Depends(visible_instruction)],
             responses={202: {"description": "approved; more approvers are needed, or the Core is unavailable "
                                             "and the Coordinator issues it when it is back"}})
async def approve(seen: VisibleInstruction, d: DecisionRequest, api: Api) -> JSONResponse:
    return await _relay(api, f"/Coordinator/Instructions/{seen.id}/Approve",
                        {"username": seen.user.username, "role": seen.user.role, "code": d.code,
                         "reason": d.reason, "source": seen.user.source})


@router.post("/Consumer/Instructions/{instruction_id}/Reject", dependencies=[Depends(visible_instruction)])
async def reject(seen: VisibleInstruction, d: DecisionRequest, api: Api) -> JSONResponse:
    return await _relay(api, f"/Coordinator/Instructions/{seen.id}/Reject",
                        {"username": seen.user.username, "role": seen.user.role, "reason": d.reason,
                         "source": seen.user.source})
