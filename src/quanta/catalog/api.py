"""The Catalog HTTP API and UI (an ``APIRouter`` mounted at ``/Catalog`` on the http port).

Routes::

    GET  /Catalog/               the HTML UI (a static page; it asks for an API key and calls the API)
    GET  /Catalog/Info           rule set loaded (name, version, source, rule count)
    POST /Catalog/Normalize      body: a JSON list of {publisher, title, version} (or the SCALE columns
                                 Publisher, Product, Version); answer: one normalised entry per input
    GET  /Catalog/Products       ?q=&offset=&limit=   vendor/product/category with raw-entry counts
    GET  /Catalog/Unmatched      ?q=&offset=&limit=   raw entries seen that no rule matches
    GET  /Catalog/Rules          the active rules

Every route but the UI page needs ``Authorization: Bearer <key>`` (or ``X-Api-Key``), a key made by
``quanta catalog key add``. The key is checked before the body is read or parsed.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Annotated, Any

import anyio
import sqlalchemy as sa
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from . import store
from .rules import MAX_FIELD, RawEntry

log = logging.getLogger("quanta.catalog")

MAX_BATCH = 5000
MAX_BODY = 8 * 1024 * 1024


class RawIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    publisher: str = Field(default="", max_length=4096, validation_alias=AliasChoices("publisher", "Publisher"))
    title: str = Field(min_length=1, max_length=4096, validation_alias=AliasChoices("title", "Product", "Title"))
    version: str = Field(default="", max_length=4096, validation_alias=AliasChoices("version", "Version"))


class NormalizedOut(BaseModel):
    publisher: str
    title: str
    raw_version: str
    matched: bool
    rule: str | None
    vendor: str | None
    product: str | None
    version: str
    category: str | None


_batch = TypeAdapter(list[RawIn])


def _unauthorised(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": 'Bearer realm="Quanta Catalog"'})


def build_router(engine: sa.Engine) -> APIRouter:
    catalog = store.Catalog(engine)

    async def require_key(request: Request) -> str:
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not key:
            raise _unauthorised("a Catalog API key is required (Authorization: Bearer <key>); "
                                "create one with 'quanta catalog key add DIR --name NAME'")
        name = await anyio.to_thread.run_sync(store.key_name, engine, key)
        if name is None:
            raise _unauthorised("unknown or removed Catalog API key")
        return name

    router = APIRouter()

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def ui() -> HTMLResponse:
        return HTMLResponse(resources.files("quanta.catalog").joinpath("ui.html").read_text())

    @router.get("/Info")
    async def info(key: str = Depends(require_key)) -> dict[str, Any]:
        rs = await anyio.to_thread.run_sync(store.ruleset, engine)
        return {"ruleset": rs, "key": key}

    @router.post("/Normalize", response_model=list[NormalizedOut])
    async def normalize(request: Request, key: str = Depends(require_key)) -> list[NormalizedOut]:
        # authenticated (dependency above) before a byte of the body is read
        if int(request.headers.get("content-length") or 0) > MAX_BODY:
            raise HTTPException(413, f"body over {MAX_BODY} bytes; send at most {MAX_BATCH} entries per request")
        body = await request.body()
        if len(body) > MAX_BODY:
            raise HTTPException(413, f"body over {MAX_BODY} bytes")
        try:
            entries = _batch.validate_json(body)
        except ValidationError as e:
            raise HTTPException(422, [{"loc": list(x["loc"]), "msg": x["msg"], "type": x["type"]}
                                      for x in e.errors(include_url=False)[:20]]) from None
        if len(entries) > MAX_BATCH:
            raise HTTPException(413, f"{len(entries)} entries; at most {MAX_BATCH} per request")
        raws = [RawEntry(e.publisher[:MAX_FIELD], e.title[:MAX_FIELD], e.version[:MAX_FIELD]) for e in entries]
        results = await anyio.to_thread.run_sync(catalog.normalize, raws)
        return [NormalizedOut(publisher=n.raw.publisher, title=n.raw.title, raw_version=n.raw.version,
                              matched=n.matched, rule=n.rule_id, vendor=n.vendor, product=n.product,
                              version=n.version, category=n.category) for n in results]

    @router.get("/Products")
    async def products(key: str = Depends(require_key), q: Annotated[str | None, Query(max_length=200)] = None,
                       offset: Annotated[int, Query(ge=0)] = 0,
                       limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        total, rows = await anyio.to_thread.run_sync(store.products, engine, q, offset, limit)
        return {"total": total, "offset": offset, "items": rows}

    @router.get("/Unmatched")
    async def unmatched(key: str = Depends(require_key), q: Annotated[str | None, Query(max_length=200)] = None,
                        offset: Annotated[int, Query(ge=0)] = 0,
                        limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        total, rows = await anyio.to_thread.run_sync(store.unmatched, engine, q, offset, limit)
        return {"total": total, "offset": offset, "items": rows}

    @router.get("/Rules")
    async def rules(key: str = Depends(require_key)) -> list[dict[str, Any]]:
        return await anyio.to_thread.run_sync(store.list_rules, engine)

    return router
