"""Wiring the Catalog into an HTTP tier, and the client the master (and the CLI) use to reach it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter

from quanta.settings import DataDir, Settings, load_settings

KEY_FILE = "catalog.key"
KEY_ENV = "QUANTA_CATALOG_KEY"


def catalog_router(root: Path | str, settings: Settings) -> APIRouter:
    from .api import build_router
    from .db import catalog_db_url, open_catalog

    return build_router(open_catalog(catalog_db_url(root, settings)))


async def serve_https(root: Path | str, https_port: int, cert: Path, key: Path) -> None:
    """A Remote Catalog over HTTPS: the Catalog UI/API (and health, CRL) on ``https_port`` under
    Quanta's TLS policy; the plain HTTP port keeps the CRL and health and answers every /Catalog
    request 403 without reading it, so no client is served with its API key in clear."""
    import asyncio
    import logging

    import uvicorn
    from fastapi import FastAPI, HTTPException

    from quanta.http_tier import build_app
    from quanta.internal import with_tls
    from quanta.pki import tls_server_context
    from quanta.runtime import bind_socket, configure_logging

    settings = load_settings(root)
    configure_logging("catalog", settings)
    log = logging.getLogger("quanta.catalog")
    ctx = tls_server_context(cert, key)  # a bad certificate or key stops here, before any listener
    secure = build_app(Path(root), settings)
    plain = build_app(Path(root), settings.model_copy(update={"catalog_url": f"https://:{https_port}/Catalog"}))
    assert isinstance(plain, FastAPI)

    @plain.api_route("/Catalog{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    def refuse(rest: str) -> None:
        raise HTTPException(403, f"this Catalog is served over HTTPS only (port {https_port}): its API key must not "
                                 "travel in clear; set catalog_url to https://<host>:<port>/Catalog")

    http_sock = bind_socket(settings.bind_host, settings.port("http"), "http")
    https_sock = bind_socket(settings.bind_host, https_port, "catalog https")
    log.info("catalog listening on https %s:%d (/Catalog) and http %s:%d (CRL, health only)", settings.bind_host,
             https_port, settings.bind_host, settings.port("http"))
    servers = [uvicorn.Server(uvicorn.Config(plain, log_level="warning", loop="none", proxy_headers=False)),
               uvicorn.Server(with_tls(uvicorn.Config(secure, log_level="warning", loop="none", proxy_headers=False,
                                                      ssl_certfile=str(cert), ssl_keyfile=str(key)), ctx))]
    await asyncio.gather(servers[0].serve(sockets=[http_sock]), servers[1].serve(sockets=[https_sock]))


def catalog_verify(root: Path | str) -> str | bool:
    """What an https catalog_url is verified against: ``DIR/catalog-ca.crt`` if the operator put the
    Catalog's CA there, else the installation CA (``DIR/pki/ca.crt``), else the system store."""
    for p in (Path(root) / "catalog-ca.crt", DataDir(Path(root)).pki / "ca.crt"):
        if p.exists():
            return str(p)
    return True


def catalog_url(settings: Settings) -> str:
    """Where this host reaches the Catalog: ``catalog_url``, or the local http port's /Catalog."""
    if settings.catalog_url:
        return settings.catalog_url.rstrip("/")
    return f"http://127.0.0.1:{settings.port('http')}/Catalog"


class CatalogError(Exception):
    pass


class CatalogClient:
    """HTTP client of the Catalog API (the master's side of the Remote Catalog flow on port 80)."""

    def __init__(self, base_url: str, key: str, timeout: float = 30, verify: Any = True) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {key}"}, verify=verify,
                                  follow_redirects=False)  # never re-sent elsewhere

    @classmethod
    def for_data_dir(cls, root: Path | str) -> CatalogClient:
        settings = load_settings(root)
        key = os.environ.get(KEY_ENV, "")
        path = DataDir(Path(root)).root / KEY_FILE
        if not key and path.exists():
            key = path.read_text().strip()
        if not key:
            raise CatalogError(f"no Catalog API key: set {KEY_ENV} or run "
                               f"'quanta catalog key add {root} --name master --save' (writes {path})")
        from quanta.internal import tls_context

        return cls(catalog_url(settings), key, verify=tls_context(catalog_verify(root)))

    def __enter__(self) -> CatalogClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        url = f"{self.base_url}/{path}"
        try:
            r = self._http.request(method, url, **kw)
        except httpx.HTTPError as e:
            raise CatalogError(f"cannot reach the Catalog at {self.base_url}: {e} "
                               "(check settings.catalog_url and that its http port is open)") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text[:300]
            raise CatalogError(f"Catalog {method} /{path}: HTTP {r.status_code}: {detail}")
        return r.json()

    def normalize(self, entries: list[dict[str, str]]) -> list[dict[str, Any]]:
        return self._call("POST", "Normalize", json=entries)

    def products(self, q: str | None = None, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        return self._call("GET", "Products", params={k: v for k, v in dict(q=q, offset=offset, limit=limit).items()
                                                     if v is not None})

    def unmatched(self, q: str | None = None, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        return self._call("GET", "Unmatched", params={k: v for k, v in dict(q=q, offset=offset, limit=limit).items()
                                                      if v is not None})

    def info(self) -> dict[str, Any]:
        return self._call("GET", "Info")
