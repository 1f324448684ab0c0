"""``GET /Consumer/health`` (public)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from quanta.consumer_api.deps import public

router = APIRouter()


@router.get("/Consumer/health", dependencies=[Depends(public)])
async def health() -> dict[str, str]:
    return {"status": "ok"}
