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

Server-assigned attributes (``[connector.fields] attributes``), for every device the connector owns
after the run:

- they are written to ``device_attributes`` with ``set_by = "integrate:<connector>"`` (no user name
  holds ':'), so the connector knows its own: it changes and removes only those, never one an
  administrator set (nor another connector's). A name already set by someone else is not
  overridden; that device's report says so.
- an attribute the source no longer gives (an empty field, or the mapping removed) is removed; so
  are all of this connector's attributes of a device it no longer lists.
- a device whose attributes are refused (see ``connectors._attributes``), or would have more than
  ``rbac.MAX_ATTRIBUTES`` in all, keeps its attributes as they were; the run goes on, and its
  result names each such device (``problems``).
- a run that changed anything writes one audit row (``integrate_sync``) in the same transaction,
  summarising the changes (and the devices refused); a run that changed nothing writes none, so
  a scheduled run of an unchanged source leaves the audit log as it was.

Running the same import twice changes nothing the second time (every row counts as ``unchanged``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from quanta.accounts import audit
from quanta.db.tables import device_attributes, devices, integrate_runs
from quanta.rbac import MAX_ATTRIBUTES

from .connectors import DeviceRecord, SourceError


@dataclass
class SyncResult:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: int = 0
    attributes_set: int = 0
    attributes_removed: int = 0
    problems: list[str] = field(default_factory=list)  # one line per device whose attributes were refused

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.removed or self.attributes_set or self.attributes_removed)


MAX_PROBLEMS = 100  # device problems kept in a result and in its audit row (the count is exact)
MAX_AUDITED_CHANGES = 200  # devices whose attribute changes the audit row lists one by one


def owner(connector: str) -> str:
    """``device_attributes.set_by`` of the attributes a connector sets (no user name holds ':')."""
    return f"integrate:{connector}"


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
        owned: list[DeviceRecord] = []  # the devices this connector holds after the run
        for rec in records:
            row = existing.get(rec.device_id)
            if row is None:
                inserts.append(dict(device_id=rec.device_id, fqdn=rec.fqdn, os=rec.os, tags=dict(rec.tags),
                                    source=connector, online=False, revoked=False))
                owned.append(rec)
                continue
            if row.source not in (None, connector) and not _has_agent(row):
                res.skipped += 1
                continue
            owned.append(rec)
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
        changes = _apply_attributes(c, connector, owned, [r.device_id for r in stale], res)
        if res.changed:
            audit.write(c, owner(connector), "", "integrate_sync", connector, details=dict(
                created=res.created, updated=res.updated, removed=res.removed, skipped=res.skipped,
                attributes_set=res.attributes_set, attributes_removed=res.attributes_removed,
                refused=len(res.problems), problems=res.problems[:MAX_PROBLEMS],
                attribute_changes=changes[:MAX_AUDITED_CHANGES], attribute_changes_total=len(changes)))
    res.problems = res.problems[:MAX_PROBLEMS]
    return res


def _apply_attributes(c: sa.Connection, connector: str, owned: list[DeviceRecord], stale: list[str],
                      res: SyncResult) -> list[dict[str, Any]]:
    """Make this connector's attributes of ``owned`` what the source gives, and remove its
    attributes of the ``stale`` devices; returns the changes per device (for the audit row)."""
    me = owner(connector)
    ids = [r.device_id for r in owned]
    current: dict[str, dict[str, tuple[str, str]]] = {}  # device -> name -> (value, set_by)
    for i in range(0, len(ids), 500):
        for dev, name, value, by in c.execute(
                sa.select(device_attributes.c.device_id, device_attributes.c.name, device_attributes.c.value,
                          device_attributes.c.set_by).where(device_attributes.c.device_id.in_(ids[i:i + 500]))):
            current.setdefault(dev, {})[name] = (value, by)
    now = time.time()
    put: list[dict[str, Any]] = []
    drop: list[dict[str, Any]] = []
    changes: list[dict[str, Any]] = []
    for rec in owned:
        if rec.attributes is None:  # refused: left as they were
            res.problems.append(rec.problem or f"{rec.device_id}: attributes refused")
            continue
        have = current.get(rec.device_id, {})
        mine = {k: v for k, (v, by) in have.items() if by == me}
        theirs = {k: by for k, (v, by) in have.items() if by != me}
        taken = sorted(k for k in rec.attributes if k in theirs)
        want = {k: v for k, v in rec.attributes.items() if k not in theirs}
        if taken:
            res.problems.append(f"{rec.device_id}: attribute(s) {', '.join(map(repr, taken))} already set by "
                                + ", ".join(sorted({theirs[k] for k in taken})) + "; not overridden")
        if len(theirs) + len(want) > MAX_ATTRIBUTES:
            res.problems.append(f"{rec.device_id}: {len(theirs) + len(want)} attributes in all, at most "
                                f"{MAX_ATTRIBUTES}; attributes left unchanged")
            continue
        changed = {k: v for k, v in want.items() if mine.get(k) != v}
        gone = sorted(k for k in mine if k not in want)
        drop += [dict(b_d=rec.device_id, b_n=k) for k in [*changed, *gone] if k in mine]
        put += [dict(device_id=rec.device_id, name=k, value=v, set_by=me, set_at=now) for k, v in changed.items()]
        res.attributes_set += len(changed)
        res.attributes_removed += len(gone)
        if changed or gone:
            changes.append(dict(device=rec.device_id, set=changed, removed=gone))
    if drop:
        c.execute(device_attributes.delete().where(device_attributes.c.device_id == sa.bindparam("b_d"),
                                                   device_attributes.c.name == sa.bindparam("b_n"),
                                                   device_attributes.c.set_by == me), drop)
    if put:
        c.execute(device_attributes.insert(), put)
    for i in range(0, len(stale), 500):
        part = stale[i:i + 500]
        gone_rows = c.execute(sa.select(device_attributes.c.device_id, device_attributes.c.name).where(
            device_attributes.c.device_id.in_(part), device_attributes.c.set_by == me)).all()
        if gone_rows:
            c.execute(device_attributes.delete().where(device_attributes.c.device_id.in_(part),
                                                       device_attributes.c.set_by == me))
            res.attributes_removed += len(gone_rows)
            by_dev: dict[str, list[str]] = {}
            for dev, name in gone_rows:
                by_dev.setdefault(dev, []).append(name)
            changes += [dict(device=d, set={}, removed=sorted(n)) for d, n in by_dev.items()]
    return changes


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
