"""What an instruction's devices answered: Responses, Aggregate, Software, Held and the live
Stream. Every route resolves the instruction through ``visible_instruction`` and reads over the
caller's devices only (``seen.access``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from quanta import instructions as ins
from quanta import protocol as p
from quanta.consumer_api.deps import Api, VisibleInstruction, visible_instruction
from quanta.consumer_api.errors import Invalid
from quanta.consumer_api.feed import Snapshot, StatusFeed
from quanta.consumer_api.routers.export import export_response
from quanta.consumer_api.models import DeviceResultsPage, HeldPage, ResultsPage
from quanta.consumer_api.service import ConsumerApi
from quanta.rbac import Access

router = APIRouter(dependencies=[Depends(visible_instruction)])

MAX_OFFSET = 2**31 - 1
MAX_LIMIT = 10_000  # rows (or devices, paging=device) one page may ask for; more is a 422, not clamped
# fields of InstructionStatus the progress stream leaves out (they do not change; the payload may be large)
STATIC_STATUS_FIELDS = {"payload", "parameters", "instruction_set", "devices"}


@router.get("/Consumer/Instructions/{instruction_id}/Responses", response_model=ResultsPage | DeviceResultsPage,
            responses={200: {"content": {"text/csv": {}, "application/x-ndjson": {}}}})
async def responses(seen: VisibleInstruction, api: Api, request: Request,
                    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
                    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 1000,
                    state: Annotated[str | None, Query(max_length=32)] = None,
                    paging: Annotated[Literal["rows", "device"], Query()] = "rows",
                    sort: Annotated[list[str] | None, Query(max_length=4)] = None,
                    filter: Annotated[list[str] | None, Query(max_length=8)] = None,  # noqa: A002
                    device: Annotated[str | None, Query(max_length=255)] = None,
                    status: Annotated[list[str] | None, Query(max_length=16)] = None,
                    format: Annotated[Literal["json", "csv", "ndjson"] | None, Query()] = None,  # noqa: A002
                    ) -> Any:
    """One row per device and result row (a device without rows: one row of empty cells), of the
    caller's devices only: ``offset``/``limit`` in rows (limit 1-10,000, offset 0-2^31-1; outside:
    422; past the last row: no rows, the total still right), ``total`` = the matching rows,
    sorted (``sort=NAME`` / ``sort=-NAME``, up to 4) and filtered (``device=`` substring,
    ``status=`` repeatable, ``state=`` one more status, ``filter=NAME:OP:VALUE`` up to 8)
    server-side; NAME is device, status, error or a result column (a 422 names the valid ones).
    ``format=csv|ndjson`` (or ``Accept: text/csv``) streams every matching row as ``/Export``
    does (not paged, whatever ``paging``).

    ``paging=device`` is the named alternative for a client that wants each device's answer whole
    (the CLI): ``items``, one per device in device order, ``offset``/``limit`` in devices,
    ``state=`` only (no sort or filter)."""
    if state is not None and state not in p.ALL_STATES:
        raise Invalid(f"unknown state {state[:100]!r}; known: {', '.join(p.ALL_STATES)}")
    states = [*(status or []), *([state] if state else [])]
    if format is None and "text/csv" in request.headers.get("accept", "") and \
            "application/json" not in request.headers.get("accept", ""):
        format = "csv"  # noqa: A001
    if format in ("csv", "ndjson"):  # a stream of every matching row: not paged
        layouts, q = await api.db(api.row_query, seen.id, seen.access, sort or [], filter or [], device, states)
        return export_response(api, seen.id, seen.access, format, layouts, q)
    if paging == "device":
        if sort or filter or device or status:
            raise Invalid("sort, filter, device and status page by rows: leave out paging=device")
        return await api.db(api.device_results_page, seen.id, seen.access, offset, limit, state)
    return await api.db(api.result_rows_page, seen.id, seen.access, offset, limit, sort or [], filter or [],
                        device, states)


@router.get("/Consumer/Instructions/{instruction_id}/Aggregate")
async def aggregate(seen: VisibleInstruction, api: Api,
                    by: Annotated[list[str] | None, Query(max_length=8)] = None,
                    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000) -> dict[str, Any]:
    """Rows of every successful answer grouped by columns (default: the definition's aggregation)."""
    return await api.db(api.aggregate, seen.row, seen.access, by, limit)


@router.get("/Consumer/Instructions/{instruction_id}/Software")
async def software(seen: VisibleInstruction, api: Api,
                   limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000) -> dict[str, Any]:
    """Software inventory normalised by the Catalog: the answers' (Publisher, Product, Version)
    rows (e.g. from Software.GetInstallations) mapped to vendor/product/version/category,
    counting installations (a device with two packages of one product counts twice)."""
    return await api.db(api.software, seen.id, seen.access, limit)


@router.get("/Consumer/Instructions/{instruction_id}/Held", response_model=HeldPage)
async def held(seen: VisibleInstruction, api: Api,
               kind: Annotated[Literal["late", "refused"], Query()] = "late",
               offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> HeldPage:
    """Answers the Core kept without counting them: late ones (after the instruction ended), or,
    for Full Administrators, refused ones (not storable, from the wrong Switch, or for an unknown
    instruction; their content came from a device and may be hostile)."""
    return await api.db(api.held_page, seen.id, seen.access, kind, offset, limit)


def _loader(api: ConsumerApi, access: Access | None):  # type: ignore[no-untyped-def]
    async def progress(instruction_id: int) -> Snapshot:
        s = await api.db(api.status, instruction_id, access)
        return None if s is None else (s.model_dump_json(exclude=STATIC_STATUS_FIELDS), s.status in ins.DONE_STATES)
    return progress


def status_feed(api: ConsumerApi) -> StatusFeed:
    """The shared feed of readers who see every device (one poller per instruction)."""
    return StatusFeed(_loader(api, None))


def _feed_for(request: Request, api: ConsumerApi, access: Access) -> tuple[StatusFeed, Any]:
    """Readers who see every device share ``app.state.feed``; readers limited to management groups
    share one feed per distinct set of devices, its counts computed over those devices only."""
    if access.devices is None:
        return request.app.state.feed, None
    feeds: dict[frozenset[str], StatusFeed] = request.app.state.scoped_feeds
    feed = feeds.get(access.devices)
    if feed is None:
        feed = feeds[access.devices] = StatusFeed(_loader(api, access))
    return feed, access.devices


@router.get("/Consumer/Instructions/{instruction_id}/Stream")
async def stream(seen: VisibleInstruction, api: Api, request: Request) -> StreamingResponse:
    """Server-sent events: one ``status`` event whenever the counts change, until it finishes.
    Every viewer of one instruction with the same scope shares one poller (see
    :mod:`quanta.consumer_api.feed`)."""
    feed, key = _feed_for(request, api, seen.access)

    async def connected() -> bool:
        return not await request.is_disconnected()

    async def events() -> AsyncIterator[bytes]:
        try:
            async for data in feed.subscribe(seen.id, connected):
                yield f"event: status\ndata: {data}\n\n".encode()
        finally:
            feeds = request.app.state.scoped_feeds
            if key is not None and not feed.watching() and feeds.get(key) is feed:
                del feeds[key]

    return StreamingResponse(events(), media_type="text/event-stream")
