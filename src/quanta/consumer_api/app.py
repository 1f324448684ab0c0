"""The Consumer API (``/Consumer/...``) on the web tier's HTTPS port.

Authentication comes first on every route: a bearer token from
``POST /Consumer/Authentication/Token``. Bodies are pydantic models with ``extra="forbid"``,
so a wrong type or an unknown field is a 422 naming the field before anything else happens.

The parts: :mod:`.models` (request/response bodies), :mod:`.service` (:class:`ConsumerApi`, no
FastAPI), :mod:`.errors` (domain errors, mapped to HTTP here), :mod:`.deps` (the caller and the
access rule every route declares), :mod:`.routers` (one per resource).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from quanta.consumer_api import deps
from quanta.consumer_api.errors import ApiError
from quanta.consumer_api.models import *  # noqa: F403 - the models were importable from here
from quanta.consumer_api.models import User  # noqa: F401
from quanta.consumer_api.routers import ALL as ROUTERS
from quanta.consumer_api.routers import apidocs
from quanta.consumer_api.routers.instructions import CORE_WAIT, WAIT_MAX  # noqa: F401
from quanta.consumer_api.routers.results import STATIC_STATUS_FIELDS, status_feed  # noqa: F401
from quanta.consumer_api.service import ADMIN_ROLE, ConsumerApi, Plan, hash_password  # noqa: F401
from quanta.consumer_api.deps import CurrentUser, current_user  # noqa: F401

log = logging.getLogger("quanta.consumer_api")


class MissingAccessRule(RuntimeError):
    """A route was added without declaring who may call it (see :mod:`quanta.consumer_api.deps`)."""


def check_access_rules(app: FastAPI) -> dict[str, str]:
    """``"METHODS path" -> rule`` for every route of ``app``; raises :class:`MissingAccessRule`
    naming the routes that declare none."""
    rules: dict[str, str] = {}
    missing = []
    for route, inherited in deps.flat_routes(app.routes):
        key = f"{','.join(sorted(getattr(route, 'methods', None) or ['*']))} {getattr(route, 'path', route)}"
        rule = deps.access_rule(route, inherited)
        if rule is None:
            missing.append(key)
        else:
            rules[key] = rule
    if missing:
        raise MissingAccessRule(f"routes without an access rule: {', '.join(missing)}")
    return rules


def _json_safe(value: Any) -> Any:
    """A validation error echoes the input; a non-finite number in it (``1e999`` parses as inf)
    cannot be JSON: it is given as text, so the 422 is not turned into a 500."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def create_app(api: ConsumerApi) -> FastAPI:
    app = FastAPI(title="Quanta Consumer API", version="1", openapi_url="/Consumer/openapi.json",
                  docs_url=None, redoc_url=None)  # /Consumer/docs: routers.apidocs, served offline
    app.state.api = api
    app.state.feed = status_feed(api)
    app.state.scoped_feeds = {}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)

    @app.exception_handler(sa.exc.OperationalError)
    @app.exception_handler(sa.exc.InterfaceError)
    async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.error("database unavailable for %s %s: %s", request.method, request.url.path,
                  str(getattr(exc, "orig", exc)).strip()[:200])
        return JSONResponse({"detail": "database unavailable; nothing was changed, retry later"}, status_code=503)

    for router in ROUTERS:
        app.include_router(router)
    app.include_router(apidocs.router)
    apidocs.mount_assets(app)
    check_access_rules(app)  # a route that forgot its access rule stops the server here
    return app
