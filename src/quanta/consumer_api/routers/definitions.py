"""Instruction definitions the caller may see (the rights are read once per request)."""

from __future__ import annotations

from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query

from quanta import rbac
from quanta.consumer_api.deps import Api, CurrentUser, authenticated
from quanta.db.tables import definitions

router = APIRouter()


@router.get("/Consumer/InstructionDefinitions", dependencies=[Depends(authenticated)])
async def list_definitions(user: CurrentUser, api: Api,
                           instruction_set: Annotated[str | None, Query(max_length=255)] = None
                           ) -> list[dict[str, Any]]:
    """Definitions the caller may issue (or see), with their typed parameters: only those of the
    instruction sets the caller holds the view right on."""
    def visible() -> list[dict[str, Any]]:
        with api.master.connect() as c:
            q = sa.select(definitions)
            if instruction_set:
                q = q.where(definitions.c.instruction_set == instruction_set)
            rows = [dict(r._mapping) for r in c.execute(q.order_by(definitions.c.name))]
        may = rbac.rights(api.master, user.username)  # read once, not per row
        return [{"name": r["name"], "type": r["kind"], "instruction_set": r["instruction_set"],
                 "description": r["spec"]["description"], "parameters": r["spec"]["parameters"],
                 "schema": r["spec"]["schema"], "aggregation": r["spec"]["aggregation"], "ttl": r["spec"]["ttl"],
                 "pack": r["pack"], "publisher": r["publisher"]}
                for r in rows if may("view", r["instruction_set"])]

    return await api.db(visible)
