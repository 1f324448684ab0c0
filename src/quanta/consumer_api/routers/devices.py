"""``GET /Consumer/Devices``: the devices of the caller's management groups (all, for a Full
Administrator or a user in no group)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from quanta.consumer_api.deps import Api, ScopedCaller, scoped
from quanta.consumer_api.models import Device

router = APIRouter()


@router.get("/Consumer/Devices", response_model=list[Device], dependencies=[Depends(scoped)])
async def devices(caller: ScopedCaller, api: Api) -> list[Device]:
    return await api.db(api.devices, caller.access)
