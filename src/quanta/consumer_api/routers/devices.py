"""``GET /Consumer/Devices``: the devices of the caller's management groups (all, for a Full
Administrator or a user in no group); ``GET /Consumer/Devices/{device_id}``: one of them, with its
groups and recent instructions (404 outside the caller's groups, as for a device that does not
exist)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Query

from quanta.consumer_api.deps import Api, CurrentUser, ScopedCaller, admin_only, scoped
from quanta.consumer_api.models import AttributesRequest, Device, DeviceAttributes, DeviceDetail

router = APIRouter()
DeviceIdPath = Annotated[str, Path(min_length=1, max_length=255, description="device name")]


@router.get("/Consumer/Devices", response_model=list[Device], dependencies=[Depends(scoped)])
async def devices(caller: ScopedCaller, api: Api) -> list[Device]:
    return await api.db(api.devices, caller.access)


@router.get("/Consumer/Devices/{device_id}", response_model=DeviceDetail, dependencies=[Depends(scoped)],
            responses={404: {"description": "no such device, or not one of the caller's management groups"}})
async def device(device_id: DeviceIdPath, caller: ScopedCaller, api: Api,
                 recent: Annotated[int, Query(ge=1, le=200, description="recent instructions to list")] = 20
                 ) -> DeviceDetail:
    return await api.db(api.device, caller.access, device_id, recent)


@router.put("/Consumer/Devices/{device_id}/Attributes", response_model=DeviceAttributes,
            dependencies=[Depends(admin_only("setting device attributes"))])
async def set_attributes(device_id: DeviceIdPath, user: CurrentUser, api: Api,
                         changes: Annotated[AttributesRequest, Body()]) -> DeviceAttributes:
    """Set or remove (null) server-assigned attributes of a device. Management-group rules can
    match them (``"attributes": {...}``); unlike its tags, a device cannot set them itself."""
    after = await api.db(api.set_attributes, user, device_id, changes.root)
    return DeviceAttributes(device_id=device_id, attributes=after)
