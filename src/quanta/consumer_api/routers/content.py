"""Background Channel content: upload (Full Administrators) and list."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from quanta.background import MAX_CONTENT_BYTES, ContentError
from quanta.consumer_api.deps import Api, CurrentUser, admin_only, authenticated
from quanta.consumer_api.errors import Invalid, TooLarge, Unavailable
from quanta.db import store

router = APIRouter()


@router.post("/Consumer/Content", status_code=201, dependencies=[Depends(admin_only("uploading content"))])
async def upload_content(request: Request, user: CurrentUser, api: Api) -> dict[str, Any]:
    """Store a resource (script, file) in the Background Channel; returns its SHA-256."""
    if api.content is None:
        raise Unavailable("no Background Channel on this server")
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise Invalid("bad Content-Length") from None
    if declared > MAX_CONTENT_BYTES:
        raise TooLarge(f"content exceeds {MAX_CONTENT_BYTES} bytes")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_CONTENT_BYTES:
            raise TooLarge(f"content exceeds {MAX_CONTENT_BYTES} bytes")
    if not data:
        raise Invalid("empty content")
    try:
        digest = await api.db(api.content.put, bytes(data))
    except ContentError as e:
        raise Invalid(str(e)) from None
    await api.db(store.audit, api.master, user.username, "content_upload", digest, source=user.source, size=len(data))
    replicated = await api.replicate(digest, bytes(data))
    return {"sha256": digest, "size": len(data), "url": f"/Background/{digest}", "replicated_to": replicated}


@router.get("/Consumer/Content", dependencies=[Depends(authenticated)])
async def list_content(api: Api) -> list[dict[str, Any]]:
    return api.content.list() if api.content is not None else []
