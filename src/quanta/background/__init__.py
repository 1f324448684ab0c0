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

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import APIRouter

    from .auth import DeviceVerifier

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


def router(store: ContentStore, verifier: DeviceVerifier, replication_token: str | None = None) -> APIRouter:
    """The ``/Background`` routes for the web tier (FastAPI is imported only here, not by agents)."""
    from .app import router as make_router

    return make_router(store, verifier, replication_token)


__all__ = ["ContentStore", "ContentError", "SHA256_RE", "MAX_CONTENT_BYTES", "router"]
