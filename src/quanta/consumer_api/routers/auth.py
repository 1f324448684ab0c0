"""Sessions: sign in (public), sign out, change your own password.

``POST /Consumer/Authentication/Token`` gives a bearer token: a session of :mod:`quanta.accounts`,
short-lived and renewed while in use. Failed sign-ins are throttled per user name and per source
address; a locked name or address is answered 429 with ``Retry-After`` (the right password too)
until the lock ends or an administrator lifts it. Every attempt is an audit row.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from quanta.consumer_api.deps import (Api, BearerToken, CurrentUser, Source, accounts_call, authenticated,
                                      bounded_body, public)
from quanta.consumer_api.models import PasswordChange, TokenRequest, TokenResponse
from quanta.consumer_api.service import token_response

router = APIRouter(route_class=bounded_body(16 * 1024))


@router.post("/Consumer/Authentication/Token", response_model=TokenResponse, dependencies=[Depends(public)],
             responses={401: {"description": "wrong username or password"},
                        429: {"description": "too many failed sign-ins: locked; see Retry-After"}})
async def token(req: TokenRequest, api: Api, source: Source) -> TokenResponse:
    return await accounts_call(api.login, req.username, req.password, source)


@router.post("/Consumer/Authentication/Logout", status_code=204, dependencies=[Depends(authenticated)])
async def logout(api: Api, token: BearerToken, source: Source) -> Response:
    """End this session now: the token is refused from the next request on."""
    await accounts_call(api.accounts.logout, token, source)
    return Response(status_code=204)


@router.post("/Consumer/Authentication/Password", response_model=TokenResponse,
             dependencies=[Depends(authenticated)])
async def change_password(req: PasswordChange, user: CurrentUser, api: Api, source: Source) -> TokenResponse:
    """Change your own password (the current one is required; a wrong one counts as a failed
    sign-in). Every session of yours ends, this one included: the answer is a new token."""
    session = await accounts_call(api.accounts.change_password, user.username, req.old_password,
                                  req.new_password, source)
    return token_response(session)
