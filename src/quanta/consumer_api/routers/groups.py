"""Management groups (Full Administrators and Group Administrators: the ``groups`` right on every
instruction set, see :mod:`quanta.roles`): list, create or replace a rule, delete.

A group's rule decides which devices its members reach (:mod:`quanta.rbac`); users are put in
groups with ``PATCH /Consumer/Users/{name}`` (``groups``). Each change is one audit row with the
rule before and after, written in the same transaction as the change.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Path, Response

from quanta.accounts import audit, validate
from quanta.consumer_api.deps import Api, CurrentActor, bounded_body, require_right
from quanta.consumer_api.errors import Conflict, Invalid, NotFound
from quanta.consumer_api.models import GroupOut, GroupRule
from quanta.db.tables import management_groups, user_groups

ADMIN = [Depends(require_right("groups", what="manage management groups"))]
router = APIRouter(route_class=bounded_body(8 * 1024 * 1024))  # a rule may list 100,000 devices

GroupName = Annotated[str, Path(min_length=1, max_length=128, description="management group name")]
# a new group's name: what a user name may be, and spaces
_NEW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._@+-]*")


def _check_name(name: str, new: bool) -> str:
    if validate.has_control(name) or (new and not _NEW_NAME.fullmatch(name)):
        raise Invalid("a group name is 1-128 letters, digits, spaces and . _ @ + -, starting with a letter or digit")
    return name


@router.get("/Consumer/ManagementGroups", response_model=list[GroupOut], dependencies=ADMIN)
async def list_groups(api: Api) -> list[GroupOut]:
    def load() -> list[GroupOut]:
        with api.master.connect() as c:
            groups = c.execute(sa.select(management_groups).order_by(management_groups.c.name)).all()
            members: dict[str, list[str]] = {}
            for u, g in c.execute(sa.select(user_groups.c.username, user_groups.c.group_name)
                                  .order_by(user_groups.c.username)):
                members.setdefault(g, []).append(u)
        return [GroupOut(name=g.name, rule=g.rule or {}, members=members.get(g.name, [])) for g in groups]
    return await api.db(load)


@router.put("/Consumer/ManagementGroups/{name}", response_model=GroupOut, dependencies=ADMIN)
async def set_group(name: GroupName, rule: GroupRule, api: Api, actor: CurrentActor) -> GroupOut:
    """Create or replace a group's rule. A device is in the group if it matches every key given;
    an empty rule matches every device."""
    body: dict[str, Any] = rule.model_dump(exclude_none=True)
    for d in body.get("devices", []):
        if validate.has_control(d):
            raise Invalid("a device name has no control characters")
    if validate.has_control(body.get("os_like", "")) or any(
            validate.has_control(v) for k in ("tags", "attributes") for v in body.get(k, {}).values()):
        raise Invalid("rule values have no control characters")

    def write() -> GroupOut:
        with api.master.begin() as c:
            before = c.execute(sa.select(management_groups.c.rule).where(management_groups.c.name == name)).scalar()
            _check_name(name, new=before is None)
            c.execute(management_groups.delete().where(management_groups.c.name == name))
            c.execute(management_groups.insert().values(name=name, rule=body))
            members = list(c.execute(sa.select(user_groups.c.username).where(user_groups.c.group_name == name)
                                     .order_by(user_groups.c.username)).scalars())
            if before != body:
                audit.write(c, actor.name, actor.source, "group_set", name, before=before, after=body)
        return GroupOut(name=name, rule=body, members=members)
    return await api.db(write)


@router.delete("/Consumer/ManagementGroups/{name}", status_code=204, dependencies=ADMIN,
               responses={409: {"description": "the group still has members"}})
async def delete_group(name: GroupName, api: Api, actor: CurrentActor) -> Response:
    """Delete a group that has no members. (A user in no group reaches every device, so removing
    a group its members are limited to would widen what they reach: take them out first.)"""
    _check_name(name, new=False)

    def remove() -> None:
        with api.master.begin() as c:
            before = c.execute(sa.select(management_groups.c.rule).where(management_groups.c.name == name)).first()
            if before is None:
                raise NotFound(f"no management group {name!r}")
            members = list(c.execute(sa.select(user_groups.c.username).where(user_groups.c.group_name == name)
                                     .limit(6)).scalars())
            if members:
                raise Conflict(f"management group {name!r} has members ({', '.join(members[:5])}"
                               f"{', ...' if len(members) > 5 else ''}): take them out of it first")
            c.execute(management_groups.delete().where(management_groups.c.name == name))
            audit.write(c, actor.name, actor.source, "group_delete", name, before=before.rule, after=None)
    await api.db(remove)
    return Response(status_code=204)
