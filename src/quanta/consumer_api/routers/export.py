"""``GET /Consumer/Instructions/{id}/Export``: every visible result row as CSV, JSON or NDJSON,
streamed in constant memory (a server-side cursor feeds a generator of ~64 KB chunks; nothing
holds the whole result). One row per device and result row: ``device``, ``status``, then the
result columns (in order of first appearance over the answers' layouts), then ``error``.

CSV cells are quoted as RFC 4180 wants (commas, quotes, newlines), and a text cell that starts
with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'`` so a spreadsheet
shows it as text instead of running it as a formula (numbers are written as numbers: a negative
number is not text). JSON is one array of objects; NDJSON one object per line. Scoped like
``/Responses``: the caller's devices only."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

import msgspec
from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from quanta.consumer_api.deps import Api, VisibleInstruction, visible_instruction
from quanta.consumer_api.service import Aligner, ConsumerApi
from quanta.db import store
from quanta.rbac import Access

router = APIRouter(dependencies=[Depends(visible_instruction)])

CHUNK = 64 * 1024  # bytes per streamed chunk
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
MEDIA = {"csv": "text/csv; charset=utf-8", "json": "application/json", "ndjson": "application/x-ndjson"}
_encode = msgspec.json.Encoder().encode


def csv_cell(value: Any) -> Any:
    """A CSV cell: text made safe against formula injection, JSON for nested values."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return value
    if not isinstance(value, str):
        value = _encode(value).decode()
    return "'" + value if value.startswith(FORMULA_START) else value


def rows_of(api: ConsumerApi, iid: int, access: Access, columns: list[str], layouts: list[store.Layout],
            q: store.RowQuery) -> Iterator[tuple[str, str, list[Any], str | None]]:
    """(device, status, cells aligned with ``columns``, error) of every matching row, streamed."""
    align = Aligner(columns)
    if not (q.sort or q.filters or q.device or q.states):
        # the plain export: device order, each device's rows expanded here (no sort in the DB)
        for r in store.iter_results(api.responses, iid, access.devices):
            rows = r["rows"] if isinstance(r["rows"], list) and r["rows"] else [None]
            for row in rows:
                yield r["device_id"], r["state"], align(r["columns"], row if isinstance(row, list) else None), r["error"]
        return
    for r in store.iter_result_rows(api.responses, iid, access.devices, layouts, q):
        yield r["device_id"], r["state"], align(r["columns"], r["row"]), r["error"]


def _csv(header: list[str], rows: Iterator[tuple[str, str, list[Any], str | None]]) -> Iterator[bytes]:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow([csv_cell(h) for h in header])
    for dev, status, cells, error in rows:
        w.writerow([csv_cell(dev), status, *map(csv_cell, cells), csv_cell(error)])
        if buf.tell() >= CHUNK:
            yield buf.getvalue().encode()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue().encode()


def _objects(header: list[str], rows: Iterator[tuple[str, str, list[Any], str | None]]) -> Iterator[bytes]:
    cols = header[2:-1]
    for dev, status, cells, error in rows:
        obj: dict[str, Any] = {"device": dev, "status": status}
        for name, value in zip(cols, cells):
            obj.setdefault(name, value)  # the built-in fields win over a result column of the same name
        obj["error"] = error
        yield _encode(obj)


def _json(header: list[str], rows: Iterator[tuple[str, str, list[Any], str | None]]) -> Iterator[bytes]:
    parts = [b"["]
    size = 1
    first = True
    for obj in _objects(header, rows):
        parts.append(obj if first else b",\n" + obj)
        size += len(parts[-1])
        first = False
        if size >= CHUNK:
            yield b"".join(parts)
            parts, size = [], 0
    parts.append(b"]\n")
    yield b"".join(parts)


def _ndjson(header: list[str], rows: Iterator[tuple[str, str, list[Any], str | None]]) -> Iterator[bytes]:
    parts: list[bytes] = []
    size = 0
    for obj in _objects(header, rows):
        parts.append(obj + b"\n")
        size += len(obj) + 1
        if size >= CHUNK:
            yield b"".join(parts)
            parts, size = [], 0
    yield b"".join(parts)


WRITERS = {"csv": _csv, "json": _json, "ndjson": _ndjson}


async def _in_thread(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Run the blocking generator chunk by chunk in worker threads; close it (and its DB cursor)
    whether the client read to the end or went away."""
    done = object()
    try:
        while True:
            chunk = await asyncio.to_thread(next, chunks, done)
            if chunk is done:
                return
            yield chunk  # type: ignore[misc]
    finally:
        try:
            await asyncio.to_thread(chunks.close)  # type: ignore[attr-defined]
        except ValueError:  # still running in the thread a cancelled read left behind: it ends there
            pass


def export_response(api: ConsumerApi, iid: int, access: Access, fmt: str, layouts: list[store.Layout],
                    q: store.RowQuery) -> StreamingResponse:
    columns = store.result_columns(layouts)
    header = ["device", "status", *columns, "error"]
    chunks = WRITERS[fmt](header, rows_of(api, iid, access, columns, layouts, q))
    return StreamingResponse(_in_thread(chunks), media_type=MEDIA[fmt], headers={
        "Content-Disposition": f'attachment; filename="instruction-{iid}.{fmt}"',
        "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


@router.get("/Consumer/Instructions/{instruction_id}/Export",
            responses={200: {"content": {m: {} for m in MEDIA.values()}}})
async def export(seen: VisibleInstruction, api: Api,
                 format: Annotated[Literal["csv", "json", "ndjson"], Query()] = "csv",  # noqa: A002
                 sort: Annotated[list[str] | None, Query(max_length=4)] = None,
                 filter: Annotated[list[str] | None, Query(max_length=8)] = None,  # noqa: A002
                 device: Annotated[str | None, Query(max_length=255)] = None,
                 status: Annotated[list[str] | None, Query(max_length=16)] = None) -> StreamingResponse:
    """Every result row of the caller's devices (optionally sorted and filtered like
    ``/Responses``), streamed as ``format``."""
    layouts, q = await api.db(api.row_query, seen.id, seen.access, sort or [], filter or [], device, status or [])
    return export_response(api, seen.id, seen.access, format, layouts, q)
