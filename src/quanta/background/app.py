"""FastAPI routes of the Background Channel."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse

from . import ContentError, ContentStore
from .auth import AuthError, DeviceVerifier


def router(store: ContentStore, verifier: DeviceVerifier) -> APIRouter:
    r = APIRouter()

    @r.get("/Background/{sha256}", response_class=FileResponse, include_in_schema=False)
    async def fetch(sha256: str, request: Request) -> FileResponse:
        try:  # authentication first, before the path parameter is even validated
            device = verifier.verify("GET", request.url.path, dict(request.headers))
        except AuthError as e:
            raise HTTPException(401, f"device authentication failed: {e}") from None
        try:
            path = store.get(sha256)
        except ContentError as e:
            raise HTTPException(422, str(e)) from None
        if path is None:
            raise HTTPException(404, f"no content {sha256}")
        request.state.device = device
        return FileResponse(path, media_type="application/octet-stream",
                            headers={"X-Content-SHA256": sha256, "Cache-Control": "private, max-age=31536000, immutable"})

    return r
