"""FastAPI dependencies: who is calling, and what they may see.

Every route declares exactly one **access rule**, a dependency from :data:`RULES`:

- :func:`public`: no authentication (health, sign-in);
- :func:`authenticated`: any signed-in user (the service checks finer rights itself, e.g. the
  Coordinator checks the approve right);
- :func:`require_admin`: Full Administrators only;
- :func:`require_right`: a right on every instruction set (``groups``: Full and Group
  Administrators manage management groups);
- :func:`visible_instruction`: the path's instruction as the caller may see it (404 otherwise);
- :func:`scoped`: any signed-in user, every read filtered to the caller's scope
  (:class:`quanta.rbac.Access`: instruction sets they hold a right on, devices of their
  management groups).

``create_app`` refuses to build an app with a route that declares none (see :func:`access_rule`),
and tests/test_scoped_reads.py enumerates the routes too.

:func:`current_user` is the one place a bearer token becomes a user: a live session of
:mod:`quanta.accounts` (hashed, short-lived, renewed while in use, ended by logout, a password
change or a disabled account -- at once, since every request looks it up).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.routing import BaseRoute

from quanta import rbac
from quanta.accounts import AccountError, Actor, http_answer
from quanta.consumer_api.errors import ApiError, Forbidden, Unauthorized
from quanta.consumer_api.models import User
from quanta.consumer_api.service import ADMIN_ROLE, ConsumerApi
from quanta.protocol.messages import MAX_ID

_bearer = HTTPBearer(auto_error=False)

# An instruction id in a path: what the Master database stores (a larger one is a 422, not a 500).
InstructionIdPath = Annotated[int, Path(ge=0, le=MAX_ID, description="instruction id")]


def get_api(request: Request) -> ConsumerApi:
    return request.app.state.api


Api = Annotated[ConsumerApi, Depends(get_api)]


def _rule(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__access_rule__ = name  # type: ignore[attr-defined]
        return fn
    return mark


async def bearer_token(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The bearer token as sent (401 without one)."""
    if cred is None or cred.scheme.lower() != "bearer":
        raise Unauthorized("authentication required: POST /Consumer/Authentication/Token",
                           headers={"WWW-Authenticate": "Bearer"})
    return cred.credentials


async def current_user(api: Api, token: Annotated[str, Depends(bearer_token)], request: Request) -> User:
    """The caller, from the bearer token: ``accounts.authenticate`` (401 when it is not a live
    session). Authentication runs before the body or any parameter is looked at. The single
    place a token is resolved to a user."""
    user = await api.db(api.user_for, token)
    if user is None:
        raise Unauthorized("invalid or expired token", headers={"WWW-Authenticate": "Bearer"})
    user.source = client_source(request)
    return user


CurrentUser = Annotated[User, Depends(current_user)]
BearerToken = Annotated[str, Depends(bearer_token)]


def client_source(request: Request) -> str:
    """The caller's address as the connection gives it (proxy headers are not trusted)."""
    return request.client.host if request.client is not None else "unknown"


Source = Annotated[str, Depends(client_source)]


async def actor(user: CurrentUser, source: Source) -> Actor:
    """Who asks for a change, from where: what the accounts service checks and audits."""
    return Actor(name=user.username, source=source, admin=user.role == ADMIN_ROLE)


CurrentActor = Annotated[Actor, Depends(actor)]


def account_error(e: AccountError) -> ApiError:
    """An accounts error as the API answers it (Locked 429 + Retry-After, BadCredentials 401,
    Forbidden 403, NotFound 404, Conflict 409, Invalid 422)."""
    status, headers = http_answer(e)
    err = ApiError(str(e), headers=headers or None)
    err.status = status
    return err


async def accounts_call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run an accounts call in a worker thread; its errors become their HTTP answers."""
    import asyncio

    try:
        return await asyncio.to_thread(fn, *args, **kw)
    except AccountError as e:
        raise account_error(e) from None


def bounded_body(max_bytes: int) -> type[APIRoute]:
    """A route class that refuses a request body over ``max_bytes`` with 413 before it is parsed
    (declared by Content-Length or counted as it arrives), so no JSON body of any size is held
    in memory whole."""
    class BoundedRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Any]:
            handler = super().get_route_handler()

            async def bounded(request: Request) -> Response:
                declared = request.headers.get("content-length")
                too_large = {"detail": f"a request body here is at most {max_bytes} bytes"}
                if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
                    from fastapi.responses import JSONResponse
                    return JSONResponse(too_large, status_code=413 if declared.isdigit() else 400)
                if request.method in ("POST", "PUT", "PATCH"):
                    body = bytearray()
                    async for chunk in request.stream():
                        body += chunk
                        if len(body) > max_bytes:
                            from fastapi.responses import JSONResponse
                            return JSONResponse(too_large, status_code=413)
                    request._body = bytes(body)  # what FastAPI reads next (Request.body() caches it)
                return await handler(request)
            return bounded
    return BoundedRoute


@_rule("public")
async def public() -> None:
    """Declares a route public: no authentication."""


@_rule("authenticated")
async def authenticated(user: CurrentUser) -> User:
    return user


def admin_only(what: str) -> Callable[..., Any]:
    """A rule: Full Administrators only (``what`` names the refused thing in the 403)."""
    @_rule("admin")
    async def check(user: CurrentUser) -> User:
        if user.role != ADMIN_ROLE:
            raise Forbidden(f"{what} is for Full Administrators")
        return user
    return check


require_admin = admin_only("this")


def require_right(permission: rbac.Permission, instruction_set: str = "*", what: str | None = None) -> Callable[..., Any]:
    """A rule: the caller holds ``permission`` on ``instruction_set`` (``what`` names the refused
    thing in the 403)."""
    @_rule(f"right:{permission}")
    async def check(user: CurrentUser, api: Api) -> User:
        if not await api.db(rbac.allowed, api.master, user.username, permission, instruction_set):
            raise Forbidden(f"{user.username} may not {what or permission}")
        return user
    return check


@dataclass(frozen=True)
class Caller:
    user: User
    access: rbac.Access


@_rule("scoped")
async def scoped(user: CurrentUser, api: Api) -> Caller:
    """The caller and what they may see; every read of the route is filtered by ``access``."""
    return Caller(user, await api.db(api.access, user))


@dataclass(frozen=True)
class Visible:
    """An instruction as the caller may see it: its row, and the caller's scope for its reads."""

    id: int
    row: dict[str, Any]
    user: User
    access: rbac.Access


@_rule("visible_instruction")
async def visible_instruction(instruction_id: InstructionIdPath, user: CurrentUser, api: Api) -> Visible:
    """The one check of every ``/Consumer/Instructions/{id}/...`` read: the instruction exists,
    is of an instruction set the caller holds a right on, and touches one of the caller's devices;
    otherwise 404, the same as an instruction that does not exist."""
    def resolve() -> Visible:
        access = api.access(user)
        return Visible(instruction_id, api.visible_instruction(instruction_id, access), user, access)
    return await api.db(resolve)


ScopedCaller = Annotated[Caller, Depends(scoped)]
VisibleInstruction = Annotated[Visible, Depends(visible_instruction)]


def _rules_of(dep: Dependant) -> list[str]:
    found = []
    call = dep.call
    name = getattr(call, "__access_rule__", None)
    if name is not None:
        found.append(name)
    for sub in dep.dependencies:
        found += _rules_of(sub)
    return found


# Routes that are not FastAPI routes (the OpenAPI document and its viewer): public by declaration.
PUBLIC_PATHS = frozenset({"/Consumer/openapi.json", "/Consumer/docs/assets"})


def flat_routes(routes: Iterable[BaseRoute], inherited: tuple[str, ...] = ()) -> Iterator[tuple[BaseRoute, tuple[str, ...]]]:
    """Every route under ``routes`` (included routers opened up), with the access rules their
    enclosing routers declare (``APIRouter(dependencies=...)``, ``include_router(dependencies=...)``)."""
    for route in routes:
        sub = getattr(route, "original_router", None)  # FastAPI >= 0.16x keeps included routers whole
        if sub is not None:
            ctx = getattr(route, "include_context", None)
            more = [r for d in list(getattr(ctx, "dependencies", None) or []) + list(sub.dependencies or [])
                    if (r := getattr(d.dependency, "__access_rule__", None))]
            yield from flat_routes(sub.routes, inherited + tuple(more))
        else:
            yield route, inherited


def access_rule(route: BaseRoute, inherited: tuple[str, ...] = ()) -> str | None:
    """The access rule a route declares (the first rule dependency found, outermost first), or
    None: declared in :data:`PUBLIC_PATHS` counts for routes that are not API routes."""
    from fastapi.routing import APIRoute

    if isinstance(route, APIRoute):
        rules = list(inherited) + _rules_of(route.dependant)
        return rules[0] if rules else None
    path = getattr(route, "path", None)
    return "public" if path in PUBLIC_PATHS else None
