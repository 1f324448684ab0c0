"""Signed product packs: import (Full Administrators)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from quanta.consumer_api.deps import Api, CurrentUser, admin_only
from quanta.consumer_api.errors import Invalid, TooLarge
from quanta.db import store
from quanta.definitions import packs
from quanta.definitions.packs import MAX_PACK_BYTES

router = APIRouter()


@router.post("/Consumer/Packs", status_code=201, dependencies=[Depends(admin_only("importing packs"))])
async def import_pack(request: Request, user: CurrentUser, api: Api) -> dict[str, Any]:
    """Import a signed product pack (zip body). Only packs from trusted publishers are accepted."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_PACK_BYTES:
            raise TooLarge(f"pack exceeds {MAX_PACK_BYTES} bytes")
    try:
        pack = await api.db(packs.import_pack, api.master, bytes(data), api.content)
    except packs.PackError as e:
        await api.db(store.audit, api.master, user.username, "pack_refused", "", source=user.source, reason=str(e))
        raise Invalid(f"pack refused: {e}") from None
    await api.db(store.audit, api.master, user.username, "pack_import", pack.info.name, source=user.source,
                 version=pack.info.version, publisher=pack.info.publisher,
                 definitions=[d.name for d in pack.definitions])
    return {"pack": pack.info.name, "version": pack.info.version, "publisher": pack.info.publisher,
            "definitions": [d.name for d in pack.definitions], "resources": len(pack.resources)}
