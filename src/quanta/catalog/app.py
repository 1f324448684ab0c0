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


def catalog_url(settings: Settings) -> str:
    """Where this host reaches the Catalog: ``catalog_url``, or the local http port's /Catalog."""
    if settings.catalog_url:
        return settings.catalog_url.rstrip("/")
    return f"http://127.0.0.1:{settings.port('http')}/Catalog"


class CatalogError(Exception):
    pass


class CatalogClient:
    """HTTP client of the Catalog API (the master's side of the Remote Catalog flow on port 80)."""

    def __init__(self, base_url: str, key: str, timeout: float = 30) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {key}"})

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
        return cls(catalog_url(settings), key)

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
