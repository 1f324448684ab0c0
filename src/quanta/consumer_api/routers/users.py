"""User administration (Full Administrators): users, their roles (global and per instruction
set), e-mail, disabled flag and management groups; password resets; login locks.

Every change is one audit row written by :mod:`quanta.accounts` in the same transaction, with
the user's state before and after. Disabling a user or resetting their password ends their
sessions at once. No change may leave the installation without an enabled Full Administrator.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Response

from quanta.accounts import UNSET, UserRecord
from quanta.consumer_api.deps import Api, CurrentActor, accounts_call, admin_only, bounded_body
from quanta.consumer_api.models import (LockOut, PasswordReset, PasswordResetDone, UserCreate, UserOut,
                                        UserUpdate)

ADMIN = [Depends(admin_only("user administration"))]
router = APIRouter(route_class=bounded_body(256 * 1024))

UserName = Annotated[str, Path(min_length=1, max_length=128, description="user name")]


def _out(rec: UserRecord) -> UserOut:
    return UserOut(**rec.to_dict())


@router.get("/Consumer/Users", response_model=list[UserOut], dependencies=ADMIN)
async def list_users(api: Api, actor: CurrentActor) -> list[UserOut]:
    return [_out(r) for r in await accounts_call(api.accounts.list_users, actor)]


@router.post("/Consumer/Users", response_model=UserOut, status_code=201, dependencies=ADMIN,
             responses={409: {"description": "the user exists"}})
async def create_user(req: UserCreate, api: Api, actor: CurrentActor) -> UserOut:
    rec = await accounts_call(api.accounts.create_user, actor, req.username, req.password, req.role,
                              email=req.email or None, groups=req.groups,
                              assignments=[(a.role, a.instruction_set) for a in req.assignments])
    return _out(rec)


# The login locks are under /Consumer/Locks, not /Consumer/Users/Locks, so that no user name
# ("Locks" is a valid one) is ever shadowed by a route.
@router.get("/Consumer/Locks", response_model=list[LockOut], dependencies=ADMIN)
async def list_locks(api: Api, actor: CurrentActor) -> list[LockOut]:
    """Live login locks, on user names and on source addresses."""
    return [LockOut(**lk.to_dict()) for lk in await accounts_call(api.accounts.list_locks, actor)]


@router.delete("/Consumer/Locks/{kind}/{subject}", status_code=204, dependencies=ADMIN,
               responses={404: {"description": "no live lock on this name or address"}})
async def unlock(kind: Literal["user", "source"], subject: Annotated[str, Path(min_length=1, max_length=128)],
                 api: Api, actor: CurrentActor) -> Response:
    """Lift a lock and forget its failures (audited). 404 if there was no live lock (its failures
    are forgotten all the same)."""
    if not await accounts_call(api.accounts.unlock, actor, subject, kind):
        from quanta.consumer_api.errors import NotFound
        raise NotFound(f"no live lock on {kind} {subject[:128]!r}")
    return Response(status_code=204)


@router.get("/Consumer/Users/{name}", response_model=UserOut, dependencies=ADMIN)
async def get_user(name: UserName, api: Api, actor: CurrentActor) -> UserOut:
    return _out(await accounts_call(api.accounts.get_user, actor, name))


@router.patch("/Consumer/Users/{name}", response_model=UserOut, dependencies=ADMIN,
              responses={409: {"description": "it would leave no enabled Full Administrator"}})
async def update_user(name: UserName, req: UserUpdate, api: Api, actor: CurrentActor) -> UserOut:
    """Change what is given: role, email (null clears), disabled (true ends the user's sessions
    at once), groups and assignments (each replaces the list)."""
    given = req.model_fields_set
    kw = dict(role=req.role if "role" in given else UNSET,
              email=(req.email or None) if "email" in given else UNSET,
              disabled=req.disabled if "disabled" in given else UNSET,
              groups=req.groups if "groups" in given else UNSET,
              assignments=[(a.role, a.instruction_set) for a in req.assignments or []]
              if "assignments" in given else UNSET)
    return _out(await accounts_call(api.accounts.update_user, actor, name, **kw))


@router.delete("/Consumer/Users/{name}", status_code=204, dependencies=ADMIN,
               responses={409: {"description": "yourself, or the last enabled Full Administrator"}})
async def delete_user(name: UserName, api: Api, actor: CurrentActor) -> Response:
    await accounts_call(api.accounts.delete_user, actor, name)
    return Response(status_code=204)


@router.post("/Consumer/Users/{name}/Password", response_model=PasswordResetDone, dependencies=ADMIN)
async def reset_password(name: UserName, req: PasswordReset, api: Api, actor: CurrentActor) -> PasswordResetDone:
    """Set a user's password; every session of theirs ends."""
    n = await accounts_call(api.accounts.reset_password, actor, name, req.password)
    return PasswordResetDone(username=name, sessions_ended=n)
