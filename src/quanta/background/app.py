"""FastAPI routes of the Background Channel."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse

from . import MAX_CONTENT_BYTES, ContentError, ContentStore
from .auth import AuthError, DeviceVerifier, HostVerifier


def router(store: ContentStore, verifier: DeviceVerifier, replication_token: str | None = None) -> APIRouter:
    r = APIRouter()

    if replication_token is not None:
        expected = f"Bearer {replication_token}"
        hosts = HostVerifier(verifier.ca_file, verifier.crl_file)

        @r.put("/Background/{sha256}", include_in_schema=False, status_code=201)
        async def replicate(sha256: str, request: Request) -> dict[str, object]:
            """Content replication from the Master (Master -> DMZ web tier on 443)."""
            auth = request.headers.get("authorization") or ""
            if not hmac.compare_digest(auth, expected):
                raise HTTPException(401, "missing or wrong internal credential")
            try:  # and the Master proves it is a host of this installation (its host certificate)
                hosts.verify("PUT", request.url.path, dict(request.headers))
            except AuthError as e:
                raise HTTPException(403, f"host authentication failed: {e}") from None
            try:
                store.path(sha256)
            except ContentError as e:
                raise HTTPException(422, str(e)) from None
            data = await request.body()
            if len(data) > MAX_CONTENT_BYTES:
                raise HTTPException(413, "content too large")
            if hashlib.sha256(data).hexdigest() != sha256:
                raise HTTPException(422, "content does not hash to the SHA-256 in the path")
            store.put(data)
            return {"sha256": sha256, "size": len(data)}

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
