"""``GET /Consumer/Switches``: the Switch configuration, with device counts over the caller's devices."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from quanta.consumer_api.deps import Api, ScopedCaller, scoped
from quanta.consumer_api.models import SwitchInfo
from quanta.db import store
from quanta.settings import poke_port

router = APIRouter()


@router.get("/Consumer/Switches", response_model=list[SwitchInfo], dependencies=[Depends(scoped)])
async def switches(caller: ScopedCaller, api: Api) -> list[SwitchInfo]:
    """The SwitchConfiguration rows, with the devices last seen on each and how many are online
    (counting only the caller's devices, for a user limited to management groups)."""
    def load() -> list[SwitchInfo]:
        if caller.access.devices is None:
            counts = store.switch_device_counts(api.master)
        else:
            counts = {}
            for d in store.list_devices(api.master, caller.access.devices):
                if d["revoked"] or d["switch"] is None:
                    continue
                c = counts.setdefault(d["switch"], {"online": 0, "devices": 0})
                c["devices"] += 1
                c["online"] += 1 if d["online"] else 0
        return [SwitchInfo(name=r["Name"], host=r["Host"], port=r["Port"], poke_port=poke_port(r["Port"]),
                           enabled=bool(r["Enabled"]), online_devices=counts.get(r["Name"], {}).get("online", 0),
                           devices=counts.get(r["Name"], {}).get("devices", 0))
                for r in store.switch_rows(api.master)]

    return await api.db(load)
