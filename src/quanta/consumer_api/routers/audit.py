"""``GET /Consumer/Audit`` (Full Administrators): the audit log, newest first, filtered and paged,
as JSON or streamed as CSV (``?format=csv``). Read only: no route changes or deletes a row (and
the database refuses it, see master_0021)."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from quanta.accounts import AccountError
from quanta.accounts.audit import QUERY_LIMIT_MAX, AuditEntry
from quanta.consumer_api.deps import Api, CurrentActor, account_error, accounts_call, admin_only
from quanta.consumer_api.models import AuditEntryOut, AuditPageOut, UnixTime

router = APIRouter()

CSV_COLUMNS = ("id", "time", "at", "actor", "source", "action", "object", "before", "after", "details")
CSV_PAGE = QUERY_LIMIT_MAX
CSV_MAX_ROWS = 10_000_000
MAX_OFFSET = 2**62


def _cell(value: Any) -> str:
    """A CSV cell that a spreadsheet will not run: text starting with = + - @ (or a tab or CR)
    is prefixed with ' (OWASP, CSV injection). Structured values are JSON."""
    s = value if isinstance(value, str) else ("" if value is None else json.dumps(value, sort_keys=True, default=str))
    return "'" + s if s[:1] in ("=", "+", "-", "@", "\t", "\r") else s


def _row(e: AuditEntry) -> list[str]:
    d = e.to_dict()
    return [str(e.id), d["time"], repr(e.at)] + [_cell(d[k]) for k in CSV_COLUMNS[3:]]


@router.get("/Consumer/Audit", response_model=AuditPageOut, dependencies=[Depends(admin_only("the audit log"))],
            responses={200: {"content": {"text/csv": {}}, "description": "a page (JSON) or every row (CSV)"}})
async def audit_log(api: Api, actor: CurrentActor,
                    actor_: Annotated[str | None, Query(alias="actor", max_length=128,
                                                        description="exactly this actor")] = None,
                    action: Annotated[str | None, Query(max_length=64, description="exactly this action")] = None,
                    object: Annotated[str | None, Query(max_length=255, description="exactly this object")] = None,
                    since: Annotated[UnixTime | None, Query(description="unix time, inclusive")] = None,
                    until: Annotated[UnixTime | None, Query(description="unix time, exclusive")] = None,
                    limit: Annotated[int | None, Query(ge=1, le=CSV_MAX_ROWS,
                                                       description=f"rows; JSON: 1-{QUERY_LIMIT_MAX} "
                                                                   "(default 100); CSV: default every row")] = None,
                    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
                    format: Annotated[Literal["json", "csv"], Query()] = "json") -> Any:
    filters = dict(actor=actor_, action=action, object=object, since=since, until=until)
    if format == "json":
        page = await accounts_call(api.accounts.query_audit, actor, **filters, limit=100 if limit is None else limit,
                                   offset=offset)
        return AuditPageOut(total=page.total, offset=page.offset, limit=page.limit,
                            items=[AuditEntryOut(**e.to_dict()) for e in page.items])
    # CSV: rows up to now (a fixed ``until``, so rows written during the export do not shift the
    # pages), read a page at a time in the worker thread that streams them
    if until is None:
        filters["until"] = time.time()
    first = await accounts_call(api.accounts.query_audit, actor, **filters, limit=min(CSV_PAGE, limit or CSV_PAGE),
                                offset=offset)  # checks the caller and the filters before the answer starts
    wanted = first.total - offset if limit is None else min(limit, max(0, first.total - offset))

    def rows() -> Iterator[str]:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(CSV_COLUMNS)
        page, sent = first, 0
        while True:
            for e in page.items[:max(0, wanted - sent)]:
                w.writerow(_row(e))
                sent += 1
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
            if sent >= wanted or not page.items:
                return
            try:
                page = api.accounts.query_audit(actor, **filters, limit=min(CSV_PAGE, wanted - sent),
                                                offset=offset + sent)
            except AccountError as e:  # cannot happen after the first page; stop the stream if it does
                raise account_error(e) from None

    return StreamingResponse(rows(), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": 'attachment; filename="quanta-audit.csv"',
                                      "X-Total-Count": str(max(0, wanted))})
