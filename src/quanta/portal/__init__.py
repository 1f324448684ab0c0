"""The portal (Explorer): a static, dependency-free web UI served under ``/Explorer``.

It is only a client of the public Consumer API (``/Consumer/...``), like the CLI: the browser
logs in with ``POST /Consumer/Authentication/Token``, keeps the bearer token in
``sessionStorage`` (no cookie, so no CSRF surface) and sends it on every request. Every
``/Explorer`` response carries a Content-Security-Policy that allows scripts and styles from
this origin only (no inline script, no eval), so device-controlled data that somehow reached
the DOM as markup still could not run. The front end renders with ``textContent`` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).parent / "static"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # a small UI that changes with the server: always revalidate, so an upgrade is seen at once
    "Cache-Control": "no-cache",
}


class _SecureStatic(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount(app: FastAPI) -> None:
    """Serve the portal at ``/Explorer`` on ``app`` (the web tier's HTTPS app)."""

    def index() -> Any:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=SECURITY_HEADERS)

    app.add_api_route("/Explorer/", index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/Explorer", lambda: RedirectResponse("/Explorer/", status_code=308, headers=SECURITY_HEADERS),
                      methods=["GET"], include_in_schema=False)
    app.mount("/Explorer/static", _SecureStatic(directory=STATIC), name="explorer-static")
