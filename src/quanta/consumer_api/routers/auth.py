"""Sign-in: ``POST /Consumer/Authentication/Token`` (public) gives a bearer token."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from quanta.consumer_api.deps import Api, public
from quanta.consumer_api.errors import Unauthorized
from quanta.consumer_api.models import TokenRequest, TokenResponse

router = APIRouter()


@router.post("/Consumer/Authentication/Token", response_model=TokenResponse, dependencies=[Depends(public)])
async def token(req: TokenRequest, api: Api) -> TokenResponse:
    t = await api.db(api.login, req.username, req.password)
    if t is None:
        raise Unauthorized("wrong username or password")
    return t
