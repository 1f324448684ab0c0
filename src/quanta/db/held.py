"""Held responses: answers the Core keeps without counting them (see ``tables.held_responses``).

A *late* answer arrived after its instruction ended; its final counts stay as they were. A
*refused* answer could not be stored, came through a Switch link its device is not on, or names an
instruction the Core does not know. Both are kept for administrators for the response TTL.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec
import sqlalchemy as sa

from .tables import held_responses

KINDS = ("late", "refused")
HOLD_SECONDS = 7 * 24 * 3600  # how long a held answer is kept


def hold(engine: sa.Engine, rows: Sequence[dict[str, Any]], now: float | None = None) -> int:
    """Keep answers: each row has kind, instruction_id, device_id, switch, state, reason, response
    (the ``Response`` struct). Returns how many were stored."""
    if not rows:
        return 0
    now = time.time() if now is None else now
    with engine.begin() as c:
        c.execute(held_responses.insert(), [
            dict(kind=r["kind"], instruction_id=r["instruction_id"], device_id=r["device_id"][:255],
                 switch=r["switch"][:128], state=r["state"][:16], reason=r["reason"][:2000],
                 response=_encode(r["response"]), received_at=now, expires_at=now + HOLD_SECONDS)
            for r in rows])
    return len(rows)


def _encode(response: Any) -> bytes:
    try:
        return msgspec.msgpack.encode(response)
    except (TypeError, msgspec.EncodeError) as e:  # keep the fact, if not the content
        return msgspec.msgpack.encode({"error": f"content could not be encoded: {e}"[:500]})


def list_held(engine: sa.Engine, *, instruction_id: int | None = None, kind: str | None = None,
              offset: int = 0, limit: int = 100) -> list[dict[str, Any]]:
    """Held answers, newest first, with the response decoded (columns, rows, error)."""
    q = sa.select(held_responses).order_by(held_responses.c.id.desc()).offset(offset).limit(limit)
    if instruction_id is not None:
        q = q.where(held_responses.c.instruction_id == instruction_id)
    if kind is not None:
        q = q.where(held_responses.c.kind == kind)
    out = []
    with engine.connect() as c:
        for r in c.execute(q):
            d = dict(r._mapping)
            d["response"] = msgspec.msgpack.decode(d["response"])
            out.append(d)
    return out


def held_counts(engine: sa.Engine, instruction_id: int) -> dict[str, int]:
    """kind -> number of held answers of one instruction."""
    with engine.connect() as c:
        rows = c.execute(sa.select(held_responses.c.kind, sa.func.count())
                         .where(held_responses.c.instruction_id == instruction_id)
                         .group_by(held_responses.c.kind)).all()
    return {k: int(n) for k, n in rows}


def purge_held(engine: sa.Engine, now: float | None = None) -> int:
    with engine.begin() as c:
        r = c.execute(held_responses.delete().where(held_responses.c.expires_at < (now or time.time())))
        return r.rowcount or 0
