"""The plain-HTTP tier on ``ports.http`` (default 80): the CRL distribution point, and later the
Catalog UI/API (DESIGN.md §2: "Catalog UI/API; CRL distribution point").

Routes today::

    GET /health     {"status": "ok", "component": "http"}
    GET /crl.pem    DIR/pki/crl.pem (application/pkix-crl, PEM), re-read on every request

To add the Catalog, write its routes in a module of its own (an ``APIRouter`` under
``/Catalog``) and include it in :func:`build_app` where marked. Nothing here needs TLS: the CRL
is signed by the CA, and whoever fetches it verifies that signature.
"""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import Response

from quanta.pki import Pki
from quanta.runtime import bind_socket, configure_logging
from quanta.settings import DataDir, Settings, load_settings

log = logging.getLogger("quanta.http")

CRL_PATH = "/crl.pem"
HEALTH_PATH = "/health"


def build_app(root: Path, settings: Settings) -> FastAPI:
    pki = Pki(DataDir(Path(root)).pki)
    app = FastAPI(title="Quanta HTTP tier", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get(HEALTH_PATH)
    def health() -> dict[str, str]:
        return {"status": "ok", "component": "http"}

    @app.get(CRL_PATH)
    def crl() -> Response:
        try:
            data = pki.crl.read_bytes()
        except FileNotFoundError:
            raise HTTPException(404, "no CRL: run 'quanta init' first") from None
        return Response(data, media_type="application/pkix-crl", headers={"Cache-Control": "no-cache"})

    # --- Catalog UI/API goes here: app.include_router(catalog_router, prefix="/Catalog") ---
    if settings.catalog_url is None:  # co-located Catalog (a Remote Catalog host runs its own http tier)
        from quanta.catalog.app import catalog_router

        app.include_router(catalog_router(root, settings), prefix="/Catalog")
    return app


async def serve(root: Path) -> None:
    settings = load_settings(root)
    configure_logging("http", settings)
    app = build_app(root, settings)
    sock = bind_socket(settings.bind_host, settings.port("http"), "http")
    log.info("http tier listening on http %s:%d (%s, %s)", settings.bind_host, settings.port("http"), CRL_PATH,
             HEALTH_PATH)
    config = uvicorn.Config(app, log_level="warning", loop="none", proxy_headers=False)
    await uvicorn.Server(config).serve(sockets=[sock])
