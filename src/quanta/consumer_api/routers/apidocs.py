"""``GET /Consumer/docs`` (public): the API's interactive reference, Swagger UI served by the web tier
itself from the ``fastapi-offline`` package's assets (Swagger UI 5, which reads OpenAPI 3.1), so it works on a server without internet. No inline
script: the page loads the bundle and a small initializer from this server, under a strict
Content-Security-Policy."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, Response
from starlette.staticfiles import StaticFiles

from quanta.consumer_api.deps import public

ASSETS = "/Consumer/docs/assets"  # declared public in deps.PUBLIC_PATHS (a mount, not an API route)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Quanta Consumer API</title>
<link rel="stylesheet" href="{ASSETS}/swagger-ui.css"><link rel="icon" href="{ASSETS}/favicon.png"></head>
<body><div id="swagger-ui"></div>
<script src="{ASSETS}/swagger-ui-bundle.js"></script><script src="/Consumer/docs/init.js"></script></body></html>
"""
INIT = """window.ui = SwaggerUIBundle({url: "/Consumer/openapi.json", dom_id: "#swagger-ui",
  presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout", deepLinking: true});
"""

router = APIRouter(include_in_schema=False)


@router.get("/Consumer/docs", dependencies=[Depends(public)])
async def docs() -> HTMLResponse:
    return HTMLResponse(PAGE, headers=HEADERS)


@router.get("/Consumer/docs/init.js", dependencies=[Depends(public)])
async def init_js() -> Response:
    return Response(INIT, media_type="text/javascript", headers=HEADERS)


def mount_assets(app: Any) -> None:
    app.mount(ASSETS, StaticFiles(directory=Path(str(files("fastapi_offline") / "static"))), name="swagger-ui")
