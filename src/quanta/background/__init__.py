"""Background Channel: the HTTPS content store (``/Background``) for instruction resources.

Content is addressed by its SHA-256: ``GET /Background/<sha256>``. The hash travels inside the
signed instruction, so a resource is as trusted as the instruction that names it, and the agent
re-hashes what it downloads before it uses it. Operators upload through the Consumer API
(``POST /Consumer/Content``).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse

from .auth import AuthError, DeviceVerifier

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_CONTENT_BYTES = 256 * 1024 * 1024


class ContentError(ValueError):
    pass


class ContentStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        if not SHA256_RE.match(sha256):
            raise ContentError("content is addressed by a lowercase hex SHA-256 (64 characters)")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        if len(data) > MAX_CONTENT_BYTES:
            raise ContentError(f"content of {len(data)} bytes exceeds {MAX_CONTENT_BYTES}")
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if target.exists():
            return digest
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
        return digest

    def get(self, sha256: str) -> Path | None:
        p = self.path(sha256)
        return p if p.exists() else None

    def list(self) -> list[dict[str, object]]:
        out = []
        if self.root.exists():
            for p in sorted(self.root.glob("??/*")):
                if SHA256_RE.match(p.name):
                    out.append({"sha256": p.name, "size": p.stat().st_size})
        return out


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


__all__ = ["ContentStore", "ContentError", "DeviceVerifier", "AuthError", "router"]
