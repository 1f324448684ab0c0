"""Applying a connector's records to the master ``devices`` table: one transaction, idempotent.

Rules:

- A device the connector has not seen before is inserted with ``source = <connector>`` (offline, no
  agent). Core targeting skips such inventory-only devices until an agent enrols or connects.
- A device that came from this connector is updated to the source's fqdn/os/tags.
- A device known from an agent (enrolled or connected) keeps the agent's fqdn and os; the source only
  fills them when they are empty, and adds its tags. Its ``source`` becomes the connector's name.
- A device owned by another connector is skipped (counted as ``skipped``): the first importer wins.
- A device this connector imported earlier and the source no longer lists is removed if it has no
  agent, or released (``source`` back to null) if it has one. An empty source never removes anything
  unless ``allow_empty`` is set.

Running the same import twice changes nothing the second time (every row counts as ``unchanged``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from quanta.db.tables import devices, integrate_runs

from .connectors import DeviceRecord, SourceError


@dataclass
class SyncResult:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: int = 0


def _has_agent(row: Any) -> bool:
    return row.cert_serial is not None or row.first_seen is not None


def apply(engine: sa.Engine, connector: str, records: list[DeviceRecord], allow_empty: bool) -> SyncResult:
    res = SyncResult()
    ids = [r.device_id for r in records]
    with engine.begin() as c:
        existing: dict[str, Any] = {}
        for i in range(0, len(ids), 500):
            for row in c.execute(sa.select(devices).where(devices.c.device_id.in_(ids[i:i + 500]))):
                existing[row.device_id] = row
        mine = c.execute(sa.select(devices.c.device_id, devices.c.cert_serial, devices.c.first_seen)
                         .where(devices.c.source == connector)).all()
        wanted = set(ids)
        stale = [r for r in mine if r.device_id not in wanted]
        if not records and stale and not allow_empty:
            raise SourceError(f"the source returned no devices; refusing to remove the {len(stale)} devices this "
                              "connector imported before (set allow_empty = true if that is intended)")
        inserts, updates = [], []
        for rec in records:
            row = existing.get(rec.device_id)
            if row is None:
                inserts.append(dict(device_id=rec.device_id, fqdn=rec.fqdn, os=rec.os, tags=dict(rec.tags),
                                    source=connector, online=False, revoked=False))
                continue
            if row.source not in (None, connector) and not _has_agent(row):
                res.skipped += 1
                continue
            if _has_agent(row):
                new = dict(fqdn=row.fqdn or rec.fqdn, os=row.os or rec.os, tags={**(row.tags or {}), **rec.tags})
            else:
                new = dict(fqdn=rec.fqdn, os=rec.os, tags=dict(rec.tags))
            new["source"] = connector
            if all(getattr(row, k) == v for k, v in new.items()):
                res.unchanged += 1
            else:
                updates.append(dict(b_id=rec.device_id, b_fqdn=new["fqdn"], b_os=new["os"], b_tags=new["tags"]))
        if inserts:
            c.execute(devices.insert(), inserts)
            res.created = len(inserts)
        if updates:
            c.execute(devices.update().where(devices.c.device_id == sa.bindparam("b_id"))
                      .values(fqdn=sa.bindparam("b_fqdn"), os=sa.bindparam("b_os"), tags=sa.bindparam("b_tags"),
                              source=connector), updates)
            res.updated = len(updates)
        gone = [r.device_id for r in stale if not _has_agent(r)]
        released = [r.device_id for r in stale if _has_agent(r)]
        for i in range(0, len(gone), 500):
            c.execute(devices.delete().where(devices.c.device_id.in_(gone[i:i + 500]),
                                             devices.c.source == connector))
        for i in range(0, len(released), 500):
            c.execute(devices.update().where(devices.c.device_id.in_(released[i:i + 500]),
                                             devices.c.source == connector).values(source=None))
        res.removed = len(stale)
    return res


def record_run(engine: sa.Engine, connector: str, trigger: str, started: float, result: SyncResult | None,
               error: str | None) -> None:
    r = result or SyncResult()
    with engine.begin() as c:
        c.execute(integrate_runs.insert().values(connector=connector, trigger=trigger, started_at=started,
                                                 finished_at=time.time(), ok=error is None, created=r.created,
                                                 updated=r.updated, unchanged=r.unchanged, removed=r.removed,
                                                 skipped=r.skipped, error=error))


def last_runs(engine: sa.Engine, limit: int = 20) -> list[dict[str, Any]]:
    with engine.connect() as c:
        return [dict(r) for r in c.execute(sa.select(integrate_runs).order_by(integrate_runs.c.id.desc())
                                           .limit(limit)).mappings()]
