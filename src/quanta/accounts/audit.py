"""The audit log: one writer (:func:`write`), one reader (:func:`query`); no update, no delete.

Every row: time, actor, source address, action, object, and before/after (JSON) where something
changed. ``quanta.db.store.audit`` writes through :func:`write` too. The database refuses UPDATE
and DELETE on ``audit_log`` (triggers, master_0021).
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from quanta.db.tables import audit_log

from . import validate
from .errors import Invalid

QUERY_LIMIT_MAX = 1000
_OFFSET_MAX = 2**62  # a bound the databases' 64-bit integers hold


def _cut(value: object, n: int) -> str:
    s = "" if value is None else str(value)
    return s[:n]


def write(conn: sa.Connection, actor: str, source: str, action: str, object: str = "",
          before: Any = None, after: Any = None, details: dict[str, Any] | None = None) -> None:
    """Add one row inside the caller's transaction (so a change and its audit row commit together)."""
    conn.execute(audit_log.insert().values(
        at=time.time(), actor=_cut(actor, 128), source=validate.source(source) if source else "",
        action=_cut(action, 64), target=_cut(object, 255), details=details or {},
        state_before=before, state_after=after))


def record(engine: sa.Engine, actor: str, source: str, action: str, object: str = "",
           before: Any = None, after: Any = None, **details: Any) -> None:
    """Add one audit row in its own transaction."""
    with engine.begin() as c:
        write(c, actor, source, action, object, before, after, details)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    source: str
    action: str
    object: str
    before: Any
    after: Any
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["time"] = dt.datetime.fromtimestamp(self.at, dt.timezone.utc).isoformat()
        return d


@dataclass(frozen=True, slots=True)
class AuditPage:
    total: int
    offset: int
    limit: int
    items: list[AuditEntry]


def _text_filter(value: str | None, name: str, n: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > n or validate.has_control(value):
        raise Invalid(f"{name} filter: at most {n} characters, no control characters")
    return value


def _time_filter(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1e12 < float(value) < 1e12:
        raise Invalid(f"{name} must be a unix time")
    return float(value)


def query(engine: sa.Engine, *, actor: str | None = None, action: str | None = None, object: str | None = None,
          since: float | None = None, until: float | None = None, limit: int = 100, offset: int = 0) -> AuditPage:
    """Rows newest first, filtered (exact actor, action and object; ``since <= time < until``), paged."""
    actor = _text_filter(actor, "actor", 128)
    action = _text_filter(action, "action", 64)
    object = _text_filter(object, "object", 255)
    since, until = _time_filter(since, "since"), _time_filter(until, "until")
    limit = validate.bounded_int(limit, "limit", 1, QUERY_LIMIT_MAX)
    offset = validate.bounded_int(offset, "offset", 0, _OFFSET_MAX)
    where = []
    if actor is not None:
        where.append(audit_log.c.actor == actor)
    if action is not None:
        where.append(audit_log.c.action == action)
    if object is not None:
        where.append(audit_log.c.target == object)
    if since is not None:
        where.append(audit_log.c.at >= since)
    if until is not None:
        where.append(audit_log.c.at < until)
    with engine.connect() as c:
        total = c.execute(sa.select(sa.func.count()).select_from(audit_log).where(*where)).scalar_one()
        rows = c.execute(sa.select(audit_log).where(*where).order_by(audit_log.c.id.desc())
                         .limit(limit).offset(offset)).all()
    return AuditPage(total=total, offset=offset, limit=limit, items=[
        AuditEntry(id=r.id, at=r.at, actor=r.actor, source=r.source, action=r.action, object=r.target,
                   before=r.state_before, after=r.state_after, details=r.details or {}) for r in rows])
