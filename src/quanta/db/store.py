"""Queries shared by the components. Every parameter is bound; nothing is pasted into SQL.

All functions are synchronous and take an Engine; async callers run them in a worker thread.
Writes on the response path are idempotent per (instruction, device): a state only moves
forward, and a final state never changes.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from quanta.protocol import DeviceInfo
from quanta.settings import switch_layout

from . import partitions
from .tables import device_certificates, devices, held_responses, instructions, results, switch_configuration

_json_encode = msgspec.json.Encoder().encode
T = TypeVar("T")

ANSWER_STATES = ("success", "nocontent", "error", "notapplicable")
# States a response may overwrite. Anything else is final.
OPEN_STATES = ("pending", "sent", "offline")


def _state_in(states: Sequence[str]) -> sa.ColumnElement[bool]:
    """``state IN (...)`` spelled as ORs, which (unlike IN) works with executemany."""
    return sa.or_(*(results.c.state == s for s in states))


# ------------------------------------------------------------------------ audit
def audit(engine: sa.Engine, actor: str, action: str, target: str = "", *, source: str = "", **details: Any) -> None:
    """One audit row, written by the one writer (``quanta.accounts.audit``); ``source``: the address the
    change came from (empty for a command run on the server)."""
    from quanta.accounts.audit import record

    record(engine, actor, source, action, target, **details)


# ---------------------------------------------------------------------- devices
class DeviceCertificate(NamedTuple):
    """A certificate issued to a device: serial in hex, purpose as in ``quanta.pki.Purpose``."""

    device_id: str
    serial: str
    purpose: str = "device"


class DeviceAlreadyEnrolled(ValueError):
    """Enrolment of names that already have certificates, without ``replace``."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = sorted(names)
        shown = ", ".join(repr(n) for n in self.names[:5]) + (f" and {len(self.names) - 5} more"
                                                              if len(self.names) > 5 else "")
        super().__init__(f"already enrolled: {shown}")


def _adopt_legacy(c: sa.Connection, ids: Sequence[str], now: float) -> None:
    """Give a ``devices.cert_serial`` that has no certificate row (recorded before certificates were
    tracked) its row, so every later query reads ``device_certificates`` alone."""
    rows = c.execute(sa.select(devices.c.device_id, devices.c.cert_serial, devices.c.revoked).where(
        devices.c.device_id.in_(ids), devices.c.cert_serial.is_not(None))).all()
    if not rows:
        return
    have = set(c.execute(sa.select(device_certificates.c.serial).where(
        device_certificates.c.serial.in_([r.cert_serial for r in rows]))).scalars())
    missing = [dict(serial=r.cert_serial, device_id=r.device_id, purpose="device", issued_at=None,
                    revoked_at=now if r.revoked else None) for r in rows if r.cert_serial not in have]
    if missing:
        c.execute(device_certificates.insert(), missing)


def _certificates(c: sa.Connection, ids: Sequence[str], *, active_only: bool) -> dict[str, str]:
    """serial -> device of the certificates issued to these devices (``active_only``: not revoked)."""
    q = sa.select(device_certificates.c.serial, device_certificates.c.device_id).where(
        device_certificates.c.device_id.in_(ids))
    if active_only:
        q = q.where(device_certificates.c.revoked_at.is_(None))
    return {serial: dev for serial, dev in c.execute(q)}


def register_devices(engine: sa.Engine, certificates: Sequence[DeviceCertificate | tuple[str, str]], *,
                     replace: bool = False, before_commit: Callable[[dict[str, str]], None] | None = None,
                     chunk: int = 5000) -> dict[str, str]:
    """Record enrolled devices and every certificate issued to them, in one transaction.

    ``certificates``: :class:`DeviceCertificate` rows (a ``(device_id, serial)`` pair is a device
    certificate). A device that was ever issued a certificate is refused with
    :class:`DeviceAlreadyEnrolled`, and nothing is written, unless ``replace``: then its earlier
    certificates are marked revoked. ``before_commit`` gets those (serial -> device) while the
    transaction is still open, to put them on the CRL; if it raises, nothing is committed. Returns
    them. A new device is stored offline; a replaced one gets its new serial and loses ``revoked``.
    """
    certs = [DeviceCertificate(*c) for c in certificates]
    ids = list(dict.fromkeys(c.device_id for c in certs))
    primary = {c.device_id: c.serial for c in certs if c.purpose == "device"}
    now = time.time()
    superseded: dict[str, str] = {}
    parts = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    with engine.begin() as c:
        enrolled: set[str] = set()
        for part in parts:
            _adopt_legacy(c, part, now)
            enrolled |= set(c.execute(sa.select(device_certificates.c.device_id).distinct().where(
                device_certificates.c.device_id.in_(part))).scalars())
        if enrolled and not replace:
            raise DeviceAlreadyEnrolled(list(enrolled))
        for part in parts:
            old = _certificates(c, part, active_only=True) if enrolled else {}
            if old:
                superseded.update(old)
                c.execute(device_certificates.update().where(device_certificates.c.serial.in_(list(old)))
                          .values(revoked_at=now))
            known = set(c.execute(sa.select(devices.c.device_id).where(devices.c.device_id.in_(part))).scalars())
            new: list[dict[str, Any]] = [dict(device_id=d, cert_serial=primary.get(d), tags={}, online=False,
                                              first_seen=None) for d in part if d not in known]
            if new:
                c.execute(devices.insert(), new)
            again = [dict(b_id=d, b_serial=primary.get(d)) for d in part if d in known]
            if again:
                c.execute(devices.update().where(devices.c.device_id == sa.bindparam("b_id"))
                          .values(cert_serial=sa.bindparam("b_serial"), revoked=False), again)
        for i in range(0, len(certs), chunk):
            c.execute(device_certificates.insert(), [dict(serial=x.serial, device_id=x.device_id, purpose=x.purpose,
                                                          issued_at=now, revoked_at=None)
                                                     for x in certs[i:i + chunk]])
        if before_commit is not None and superseded:
            before_commit(superseded)
    return superseded


def register_device(engine: sa.Engine, device_id: str, cert_serial: str, interaction_serial: str | None = None, *,
                    replace: bool = False,
                    before_commit: Callable[[dict[str, str]], None] | None = None) -> dict[str, str]:
    """Record an enrolled device (offline until it connects) and its certificates; see
    :func:`register_devices` for ``replace`` and ``before_commit``."""
    certs = [DeviceCertificate(device_id, cert_serial, "device")]
    if interaction_serial is not None:
        certs.append(DeviceCertificate(device_id, interaction_serial, "interaction"))
    return register_devices(engine, certs, replace=replace, before_commit=before_commit)


# Bind parameters per statement for an ``IN`` over many devices: PostgreSQL refuses more than
# 65,535 in one statement, SQLite more than 32,766; a fleet-sized list goes in chunks of this size.
IN_CHUNK = 5000


def _chunks(items: Sequence[T], size: int = IN_CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _fits(column: sa.Column[Any], value: object) -> bool:
    """Whether ``value`` can be stored in (or compared with) the string ``column`` on every
    backend: a string within the column's length, without NUL (PostgreSQL refuses NUL in text)."""
    length = getattr(column.type, "length", None)
    return isinstance(value, str) and "\x00" not in value and (length is None or len(value) <= length)


def _storable(info: DeviceInfo) -> bool:
    return (_fits(devices.c.device_id, info.device_id) and bool(info.device_id)
            and _fits(devices.c.fqdn, info.fqdn) and _fits(devices.c.os, info.os)
            and _fits(devices.c.agent_version, info.agent_version) and _fits(devices.c.address, info.address))


# An enrolled device: it has a certificate serial (``quanta enroll`` and batch enrolment record one;
# an Integrate import does not) and is not revoked. SQL with one parameter (``:no`` = false), used
# by the lookup and repeated by the update, so a device revoked in between stays offline.
_ENROLLED_SQL = "cert_serial IS NOT NULL AND revoked = :no"
_ENROLLED = sa.text(_ENROLLED_SQL).bindparams(no=False)
_ONLINE_SQL = ("UPDATE devices SET fqdn = :fqdn, os = :os, agent_version = :ver, tags = :tags, switch = :sw, "
               "address = :addr, online = :yes, last_seen = :now, first_seen = COALESCE(first_seen, :now) "
               f"WHERE device_id = :id AND {_ENROLLED_SQL}")


def devices_online(engine: sa.Engine, switch: str, infos: Sequence[DeviceInfo]) -> list[str]:
    """Mark the devices a Switch announces as online on it, with the details of their hello.

    Only enrolled, non-revoked devices are updated; nothing is ever inserted. Returns the ids
    refused, in the order given: unknown, inventory-only (never enrolled) or revoked devices,
    and announcements that cannot be stored (an id or detail too long for its column, or holding
    NUL). The ``IN`` over the announced ids runs in chunks of :data:`IN_CHUNK`, so one message may
    carry a whole fleet; the update is one driver-level ``executemany`` (a reconnecting Switch
    announces every device it holds at once)."""
    if not infos:
        return []
    now = time.time()
    storable = [d for d in infos if _storable(d)]
    with engine.begin() as c:
        enrolled: set[str] = set()
        for part in _chunks(sorted({d.device_id for d in storable})):
            enrolled.update(r[0] for r in c.execute(sa.select(devices.c.device_id)
                                                    .where(devices.c.device_id.in_(part), _ENROLLED)))
        latest = {d.device_id: d for d in storable if d.device_id in enrolled}  # the last hello wins
        if latest:
            c.exec_driver_sql(_driver_sql(engine, _ONLINE_SQL, json_params=("tags",)), [
                {"fqdn": d.fqdn, "os": d.os, "ver": d.agent_version, "tags": _json_text(d.tags), "sw": switch,
                 "addr": d.address, "yes": True, "now": now, "id": d.device_id, "no": False}
                for d in latest.values()])
    return [d.device_id for d in infos if d.device_id not in enrolled]


_TAGS_SQL = f"UPDATE devices SET tags = :tags WHERE device_id = :id AND switch = :sw AND {_ENROLLED_SQL}"


def set_device_tags(engine: sa.Engine, updates: Mapping[str, tuple[str, Mapping[str, str]]]) -> None:
    """The tags devices reported on their live connection: device id -> (its Switch, its tags in
    full). A device is updated only if it is enrolled, not revoked, and last announced by that
    Switch (a report that raced the device's move to another Switch changes nothing); one
    driver-level ``executemany``."""
    rows = [{"tags": _json_text(dict(tags)), "id": d, "sw": sw, "no": False}
            for d, (sw, tags) in updates.items() if _fits(devices.c.device_id, d)]
    if rows:
        with engine.begin() as c:
            c.exec_driver_sql(_driver_sql(engine, _TAGS_SQL, json_params=("tags",)), rows)


def devices_offline(engine: sa.Engine, switch: str, device_ids: Iterable[str] | None) -> None:
    """Mark devices offline; ``None`` means every device of that Switch. Only devices last seen on
    ``switch`` change; ids that cannot be a device are skipped; the ``IN`` runs in chunks."""
    with engine.begin() as c:
        stmt = devices.update().where(devices.c.switch == switch).values(online=False, last_seen=time.time())
        if device_ids is None:
            c.execute(stmt)
        else:
            ids = sorted({d for d in device_ids if _fits(devices.c.device_id, d)})
            for part in _chunks(ids):
                c.execute(stmt.where(devices.c.device_id.in_(part)))


def list_devices(engine: sa.Engine, scope: Collection[str] | None = None) -> list[dict[str, Any]]:
    """Every device, or only those in ``scope`` (a reader's management groups; see :func:`_in_scope`)."""
    with engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(sa.select(devices).where(_in_scope(c, devices.c.device_id, scope))
                                                     .order_by(devices.c.device_id))]


def mark_revoked(engine: sa.Engine, device_id: str,
                 before_commit: Callable[[dict[str, str]], None] | None = None) -> list[str] | None:
    """Revoke a device: mark it and every certificate ever issued to it revoked; return those serials
    (all of them, so a CRL that missed one is mended), or None if no certificate was ever issued to
    that name. ``before_commit`` gets them (serial -> device) inside the transaction, to write the CRL."""
    now = time.time()
    with engine.begin() as c:
        _adopt_legacy(c, [device_id], now)
        issued = _certificates(c, [device_id], active_only=False)
        if not issued:
            return None
        c.execute(device_certificates.update().where(device_certificates.c.device_id == device_id,
                                                     device_certificates.c.revoked_at.is_(None))
                  .values(revoked_at=now))
        c.execute(devices.update().where(devices.c.device_id == device_id).values(revoked=True))
        if before_commit is not None:
            before_commit(issued)
        return sorted(issued)


# ------------------------------------------------------------ switch config
def switch_rows(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as c:
        return [dict(r._mapping) for r in
                c.execute(sa.select(switch_configuration).order_by(switch_configuration.c.Name))]


def switch_device_counts(engine: sa.Engine) -> dict[str, dict[str, int]]:
    """switch name -> {"online": n, "devices": n}, counting non-revoked devices last seen on it."""
    q = (sa.select(devices.c.switch, devices.c.online, sa.func.count())
         .where(devices.c.revoked == sa.false(), devices.c.switch.is_not(None))
         .group_by(devices.c.switch, devices.c.online))
    out: dict[str, dict[str, int]] = {}
    with engine.connect() as c:
        for name, online, n in c.execute(q):
            d = out.setdefault(name, {"online": 0, "devices": 0})
            d["devices"] += int(n)
            if online:
                d["online"] += int(n)
    return out


def set_switches(engine: sa.Engine, host: str, first_port: int, count: int) -> None:
    """Create ``count`` Switch rows on consecutive port pairs (client port, poke port)."""
    with engine.begin() as c:
        c.execute(switch_configuration.delete())
        c.execute(switch_configuration.insert(), switch_layout(host, first_port, count))


# --------------------------------------------------------------- instructions
def get_instruction(engine: sa.Engine, instruction_id: int) -> dict[str, Any] | None:
    with engine.connect() as c:
        row = c.execute(sa.select(instructions).where(instructions.c.id == instruction_id)).first()
        return dict(row._mapping) if row else None


class InstructionMatch(NamedTuple):
    """What a history search asks for (each None: any): who requested it, a case-insensitive part
    of its name (LIKE wildcards in it match themselves), created at or after ``since`` and
    before ``until`` (unix times)."""

    created_by: str | None = None
    name: str | None = None
    since: float | None = None
    until: float | None = None


def _instruction_filter(statuses: Sequence[str] | None, sets: Collection[str] | None,
                        raw: bool, match: InstructionMatch | None = None) -> list[sa.ColumnElement[bool]]:
    where: list[sa.ColumnElement[bool]] = []
    if statuses:
        where.append(instructions.c.status.in_(list(statuses)))
    if match is not None:
        if match.created_by is not None:
            where.append(instructions.c.created_by == match.created_by)
        if match.name:
            where.append(instructions.c.name.icontains(match.name, autoescape=True))
        if match.since is not None:
            where.append(instructions.c.created_at >= match.since)
        if match.until is not None:
            where.append(instructions.c.created_at < match.until)
    if sets is not None:  # only these instruction sets (and raw SCALE ones, which have none, if ``raw``)
        cond = instructions.c.instruction_set.in_(sorted(sets))
        where.append(sa.or_(cond, instructions.c.instruction_set.is_(None)) if raw else cond)
    return where


def list_instructions(engine: sa.Engine, offset: int, limit: int, statuses: Sequence[str] | None = None, *,
                      sets: Collection[str] | None = None, raw: bool = True,
                      ids: Collection[int] | None = None,
                      match: InstructionMatch | None = None) -> tuple[int, list[dict[str, Any]]]:
    """(total, newest first page) of instructions, optionally only those in ``statuses``, of the
    instruction ``sets`` (None: any; ``raw``: raw SCALE ones too), with one of ``ids`` and
    matching ``match``."""
    cols = [c for c in instructions.c if c.name not in ("body", "signature")]
    where = _instruction_filter(statuses, sets, raw, match)
    with engine.connect() as c:
        if ids is not None:
            where.append(_in_scope(c, instructions.c.id, ids, _scope_ids))
        q = sa.select(*cols).where(*where).order_by(instructions.c.id.desc()).offset(offset).limit(limit)
        n = sa.select(sa.func.count()).select_from(instructions).where(*where)
        return int(c.execute(n).scalar_one()), [dict(r._mapping) for r in c.execute(q)]


def instruction_scopes(engine: sa.Engine, statuses: Sequence[str] | None = None, *,
                       sets: Collection[str] | None = None, raw: bool = True,
                       match: InstructionMatch | None = None) -> list[tuple[int, list[str] | None]]:
    """(id, requested device names or None) of the instructions :func:`list_instructions` would
    list, without their payloads: what a reader limited to management groups is matched against."""
    q = sa.select(instructions.c.id, instructions.c.scope).where(*_instruction_filter(statuses, sets, raw, match))
    with engine.connect() as c:
        return [(int(i), sc) for i, sc in c.execute(q)]


def active_instructions(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(
            sa.select(instructions).where(instructions.c.status == "active").order_by(instructions.c.id))]


_TARGET_SQL: dict[tuple[str, bool], str] = {}
# A targetable device: not revoked, and with an agent that could answer (inventory-only devices,
# imported by an Integrate connector and never enrolled nor connected, have none).
# Only an enrolled device (a certificate serial recorded, not revoked) has an agent that can answer:
# inventory-only devices (imported by an Integrate connector) and rows left by versions that
# registered any name a Switch announced are not targeted, so they never count as offline.
_TARGETABLE = sa.and_(devices.c.revoked == sa.false(), devices.c.cert_serial.is_not(None))
_TARGET_QUERY = sa.select(devices.c.device_id, devices.c.online).where(_TARGETABLE)


def target_devices(engine: sa.Engine, scope: list[str] | None) -> dict[str, bool]:
    """device_id -> online, for every targetable device in scope (``None``: the whole fleet).

    A scope reads only its own devices (an ``IN`` in chunks of :data:`IN_CHUNK`); names that
    cannot be a device id are not looked up. Inventory-only and revoked devices are not targeted."""
    if scope is not None:
        wanted = sorted({d for d in scope if _fits(devices.c.device_id, d)})
        out: dict[str, bool] = {}
        with engine.connect() as c:
            for part in _chunks(wanted):
                out.update((r[0], bool(r[1])) for r in c.execute(_TARGET_QUERY.where(devices.c.device_id.in_(part))))
        return out
    # On the question's critical path (before the Switches are poked): the statement has only
    # constants, so it is compiled once per dialect and its rows fetched by the DBAPI cursor,
    # without SQLAlchemy's per-row processing.
    # On SQLite the rows come as one JSON array (one step of the statement, without the GIL, where
    # a fetchall takes the GIL back for every row: see SQLITE_BULK).
    bulk = SQLITE_BULK and engine.dialect.name == "sqlite"
    sql = _TARGET_SQL.get((engine.dialect.name, bulk))
    if sql is None:
        query = (sa.select(sa.func.json_group_array(sa.func.json_array(devices.c.device_id, devices.c.online)))
                 .where(_TARGETABLE) if bulk else _TARGET_QUERY)
        sql = _TARGET_SQL[engine.dialect.name, bulk] = str(query.compile(dialect=engine.dialect,
                                                                   compile_kwargs={"literal_binds": True}))
    with engine.connect() as c:
        cur = c.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cur.execute(sql)
            rows = msgspec.json.decode(cur.fetchone()[0]) if bulk else cur.fetchall()
        finally:
            cur.close()
    return {r[0]: bool(r[1]) for r in rows}


# ---------------------------------------------------------------- responses
def insert_targets(engine: sa.Engine, instruction_id: int, targets: dict[str, bool],
                   response_expires_at: float | None) -> int:
    """Create one row per targeted device; idempotent (existing rows are kept).

    Returns how many target rows already existed (0 on a first issue). This runs before the
    Switches are poked, on the question's critical path: on SQLite the insert is one driver-level
    ``executemany``; on PostgreSQL the rows are COPY-ed into a temporary table and inserted from it
    in one statement, into the partition of ``response_expires_at``'s day (made first if need be).
    ``None`` (or NaN) means never: stored as +Infinity."""
    expires_at = partitions.stored_expiry(response_expires_at)
    now = time.time()
    if engine.dialect.name != "postgresql":
        with engine.begin() as c:
            if SQLITE_BULK and not any("\x00" in d for d in targets):  # one statement per state: SQLITE_BULK
                existing = int(c.execute(sa.select(sa.func.count()).select_from(results)
                                         .where(results.c.instruction_id == instruction_id)).scalar_one())
                for state, online in (("pending", True), ("offline", False)):
                    ids = [d for d, o in targets.items() if o is online]
                    if ids:
                        c.exec_driver_sql(_TARGETS_SQLITE, (instruction_id, state, now, expires_at,
                                                            _json_encode(ids).decode()))
                return existing
            have = {r[0] for r in c.execute(sa.select(results.c.device_id)
                                            .where(results.c.instruction_id == instruction_id))}
            params = [(instruction_id, d, "pending" if online else "offline", now, expires_at)
                      for d, online in targets.items() if d not in have]
            if params:
                c.exec_driver_sql("INSERT INTO results (instruction_id, device_id, state, updated_at, expires_at) "
                                  "VALUES (?, ?, ?, ?, ?)", params)
            return len(have)
    for attempt in (1, 2):
        partitions.ensure(engine, [expires_at])
        try:
            return _insert_targets_pg(engine, instruction_id, targets, expires_at, now)
        except sa.exc.IntegrityError as e:  # its day's partition was dropped meanwhile (a past expiry)
            if attempt == 2 or getattr(e.orig, "sqlstate", None) != _CHECK_VIOLATION:
                raise
    raise AssertionError("unreachable")


_CHECK_VIOLATION = "23514"  # SQLSTATE of "no partition of relation found for row"
_TARGET_LOCK = 0x5174  # pg advisory lock namespace (with the instruction id): its target rows
_STAGE_TARGETS = "CREATE TEMPORARY TABLE IF NOT EXISTS quanta_stage_targets (d TEXT, s TEXT) ON COMMIT DELETE ROWS"
_STAGE_ANSWERS = ("CREATE TEMPORARY TABLE IF NOT EXISTS quanta_stage_answers "
                  "(i INTEGER, d TEXT, s TEXT, c TEXT, r TEXT, e TEXT) ON COMMIT DELETE ROWS")


def _copy(c: sa.Connection, sql: str, rows: Iterable[Sequence[Any]]) -> None:
    """COPY ``rows`` in through psycopg's ``cursor.copy``, inside the connection's transaction."""
    import psycopg

    cur = c.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        with cur.copy(sql) as cp:
            for row in rows:
                cp.write_row(row)
    except psycopg.Error as e:  # as SQLAlchemy raises it for execute: an outage is an OperationalError
        raise sa.exc.DBAPIError.instance(sql, None, e, psycopg.Error, dialect=c.dialect) from e
    finally:
        cur.close()


def _insert_targets_pg(engine: sa.Engine, instruction_id: int, targets: dict[str, bool], expires_at: float,
                       now: float) -> int:
    """The primary key holds the partition key, so it alone would allow a second row of a device
    with another expiry: an advisory lock on the instruction serialises its target writes (another
    Core issuing it too), and a device that has a row (whatever its expiry) is skipped."""
    with engine.begin() as c:
        c.exec_driver_sql("SELECT pg_advisory_xact_lock(%(ns)s, %(i)s)", {"ns": _TARGET_LOCK, "i": instruction_id})
        existing = int(c.execute(sa.select(sa.func.count()).select_from(results)
                                 .where(results.c.instruction_id == instruction_id)).scalar_one())
        if targets:
            c.exec_driver_sql(_STAGE_TARGETS)
            _copy(c, "COPY quanta_stage_targets (d, s) FROM STDIN",
                  ((d, "pending" if online else "offline") for d, online in targets.items()))
            written = c.exec_driver_sql(
                "INSERT INTO results (instruction_id, device_id, state, updated_at, expires_at) "
                "SELECT %(i)s, t.d, t.s, %(t)s, %(x)s FROM quanta_stage_targets t WHERE NOT EXISTS "
                "(SELECT 1 FROM results r WHERE r.instruction_id = %(i)s AND r.device_id = t.d) "
                "ON CONFLICT DO NOTHING", {"i": instruction_id, "t": now, "x": expires_at}).rowcount
            partitions.analyze_if_unknown(c, expires_at, written or 0)
        return existing


def mark_sent(engine: sa.Engine, instruction_id: int, device_ids: Sequence[str]) -> int:
    """pending/offline -> sent for the devices a Switch delivered to: on PostgreSQL one UPDATE over
    an array of the ids (``= ANY``), on SQLite one over a JSON array of them (``SQLITE_BULK``) or a
    driver executemany. Each row is found by its key (see ``_MARK_SENT_SQL``)."""
    if not device_ids:
        return 0
    now = time.time()
    with engine.begin() as c:
        if engine.dialect.name == "postgresql":
            r = c.exec_driver_sql(_MARK_SENT_SQL["postgresql"], {"t": now, "i": instruction_id, "d": list(device_ids)})
        elif SQLITE_BULK and not any("\x00" in d for d in device_ids):  # a NUL: see SQLITE_BULK
            r = c.exec_driver_sql(_MARK_SENT_SQL["sqlite_bulk"],
                                  (now, instruction_id, _json_encode(list(device_ids)).decode()))  # IN: any order
        else:
            r = c.exec_driver_sql(_MARK_SENT_SQL["sqlite"], [{"t": now, "i": instruction_id, "d": d}
                                                             for d in sorted(device_ids)])  # key order
        return r.rowcount if r.rowcount is not None and r.rowcount >= 0 else 0


def _state_in_by_key(states: Sequence[str]) -> str:
    """``results.state IN (states)`` as an expression, so that no planner answers it from
    ``ix_results_state`` (instruction_id, state) and each row is found by its key instead. With the
    ids in a list or subquery SQLite chose that index and scanned every open row of the instruction
    for each statement (mark_sent: 7.5 ms for 10 ids with 50,000 rows open, against 1.1 ms by the
    key). ``states`` are the module's constants, not input."""
    return "(results.state || '') IN (" + ", ".join(f"'{s}'" for s in states) + ")"


# mark_sent's UPDATE, by dialect and path; the state test by key (_state_in_by_key). Constants.
_SENT_FROM = _state_in_by_key(("pending", "offline"))
_MARK_SENT_SQL = {
    "postgresql": "UPDATE results SET state = 'sent', updated_at = %(t)s WHERE instruction_id = %(i)s "
                  f"AND device_id = ANY(%(d)s) AND {_SENT_FROM}",
    "sqlite_bulk": "UPDATE results SET state = 'sent', updated_at = ? WHERE instruction_id = ? "
                   f"AND device_id IN (SELECT value FROM json_each(?)) AND {_SENT_FROM}",
    "sqlite": f"UPDATE results SET state = 'sent', updated_at = :t WHERE instruction_id = :i AND device_id = :d "
              f"AND {_SENT_FROM}",
}


def ingest(engine: sa.Engine, rows: Sequence[dict[str, Any]]) -> int:
    """Store responses; returns how many target rows moved to an answered state.
    See :func:`ingest_counted`."""
    return sum(ingest_counted(engine, rows).values())


def ingest_counted(engine: sa.Engine, rows: Sequence[dict[str, Any]]) -> dict[int, int]:
    """Store responses. Each row: instruction_id, device_id, state, columns, rows, error.

    Only a row still open (pending, sent, offline) is updated, so a duplicate, a late answer
    after expiry, or an answer from an untargeted device changes nothing.

    Returns, per instruction, how many rows moved from an open to an answered state (the
    driver's ``executemany`` rowcount), or -1 where the driver cannot tell.

    This is the hot path (one call per Switch batch): it runs one driver-level ``executemany``
    with the JSON pre-encoded by msgspec, which is what the ``results`` JSON columns store; on
    PostgreSQL a batch of :data:`COPY_MIN` answers or more is COPY-ed instead (see
    :func:`_ingest_copy`), with the same outcome.
    """
    if not rows:
        return {}
    if engine.dialect.name == "postgresql" and len(rows) >= COPY_MIN:
        return _ingest_copy(engine, rows)
    now = time.time()
    enc = _json_text
    by_instruction: dict[int, list[tuple[Any, ...]]] = {}
    for r in rows:
        iid = r["instruction_id"]
        prms = by_instruction.get(iid)
        if prms is None:
            prms = by_instruction[iid] = []
        prms.append((r["state"], enc(r["columns"]), enc(r["rows"]), r["error"], now, iid, r["device_id"]))
    sql = _INGEST_SQL[engine.dialect.name == "postgresql"]
    out: dict[int, int] = {}
    with engine.begin() as c:  # one transaction, one executemany per instruction (usually one)
        for iid, prms in by_instruction.items():
            # In key order: the answers arrive in no order, and SQLite's pages (the rows, the state
            # index) are touched far less often when neighbours are written together (3.5x faster at
            # 100,000 open rows). Stable: of two answers of one device, the first still wins.
            prms.sort(key=_device_of)
            # An executemany, not a JSON-array statement as for the targets (SQLITE_BULK): measured
            # at 50,000 devices on 3 Switches, the upsert over json_each cost the Core 25 % more CPU
            # a question (6.5 s against 5.2 s) and ended later, though its writer held the GIL less.
            res = c.exec_driver_sql(sql, prms)
            out[iid] = res.rowcount if res.rowcount is not None and res.rowcount >= 0 else -1
    return out


def _device_of(prm: tuple[Any, ...]) -> str:
    return prm[6]  # type: ignore[no-any-return]


COPY_MIN = 64  # answers in one batch from which PostgreSQL takes them through COPY
# The open-state test of an answer's row on PostgreSQL, written so that the planner finds the row by
# its key: ``ix_results_state`` looks selective for the open states (most retained rows are answered,
# and a new instruction's rows have no statistics yet), but it would scan every open row of the
# instruction for each answer (seconds a batch on a big store).
_OPEN_BY_KEY = _state_in_by_key(OPEN_STATES)
# ingest_counted's UPDATE with positional parameters (state, columns, rows, error, updated_at,
# instruction_id, device_id): [SQLite (qmark), PostgreSQL (psycopg's format)]. Constants, not input.
_INGEST_SQL = (
    "UPDATE results SET state = ?, columns = ?, rows = ?, error = ?, updated_at = ? WHERE instruction_id = ? "
    "AND device_id = ? AND (" + " OR ".join(f"state = '{s}'" for s in OPEN_STATES) + ")",
    "UPDATE results SET state = %s, columns = CAST(%s AS JSON), rows = CAST(%s AS JSON), error = %s, updated_at = %s "
    f"WHERE instruction_id = %s AND device_id = %s AND {_OPEN_BY_KEY}",
)


# The SQLite writes of a question's targets and deliveries, and the read of the fleet's targets, as
# one statement over a JSON array (json_each) rather than a driver ``executemany`` / ``fetchall``.
# The sqlite3 module releases the GIL around every row's step and takes it back after; the Core's
# writer thread runs these while its event loop decodes the Switches' batches, and each row then
# waits for the loop's thread to give the GIL up. Measured (2 cores, 50,000 target rows): unloaded
# 0.12 s against 0.21 s; the loop busy half the time 0.18 s against 0.46 s; at 50,000 devices on
# 3 Switches the targets were written 0.84 s after the POST instead of 1.57 s. The answers' UPDATE
# stays an executemany (see ingest_counted). Needs the built-in JSON functions (SQLite 3.38);
# older libraries keep the executemany, as does an id holding a NUL (``j.value`` would cut it short).
SQLITE_BULK = sqlite3.sqlite_version_info >= (3, 38, 0)
# (instruction_id, state, updated_at, expires_at, JSON array of device ids); an existing row is kept
_TARGETS_SQLITE = ("INSERT INTO results (instruction_id, device_id, state, updated_at, expires_at) "
                   "SELECT ?1, j.value, ?2, ?3, ?4 FROM json_each(?5) AS j WHERE true ON CONFLICT DO NOTHING")


def _ingest_copy(engine: sa.Engine, rows: Sequence[dict[str, Any]]) -> dict[int, int]:
    """:func:`ingest_counted` on PostgreSQL for a large batch: the answers are COPY-ed into a
    temporary table, then one ``UPDATE ... FROM`` moves the open rows they name. As with the
    ``executemany``, the first answer for an (instruction, device) wins (later ones would find it
    answered): the duplicates are dropped here first, as one UPDATE may change a row only once."""
    first: dict[tuple[int, str], dict[str, Any]] = {}
    for r in rows:
        first.setdefault((r["instruction_id"], r["device_id"]), r)
    enc = _json_text
    out = dict.fromkeys((r["instruction_id"] for r in rows), 0)
    with engine.begin() as c:
        c.exec_driver_sql(_STAGE_ANSWERS)
        # Each answer's row by its key, whatever the statistics say: a hash join would read every
        # partition whole for each batch (seen: 1 s a batch with 1 M rows retained). Reset at commit.
        c.exec_driver_sql("SET LOCAL enable_hashjoin = off")
        c.exec_driver_sql("SET LOCAL enable_mergejoin = off")
        _copy(c, "COPY quanta_stage_answers (i, d, s, c, r, e) FROM STDIN",
              ((r["instruction_id"], r["device_id"], r["state"], enc(r["columns"]), enc(r["rows"]), r["error"])
               for r in first.values()))
        # Only the partitions holding these instructions' rows (usually the one day of their
        # expiry) are looked in, rather than every day's for each answer.
        where = partitions.holding(c, out)
        if where is None:
            return out
        for iid, n in c.exec_driver_sql(
                "WITH moved AS (UPDATE results SET state = a.s, columns = CAST(a.c AS JSON), rows = CAST(a.r AS JSON), "
                "error = a.e, updated_at = %(t)s FROM quanta_stage_answers a WHERE results.instruction_id = a.i "
                f"AND results.device_id = a.d AND {_OPEN_BY_KEY} AND {where} RETURNING results.instruction_id) "
                "SELECT instruction_id, count(*) FROM moved GROUP BY instruction_id", {"t": time.time()}):
            out[int(iid)] = int(n)
    return out


def _driver_sql(engine: sa.Engine, template: str, json_params: Sequence[str] = ()) -> str:
    """SQL for ``exec_driver_sql`` from one template with ``:name`` placeholders (sqlite3's named
    style); for psycopg they become ``%(name)s``, JSON parameters cast to JSON. Hot-path writes use
    this to skip SQLAlchemy's per-row parameter processing."""
    if engine.dialect.name != "postgresql":
        return template

    def placeholder(m: re.Match[str]) -> str:
        name = m.group(1)
        return f"CAST(%({name})s AS JSON)" if name in json_params else f"%({name})s"

    return re.sub(r":([A-Za-z_]\w*)", placeholder, template)


def _json_text(value: Any) -> str | None:
    # SQLAlchemy's JSON type stores NULL for None and json text otherwise; match it.
    return None if value is None else _json_encode(value).decode()


def expire(engine: sa.Engine, instruction_id: int) -> None:
    with engine.begin() as c:
        c.execute(results.update().where(results.c.instruction_id == instruction_id,
                                         results.c.state.in_(("pending", "sent")))
                  .values(state="expired", updated_at=time.time()))


def state_counts(engine: sa.Engine, instruction_id: int, scope: Collection[str] | None = None) -> dict[str, int]:
    """state -> number of targeted devices, over the devices in ``scope`` only (None: all)."""
    with engine.connect() as c:
        rows = c.execute(sa.select(results.c.state, sa.func.count())
                         .where(results.c.instruction_id == instruction_id, _in_scope(c, results.c.device_id, scope))
                         .group_by(results.c.state)).all()
    return {r[0]: int(r[1]) for r in rows}


def state_counts_many(engine: sa.Engine, instruction_ids: Sequence[int],
                      scope: Collection[str] | None = None) -> dict[int, dict[str, int]]:
    """instruction id -> {state: count}, in one grouped query (over ``scope``'s devices only)."""
    out: dict[int, dict[str, int]] = {i: {} for i in instruction_ids}
    if not out:
        return out
    with engine.connect() as c:
        rows = c.execute(sa.select(results.c.instruction_id, results.c.state, sa.func.count())
                         .where(results.c.instruction_id.in_(list(out)), _in_scope(c, results.c.device_id, scope))
                         .group_by(results.c.instruction_id, results.c.state)).all()
    for iid, state, n in rows:
        out[int(iid)][state] = int(n)
    return out


def unanswered(engine: sa.Engine, instruction_id: int) -> int:
    with engine.connect() as c:
        return int(c.execute(sa.select(sa.func.count()).select_from(results).where(
            results.c.instruction_id == instruction_id,
            results.c.state.not_in(ANSWER_STATES))).scalar_one())


def unanswered_many(engine: sa.Engine, instruction_ids: Sequence[int]) -> dict[int, int]:
    """instruction id -> number of target rows not in an answered state, in one grouped query."""
    out = {int(i): 0 for i in instruction_ids}
    if not out:
        return out
    with engine.connect() as c:
        for iid, n in c.execute(sa.select(results.c.instruction_id, sa.func.count()).where(
                results.c.instruction_id.in_(list(out)), results.c.state.not_in(ANSWER_STATES))
                .group_by(results.c.instruction_id)):
            out[int(iid)] = int(n)
    return out


def answered_by_device(engine: sa.Engine, instruction_ids: Sequence[int], device_ids: Sequence[str],
                       chunk: int = 500) -> dict[str, list[int]]:
    """device id -> which of ``instruction_ids`` it has already answered (an answered state is
    committed). The Switch uses it not to deliver an instruction again to a device whose journal was
    lost, so that an action never runs twice."""
    out: dict[str, list[int]] = {}
    if not instruction_ids or not device_ids:
        return out
    iids = list(instruction_ids)
    with engine.connect() as c:
        for i in range(0, len(device_ids), chunk):
            part = list(device_ids[i:i + chunk])
            for iid, dev in c.execute(sa.select(results.c.instruction_id, results.c.device_id).where(
                    results.c.instruction_id.in_(iids), results.c.device_id.in_(part),
                    results.c.state.in_(ANSWER_STATES))):
                out.setdefault(dev, []).append(int(iid))
    return out


def device_switches(engine: sa.Engine, device_ids: Sequence[str]) -> dict[str, str | None]:
    """device id -> the Switch it last said hello through (None: never), for known devices."""
    out: dict[str, str | None] = {}
    ids = list(device_ids)
    with engine.connect() as c:
        for i in range(0, len(ids), 500):
            for dev, sw in c.execute(sa.select(devices.c.device_id, devices.c.switch)
                                     .where(devices.c.device_id.in_(ids[i:i + 500]))):
                out[dev] = sw
    return out


def instruction_statuses(engine: sa.Engine, instruction_ids: Sequence[int]) -> dict[int, str]:
    """instruction id -> status, for those that exist."""
    ids = list(instruction_ids)
    out: dict[int, str] = {}
    with engine.connect() as c:
        for i in range(0, len(ids), 500):
            for iid, status in c.execute(sa.select(instructions.c.id, instructions.c.status)
                                         .where(instructions.c.id.in_(ids[i:i + 500]))):
                out[int(iid)] = status
    return out


def page_results(engine: sa.Engine, instruction_id: int, offset: int, limit: int,
                 state: str | None = None, scope: Collection[str] | None = None) -> list[dict[str, Any]]:
    """One page of an instruction's target rows by device id, of ``scope``'s devices only (None: all)."""
    with engine.connect() as c:
        q = (sa.select(results).where(results.c.instruction_id == instruction_id,
                                      _in_scope(c, results.c.device_id, scope))
             .order_by(results.c.device_id).offset(offset).limit(limit))
        if state:
            q = q.where(results.c.state == state)
        return [dict(r._mapping) for r in c.execute(q)]


def aggregate(engine: sa.Engine, instruction_id: int, by: Sequence[str], limit: int = 1000,
              scope: Collection[str] | None = None) -> dict[str, Any]:
    """Group every answered row of an instruction by the ``by`` columns.

    Returns {"groups": [{"values": [...], "rows": n, "devices": m}], "devices": answered devices,
    "missing": devices whose answer lacks one of the columns}; largest groups first.
    """
    from collections import Counter

    rows_per: Counter[tuple[Any, ...]] = Counter()
    devices_per: Counter[tuple[Any, ...]] = Counter()
    answered = missing = 0
    with engine.connect() as c:
        q = (sa.select(results.c.columns, results.c.rows)
             .where(results.c.instruction_id == instruction_id, results.c.state == "success",
                    _in_scope(c, results.c.device_id, scope)))
        for cols, data in c.execute(q):
            answered += 1
            cols = list(cols or [])
            try:
                idx = [cols.index(b) for b in by]
            except ValueError:
                missing += 1
                continue
            seen = set()
            for row in data or []:
                key = tuple(row[i] for i in idx)
                rows_per[key] += 1
                seen.add(key)
            for key in seen:
                devices_per[key] += 1
    groups = [{"values": list(k), "rows": n, "devices": devices_per[k]} for k, n in rows_per.most_common(limit)]
    return {"by": list(by), "groups": groups, "devices": answered, "missing": missing,
            "truncated": len(rows_per) > limit}


# ------------------------------------------------------------- scoped reads
# A reader limited to management groups sees only their devices' rows. Up to SCOPE_INLINE ids are
# bound in an ``IN``; a larger scope (a group may hold 50,000 devices) is written once per read to a
# temporary table of that connection and joined with a subquery, so no statement carries more bound
# parameters than IN_CHUNK and paging (OFFSET/LIMIT) stays in SQL. Unscoped reads (None) add nothing.
SCOPE_INLINE = 500
_scope_devices = sa.table("quanta_scope_devices", sa.column("v", sa.String))
_scope_ids = sa.table("quanta_scope_ids", sa.column("v", sa.Integer))
_SCOPE_DDL = {"quanta_scope_devices": "CREATE TEMPORARY TABLE IF NOT EXISTS quanta_scope_devices "
                                      "(v VARCHAR(255) PRIMARY KEY)",
              "quanta_scope_ids": "CREATE TEMPORARY TABLE IF NOT EXISTS quanta_scope_ids (v INTEGER PRIMARY KEY)"}


def _in_scope(c: sa.Connection, column: sa.ColumnElement[Any], scope: Collection[Any] | None,
              table: sa.TableClause = _scope_devices) -> sa.ColumnElement[bool]:
    """``column`` is one of ``scope`` (None: no condition). Call inside the connection's read."""
    if scope is None:
        return sa.true()
    values = sorted(scope)
    if len(values) <= SCOPE_INLINE:
        return column.in_(values)  # an empty scope matches nothing
    c.exec_driver_sql(_SCOPE_DDL[table.name])
    c.execute(table.delete())
    for part in _chunks(values):
        c.execute(table.insert(), [{"v": v} for v in part])
    return column.in_(sa.select(table.c.v))


def visible_rows(engine: sa.Engine, instruction_id: int, scope: Collection[str] | None) -> tuple[bool, bool]:
    """(the instruction has target rows, one of them is a device of ``scope``)."""
    with engine.connect() as c:
        has = c.execute(sa.select(results.c.device_id).where(results.c.instruction_id == instruction_id)
                        .limit(1)).first() is not None
        if not has or scope is None:
            return has, has
        seen = c.execute(sa.select(results.c.device_id).where(
            results.c.instruction_id == instruction_id, _in_scope(c, results.c.device_id, scope)).limit(1)).first()
        return True, seen is not None


def device_results(engine: sa.Engine, device_id: str, limit: int) -> list[dict[str, Any]]:
    """The device's own state in the newest ``limit`` instructions that targeted it (newest
    first): instruction_id, state, error, updated_at."""
    q = (sa.select(results.c.instruction_id, results.c.state, results.c.error, results.c.updated_at)
         .where(results.c.device_id == device_id).order_by(results.c.instruction_id.desc()).limit(limit))
    with engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(q)]


def instructions_with_rows(engine: sa.Engine, scope: Collection[str] | None = None) -> set[int]:
    """Ids of the instructions with a target row (of a device of ``scope``, if given)."""
    with engine.connect() as c:
        return {int(i) for i in c.execute(sa.select(results.c.instruction_id).distinct()
                                          .where(_in_scope(c, results.c.device_id, scope))).scalars()}


def held_counts(engine: sa.Engine, instruction_id: int, scope: Collection[str] | None = None) -> dict[str, int]:
    """kind -> number of held answers of one instruction (from ``scope``'s devices only)."""
    with engine.connect() as c:
        rows = c.execute(sa.select(held_responses.c.kind, sa.func.count())
                         .where(held_responses.c.instruction_id == instruction_id,
                                _in_scope(c, held_responses.c.device_id, scope))
                         .group_by(held_responses.c.kind)).all()
    return {k: int(n) for k, n in rows}


def page_held(engine: sa.Engine, instruction_id: int, kind: str, offset: int, limit: int,
              scope: Collection[str] | None = None) -> list[dict[str, Any]]:
    """Held answers of one instruction, newest first, from ``scope``'s devices only, decoded."""
    out = []
    with engine.connect() as c:
        q = (sa.select(held_responses).where(held_responses.c.instruction_id == instruction_id,
                                             held_responses.c.kind == kind,
                                             _in_scope(c, held_responses.c.device_id, scope))
             .order_by(held_responses.c.id.desc()).offset(offset).limit(limit))
        for r in c.execute(q):
            d = dict(r._mapping)
            d["response"] = msgspec.msgpack.decode(d["response"])
            out.append(d)
    return out


PURGE_CHUNK = 5000  # rows deleted per transaction
PURGE_BUDGET = 1.0  # seconds one purge call may keep deleting; the rest waits for the next call


def purge_expired(engine: sa.Engine, now: float | None = None, chunk: int = PURGE_CHUNK,
                  budget: float = PURGE_BUDGET) -> int:
    """Delete responses past their response TTL (``expires_at`` before ``now``); returns how many.

    On PostgreSQL the day partitions that ended by then are detached and dropped whole first, and
    those of the days ahead made (see :mod:`quanta.db.partitions`); what is left to delete row by
    row is in the one partition the cut-off falls in. Each transaction deletes at most ``chunk``
    rows (found through ``ix_results_expires_at``), so the write lock is released between chunks
    and ingest goes on in between; after ``budget`` seconds the call stops and the rest is purged
    by the next one. While another Core (another Response Stack on the same database) holds the
    partitions' lock, this call purges nothing and returns 0: that Core's purge does it all."""
    cutoff = time.time() if now is None else now
    total = 0
    key: tuple[sa.Column[Any], ...] = (results.c.instruction_id, results.c.device_id)
    if engine.dialect.name == "postgresql":
        dropped = partitions.drop_expired(engine, cutoff)
        if dropped is None:  # another Core (another Response Stack) is purging right now: its turn
            return 0
        total += dropped
        partitions.ensure(engine, ahead=partitions.AHEAD_DAYS)  # from the clock's today, whatever ``now``
        key += (results.c.expires_at,)  # the primary key: found in the partition, not in each one
    doomed = sa.select(*key).where(results.c.expires_at < cutoff).limit(chunk)
    stmt = results.delete().where(sa.tuple_(*key).in_(doomed))
    deadline = time.monotonic() + budget
    while True:
        with engine.begin() as c:
            n = c.execute(stmt).rowcount or 0
        total += n
        if n < chunk or time.monotonic() >= deadline:
            return total


# ------------------------------------------------------------ result rows (one per device and row)
# ``results.rows`` holds one JSON array of rows per device (``columns`` its column names). The row
# view expands it in SQL with the backend's JSON table function (SQLite ``json_each``, PostgreSQL
# ``json_array_elements WITH ORDINALITY``), LEFT JOINed so a device without rows (an error, no
# content, still pending) is one row of empty cells. A cell of a result column is picked by its
# position in the device's column layout (``CAST(columns AS TEXT)``: one CASE arm per distinct
# layout, usually one). Sorting is typed as the backend orders JSON values (SQLite: NULL, numbers,
# text; PostgreSQL jsonb: NULL last, strings < numbers < booleans); filters compare numbers as
# numbers and everything else as text. Column names and operators are checked by the caller;
# every value is a bound parameter.
RESULT_FIELDS = ("device", "status", "error")  # built-in fields; a result column of the same name is shadowed
FILTER_OPS = ("eq", "ne", "lt", "le", "gt", "ge", "contains", "startswith", "empty", "nonempty")
MAX_LAYOUTS = 64  # distinct column layouts one instruction's answers may have for sort/filter


class RowSort(NamedTuple):
    key: str  # "device" | "status" | "error" | a result column
    descending: bool = False


class RowFilter(NamedTuple):
    key: str
    op: str  # one of FILTER_OPS
    value: str = ""


class Layout(NamedTuple):
    """A column layout of answers: the stored JSON text of ``columns`` and its names."""

    text: str
    columns: list[str]


class RowQuery(NamedTuple):
    sort: Sequence[RowSort] = ()
    filters: Sequence[RowFilter] = ()
    device: str | None = None  # substring of the device id, case-insensitive
    states: Sequence[str] = ()  # any of these states


def result_layouts(engine: sa.Engine, instruction_id: int, scope: Collection[str] | None = None,
                   limit: int = MAX_LAYOUTS + 1) -> list[Layout]:
    """The distinct column layouts of an instruction's answers (of ``scope``'s devices), most
    frequent first; at most ``limit``."""
    text = sa.cast(results.c.columns, sa.Text)
    with engine.connect() as c:
        q = (sa.select(text, sa.func.count()).where(results.c.instruction_id == instruction_id,
                                                    results.c.columns.is_not(None),
                                                    _in_scope(c, results.c.device_id, scope))
             .group_by(text).order_by(sa.func.count().desc(), text).limit(limit))
        out = []
        for raw, _n in c.execute(q):
            try:
                cols = msgspec.json.decode(raw) if raw is not None else None
            except msgspec.DecodeError:
                continue
            if isinstance(cols, list) and all(isinstance(x, str) for x in cols):
                out.append(Layout(raw, cols))
        return out


def result_columns(layouts: Sequence[Layout]) -> list[str]:
    """Every column name of the layouts, in order of first appearance."""
    seen: dict[str, None] = {}
    for layout in layouts:
        for name in layout.columns:
            seen.setdefault(name, None)
    return list(seen)


class _Rows:
    """The expanded row source of one backend: FROM clause, row ordinal, row value, cell helpers."""

    def __init__(self, dialect: str) -> None:
        self.pg = dialect == "postgresql"
        if self.pg:
            arr = sa.case((sa.func.json_typeof(results.c.rows) == "array", results.c.rows), else_=None)
            self.j = sa.func.json_array_elements(arr).table_valued("value", with_ordinality="ordinality", name="j")
            self.ordinal = self.j.c.ordinality
        else:
            arr = sa.case((sa.func.json_type(results.c.rows) == "array", results.c.rows), else_=None)
            self.j = sa.func.json_each(arr).table_valued("key", "value", "type", name="j")
            self.ordinal = self.j.c.key
        self.source = results.outerjoin(self.j, sa.true())
        self.layout = sa.cast(results.c.columns, sa.Text)

    def value(self) -> sa.ColumnElement[Any]:
        if self.pg:
            return self.j.c.value
        # json_each gives an array element as JSON text, a scalar element as its SQL value
        return sa.case((self.j.c.type.in_(("array", "object")), self.j.c.value), (self.j.c.type.is_(None), None),
                       else_=sa.func.json_quote(self.j.c.value))

    def _pick(self, layouts: Sequence[Layout], name: str,
              one: Callable[[int], sa.ColumnElement[Any]]) -> sa.ColumnElement[Any]:
        arms: list[tuple[str, int]] = []
        for layout in layouts:
            if name in layout.columns:
                arms.append((layout.text, layout.columns.index(name)))
        if not arms:
            return sa.null()
        if len(layouts) == 1:
            return one(arms[0][1])
        return sa.case(*((self.layout == sa.literal(text, sa.Text), one(i)) for text, i in arms), else_=None)

    def sort_key(self, layouts: Sequence[Layout], name: str) -> sa.ColumnElement[Any]:
        if self.pg:
            return self._pick(layouts, name, lambda i: sa.cast(self.j.c.value.op("->")(sa.cast(sa.literal(i), sa.Integer)),
                                                               postgresql.JSONB))
        return self._pick(layouts, name, lambda i: sa.func.json_extract(self.j.c.value, sa.literal(f"$[{i}]")))

    def text(self, layouts: Sequence[Layout], name: str) -> sa.ColumnElement[Any]:
        if self.pg:
            return self._pick(layouts, name, lambda i: self.j.c.value.op("->>")(sa.cast(sa.literal(i), sa.Integer)))

        # one JSON parse a cell (SQLite reads true/false as 1/0 here)
        return self._pick(layouts, name, lambda i: sa.cast(sa.func.json_extract(self.j.c.value, sa.literal(f"$[{i}]")),
                                                           sa.Text))

    def number(self, layouts: Sequence[Layout], name: str) -> sa.ColumnElement[Any]:
        if self.pg:
            def one(i: int) -> sa.ColumnElement[Any]:
                idx = sa.cast(sa.literal(i), sa.Integer)
                return sa.case((sa.func.json_typeof(self.j.c.value.op("->")(idx)) == "number",
                                sa.cast(self.j.c.value.op("->>")(idx), sa.Float)), else_=None)
        else:
            # json_extract gives the SQL value: a number compares as a number, and text is never
            # equal to or less than one (greater, which :func:`_row_condition` guards)
            def one(i: int) -> sa.ColumnElement[Any]:
                return sa.func.json_extract(self.j.c.value, sa.literal(f"$[{i}]"))
        return self._pick(layouts, name, one)


def _as_number(value: str) -> float | None:
    try:
        n = float(value)
    except ValueError:
        return None
    return n if n == n and n not in (float("inf"), float("-inf")) else None


_CMP = {"eq": "__eq__", "ne": "__ne__", "lt": "__lt__", "le": "__le__", "gt": "__gt__", "ge": "__ge__"}


def _row_condition(src: _Rows, layouts: Sequence[Layout], f: RowFilter) -> sa.ColumnElement[bool]:
    fixed = {"device": results.c.device_id, "status": results.c.state, "error": results.c.error}
    text = fixed[f.key] if f.key in fixed else src.text(layouts, f.key)
    if f.op == "empty":
        return sa.or_(text.is_(None), text == "")
    if f.op == "nonempty":
        return sa.and_(text.is_not(None), text != "")
    if f.op == "contains":
        return sa.func.lower(text).contains(f.value.lower(), autoescape=True)
    if f.op == "startswith":
        return sa.func.lower(text).startswith(f.value.lower(), autoescape=True)
    n = _as_number(f.value) if f.key not in fixed else None
    if n is not None:
        cell = src.number(layouts, f.key)
        cond = getattr(cell, _CMP[f.op])(sa.literal(n, sa.Float))
        if f.op == "ne":  # a cell that is not a number is "not equal" to a number
            cond = sa.or_(cond, cell.is_(None))
        elif f.op in ("gt", "ge") and not src.pg:  # SQLite orders text after every number
            cond = sa.and_(cond, sa.func.typeof(cell).in_(("integer", "real")))
        return cond
    cond = getattr(text, _CMP[f.op])(sa.literal(f.value, sa.Text))
    if f.op == "ne":
        cond = sa.or_(cond, text.is_(None))
    return cond


def _row_where(c: sa.Connection, src: _Rows, instruction_id: int, scope: Collection[str] | None,
               layouts: Sequence[Layout], q: RowQuery) -> list[sa.ColumnElement[bool]]:
    where = [results.c.instruction_id == instruction_id, _in_scope(c, results.c.device_id, scope)]
    if q.states:
        where.append(results.c.state.in_(list(q.states)))
    if q.device:
        where.append(sa.func.lower(results.c.device_id).contains(q.device.lower(), autoescape=True))
    where += [_row_condition(src, layouts, f) for f in q.filters]
    return where


def _row_count(src: _Rows) -> sa.ColumnElement[Any]:
    """How many rows of the view one target row makes: its answer's rows, or 1 if none."""
    typ = sa.func.json_typeof(results.c.rows) if src.pg else sa.func.json_type(results.c.rows)
    n = sa.func.json_array_length(sa.case((typ == "array", results.c.rows), else_=None))
    return sa.case((n > 0, n), else_=1)


def _device_seek(c: sa.Connection, src: _Rows, where: Sequence[sa.ColumnElement[bool]], q: RowQuery,
                 offset: int) -> tuple[str | None, int, bool, int] | None:
    """For a page in device order (no sort, or by device) without conditions on cells: the device
    row ``offset`` falls in and how many of its rows come before it, from a running sum of the
    answers' lengths (cheap: no row is expanded), so a deep page costs what the first one does.
    Returns (device, rows of it to skip, descending, total rows), None when the order is another
    (then OFFSET runs over the expanded rows), or (None, 0, descending, 0) past the last row."""
    if any(f.key not in RESULT_FIELDS for f in q.filters) or (
            q.sort and (len(q.sort) != 1 or q.sort[0].key != "device")):
        return None
    desc = bool(q.sort) and q.sort[0].descending
    counts = sa.select(results.c.device_id, _row_count(src).label("n")).where(*where).subquery()
    order = counts.c.device_id.desc() if desc else counts.c.device_id
    running = sa.select(counts.c.device_id, counts.c.n, sa.func.sum(counts.c.n).over(order_by=order).label("upto"),
                        sa.func.sum(counts.c.n).over().label("total")).subquery()
    hit = c.execute(sa.select(running.c.device_id, running.c.upto - running.c.n, running.c.total)
                    .where(running.c.upto > offset).order_by(running.c.upto).limit(1)).first()
    if hit is None:
        return None, 0, desc, 0
    return hit[0], offset - int(hit[1]), desc, int(hit[2])


def _row_select(src: _Rows, layouts: Sequence[Layout], q: RowQuery) -> sa.Select[Any]:
    """The expanded rows, ordered by ``q.sort`` (NULLs last), then device and row order."""
    fixed = {"device": results.c.device_id, "status": results.c.state, "error": results.c.error}
    order: list[Any] = []
    for s in q.sort:
        key = fixed[s.key] if s.key in fixed else src.sort_key(layouts, s.key)
        order.append((key.desc() if s.descending else key.asc()).nulls_last())
    order += [results.c.device_id, src.ordinal]
    return (sa.select(results.c.device_id, results.c.state, results.c.error, results.c.columns,
                      src.value().label("row"), src.ordinal.label("idx"))
            .select_from(src.source).order_by(*order))


def _decode_row(value: Any) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        try:
            value = msgspec.json.decode(value)
        except msgspec.DecodeError:
            return [value]
    return value if isinstance(value, list) else [value]


def page_result_rows(engine: sa.Engine, instruction_id: int, offset: int, limit: int,
                     scope: Collection[str] | None = None, layouts: Sequence[Layout] = (),
                     q: RowQuery = RowQuery()) -> tuple[int, list[dict[str, Any]]]:
    """(total matching rows, one page of them): each {device_id, state, error, columns, row, index}
    (``row`` None for a device without rows). Sorted by ``q.sort`` then device and row order."""
    src = _Rows(engine.dialect.name)
    with engine.connect() as c:
        where = _row_where(c, src, instruction_id, scope, layouts, q)
        seek = _device_seek(c, src, where, q, offset)
        if seek is None or seek[0] is None:  # another order, conditions on cells, or past the last row
            if any(f.key not in RESULT_FIELDS for f in q.filters):
                total = int(c.execute(sa.select(sa.func.count()).select_from(src.source).where(*where)).scalar_one())
            else:  # no condition on a cell: add up the answers' lengths (no row expanded)
                total = int(c.execute(sa.select(sa.func.coalesce(sa.func.sum(_row_count(src)), 0))
                                      .where(*where)).scalar_one())
            rows = [] if seek is not None or offset >= total else c.execute(
                _row_select(src, layouts, q).where(*where).offset(offset).limit(limit))
        else:  # in device order: expand only the (at most ``limit``) devices from the one the offset falls in
            start, skip, desc, total = seek
            after = results.c.device_id <= start if desc else results.c.device_id >= start
            devices = (sa.select(results.c.device_id).where(*where, after)
                       .order_by(results.c.device_id.desc() if desc else results.c.device_id).limit(limit))
            rows = c.execute(_row_select(src, layouts, q).where(*where, results.c.device_id.in_(devices))
                             .offset(skip).limit(limit))
        out = [{"device_id": r.device_id, "state": r.state, "error": r.error, "columns": r.columns,
                "row": _decode_row(r.row), "index": None if r.idx is None else int(r.idx) - (1 if src.pg else 0)}
               for r in rows]
    return total, out


def iter_results(engine: sa.Engine, instruction_id: int, scope: Collection[str] | None = None,
                 batch: int = 500) -> Iterator[dict[str, Any]]:
    """Every target row of an instruction (of ``scope``'s devices), by device id, read through a
    server-side cursor ``batch`` rows at a time (constant memory whatever the size). Holds one
    connection until exhausted or closed."""
    with engine.connect() as c:
        q = (sa.select(results.c.device_id, results.c.state, results.c.columns, results.c.rows, results.c.error)
             .where(results.c.instruction_id == instruction_id, _in_scope(c, results.c.device_id, scope))
             .order_by(results.c.device_id))
        res = c.execution_options(stream_results=True, yield_per=batch).execute(q)
        try:
            for r in res:
                yield {"device_id": r.device_id, "state": r.state, "columns": r.columns, "rows": r.rows,
                       "error": r.error}
        finally:
            res.close()


def iter_result_rows(engine: sa.Engine, instruction_id: int, scope: Collection[str] | None = None,
                     layouts: Sequence[Layout] = (), q: RowQuery = RowQuery(),
                     batch: int = 1000) -> Iterator[dict[str, Any]]:
    """Every row :func:`page_result_rows` would page through, in its order, through a server-side
    cursor (the backend sorts; this process holds ``batch`` rows at a time)."""
    src = _Rows(engine.dialect.name)
    with engine.connect() as c:
        where = _row_where(c, src, instruction_id, scope, layouts, q)
        res = c.execution_options(stream_results=True, yield_per=batch).execute(
            _row_select(src, layouts, q).where(*where))
        try:
            for r in res:
                yield {"device_id": r.device_id, "state": r.state, "error": r.error, "columns": r.columns,
                       "row": _decode_row(r.row)}
        finally:
            res.close()
