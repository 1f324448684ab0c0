"""What the portal's SCALE editor reads: the method reference and a syntax check.

``GET /Consumer/Methods`` is the method registry as ``quanta methods --json`` prints it (one
function, :func:`quanta.scale.cli.methods_json`, serves both). ``POST /Consumer/Scale/Check``
compiles a payload as ``quanta scale check`` does and answers the first error with its line and
column; it only compiles (nothing is stored or sent), so any signed-in user may call it. The body
is bounded before it is parsed, the payload as ``POST /Consumer/Instructions`` bounds it.
"""

from __future__ import annotations

import asyncio
from functools import lru_cache
from typing import Any, Literal

from annotated_types import MaxLen
from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from quanta.consumer_api.deps import authenticated, bounded_body
from quanta.consumer_api.models import IssueRequest, Strict

MAX_PAYLOAD = next(m.max_length for m in IssueRequest.model_fields["payload"].metadata if isinstance(m, MaxLen))
# A JSON body of a payload at its limit: each character at most 6 bytes as JSON text ("\u0000").
MAX_BODY = 6 * MAX_PAYLOAD + 1024

router = APIRouter(route_class=bounded_body(MAX_BODY))


class CheckRequest(Strict):
    payload: str = Field(max_length=MAX_PAYLOAD, description="SCALE text to compile (instruction parameters "
                                                             "%name% are accepted with any value)")


class CheckError(BaseModel):
    message: str
    line: int = Field(description="1-based; 0 when the error has no position")
    column: int = Field(description="1-based, in characters of the line")


class CheckResult(BaseModel):
    ok: bool
    kind: Literal["question", "action"] | None = Field(default=None, description="when ok")
    actions: list[str] = Field(default_factory=list, description="the action methods it calls, when ok")
    error: CheckError | None = Field(default=None, description="the first error, when not ok")


@lru_cache(maxsize=1)
def _reference() -> list[dict[str, object]]:
    from quanta.scale.cli import methods_json

    return methods_json()  # the declarations do not change while the server runs


@router.get("/Consumer/Methods", dependencies=[Depends(authenticated)])
async def list_methods() -> list[dict[str, Any]]:
    """Every SCALE method: module, name, description, whether it is an action, platforms, typed
    parameters (required, default, aliases, description) and columns (name, type, description)."""
    return _reference()


def _check(payload: str) -> CheckResult:
    from quanta.scale import ScaleError
    from quanta.scale.cli import check_source

    try:
        program = check_source(payload)
    except ScaleError as e:
        return CheckResult(ok=False, error=CheckError(message=e.message, line=e.line, column=e.column))
    if program.is_action:
        return CheckResult(ok=True, kind="action", actions=sorted({a.method for a in program.actions}))
    return CheckResult(ok=True, kind="question")


@router.post("/Consumer/Scale/Check", response_model=CheckResult, dependencies=[Depends(authenticated)])
async def check(req: CheckRequest) -> CheckResult:
    """Compile ``payload`` as ``quanta scale check`` does: ``ok`` with its kind, or the first error
    with its line and column."""
    return await asyncio.to_thread(_check, req.payload)
