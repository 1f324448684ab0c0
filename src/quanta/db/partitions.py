"""Time partitions of the Responses ``results`` table on PostgreSQL (SQLite has one plain table).

On PostgreSQL ``results`` is declaratively partitioned ``BY RANGE (expires_at)`` (migration
responses_0004): one partition a UTC day of expiry, ``results_d<days since 1970-01-01>`` holding
``[day * 86400, (day + 1) * 86400)``, plus two that always exist: ``results_past`` (before 1970:
a careless clock) and ``results_never`` (from :data:`NEVER_FROM`: answers that never expire,
stored with ``expires_at = +Infinity``, which is also where ``None`` and NaN go).

The response-TTL purge deletes by expiry, so a day whose end has passed holds nothing but
expired rows: it is detached (``DETACH PARTITION ... CONCURRENTLY``, which never blocks readers
or writers) and dropped whole; only the day the cut-off falls in is purged row by row.

Partitions are made ahead (the days from yesterday to :data:`AHEAD_DAYS` on, by the purge loop)
and on demand (the day of an instruction's expiry, before its targets are written). Each is
created outside the partitioned table, with its indexes named after the parent's
(``ix_results_state_d<day>``...), then ``ATTACH``-ed, which takes only a SHARE UPDATE EXCLUSIVE
lock on ``results``: reads and writes go on meanwhile. Concurrent Cores are serialised by an
advisory lock, and every step checks what already exists, so creating twice is a no-op.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import sqlalchemy as sa

DAY = 86400
NEVER_FROM = 1e15  # seconds (~31 million years): anything from here on is kept for ever
AHEAD_DAYS = 8  # the default response TTL is 7 days
LOCK_KEY = 0x51_75_61_6E_74_61_01  # pg advisory lock: partition DDL on the Responses database
DETACH_TIMEOUT = "2s"  # a DETACH waits at most this for older readers; the next purge finishes it
LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock_timeout
PAST, NEVER = "results_past", "results_never"
_PREFIX = "results_d"


def stored_expiry(expires_at: float | None) -> float:
    """The ``expires_at`` stored for an answer: None ("never") and NaN become +Infinity."""
    if expires_at is None or expires_at != expires_at:
        return math.inf
    return float(expires_at)


def day_of(expires_at: float) -> int | None:
    """The day partition ``expires_at`` falls in; None for ``results_past`` / ``results_never``."""
    if expires_at < 0:
        return None
    if expires_at >= NEVER_FROM:
        return None
    return int(expires_at // DAY)


def name(day: int) -> str:
    return f"{_PREFIX}{day}"


def partition_of(expires_at: float) -> str:
    """The name of the partition a row stored with ``expires_at`` lands in."""
    day = day_of(expires_at)
    if day is not None:
        return name(day)
    return PAST if expires_at < 0 else NEVER


ANALYZE_FROM = 1000  # target rows written at once from which a partition's statistics are checked


def analyze_if_unknown(c: sa.Connection, expires_at: float, written: int) -> bool:
    """ANALYZE the partition of ``expires_at`` when its statistics know fewer rows than were just
    written to it (a new day's partition, or a fresh database, before autovacuum has seen it).

    Without them the planner takes the new partition for a few rows and joins each batch of
    answers to it the wrong way round (the partition read once for every staged answer: 19 s a
    batch of 2,000 in 50,000 targets). Within the writing transaction, which ANALYZE sees; it
    runs at most once per partition and day in practice, since afterwards the statistics hold at
    least this many rows. Returns whether it ran. The name is made here from a number."""
    if written < ANALYZE_FROM:
        return False
    table = partition_of(expires_at)
    known = c.exec_driver_sql("SELECT reltuples FROM pg_class WHERE relname = %(n)s AND relkind = 'r'",
                              {"n": table}).scalar()
    if known is None or known >= written:  # None: no such partition (an unpartitioned table)
        return False
    c.exec_driver_sql(f'ANALYZE "{table}"')
    return True


def _day_from(relname: str) -> int | None:
    rest = relname[len(_PREFIX):]
    return int(rest) if relname.startswith(_PREFIX) and rest.isdigit() else None


def is_partitioned(c: sa.Connection) -> bool:
    return c.dialect.name == "postgresql" and c.exec_driver_sql(
        "SELECT relkind FROM pg_class WHERE oid = to_regclass('results')").scalar() == "p"


def _partitions(c: sa.Connection) -> dict[str, bool]:
    """name -> detach pending, of every partition of ``results``."""
    return {r[0]: bool(r[1]) for r in c.exec_driver_sql(
        "SELECT k.relname, i.inhdetachpending FROM pg_inherits i JOIN pg_class k ON k.oid = i.inhrelid "
        "WHERE i.inhparent = to_regclass('results')")}


def holding(c: sa.Connection, instruction_ids: Iterable[int]) -> str | None:
    """A condition on ``results.expires_at`` naming the partitions that hold rows of these
    instructions (one index probe a partition), for a statement to be planned on those alone;
    None if none does. Call inside a transaction. Bounds are made here from integers, never from
    input; a partition this module did not name (attached by hand) makes it ``TRUE``: all."""
    names = [n for n, pending in _partitions(c).items() if not pending]
    if not names:
        return None
    if any(n not in (PAST, NEVER) and _day_from(n) is None for n in names):
        return "TRUE"
    probe = " UNION ALL ".join(f"SELECT '{n}' WHERE EXISTS (SELECT 1 FROM \"{n}\" WHERE instruction_id = ANY(%(i)s))"
                               for n in names)
    # by the index, never a scan: a partition without these instructions would be read whole
    c.exec_driver_sql("SET LOCAL enable_seqscan = off")
    found = list(c.exec_driver_sql(probe, {"i": sorted(set(instruction_ids))}).scalars())
    c.exec_driver_sql("SET LOCAL enable_seqscan TO DEFAULT")
    ranges = []
    for n in found:
        day = _day_from(n)
        if n == PAST:
            ranges.append("results.expires_at < 0")
        elif n == NEVER:
            ranges.append(f"results.expires_at >= {NEVER_FROM:.0f}")
        elif day is not None:
            ranges.append(f"(results.expires_at >= {day * DAY} AND results.expires_at < {(day + 1) * DAY})")
    return "(" + " OR ".join(ranges) + ")" if ranges else None


def _create(c: sa.Connection, table: str, bounds: str, suffix: str) -> None:
    """Create ``table`` beside ``results`` (same columns, key and indexes) and attach it with
    ``bounds``. Names and bounds are made here from integers, never from input."""
    c.exec_driver_sql(f'CREATE TABLE IF NOT EXISTS "{table}" (LIKE results INCLUDING DEFAULTS)')
    c.exec_driver_sql(f'ALTER TABLE "{table}" ADD CONSTRAINT "{table}_pkey" '
                      "PRIMARY KEY (instruction_id, device_id, expires_at)")
    c.exec_driver_sql(f'CREATE INDEX "ix_results_state_{suffix}" ON "{table}" (instruction_id, state)')
    c.exec_driver_sql(f'CREATE INDEX "ix_results_expires_at_{suffix}" ON "{table}" (expires_at)')
    c.exec_driver_sql(f'CREATE INDEX "ix_results_device_{suffix}" ON "{table}" (device_id, instruction_id)')
    c.exec_driver_sql(f'ALTER TABLE results ATTACH PARTITION "{table}" FOR VALUES {bounds}')


def _wanted(days: Iterable[int]) -> dict[str, tuple[str, str]]:
    out = {PAST: ("FROM (MINVALUE) TO ('0')", "past"), NEVER: (f"FROM ('{NEVER_FROM:.0f}') TO (MAXVALUE)", "never")}
    for d in days:
        out[name(d)] = (f"FROM ('{d * DAY}') TO ('{(d + 1) * DAY}')", f"d{d}")
    return out


def ensure(engine_or_conn: sa.Engine | sa.Connection, expiries: Iterable[float | None] = (),
           now: float | None = None, ahead: int | None = None) -> list[str]:
    """Make sure the partitions for these expiries exist (and, with ``ahead``, those for the days
    from yesterday to ``ahead`` days after ``now``). Returns the names created. No-op off PostgreSQL.

    Given a Connection, runs in its transaction (the migration); given an Engine, in its own."""
    days = {d for d in (day_of(stored_expiry(x)) for x in expiries) if d is not None}
    if ahead is not None:
        today = int((time.time() if now is None else now) // DAY)
        days.update(d for d in range(today - 1, today + ahead + 1) if d >= 0)
    if isinstance(engine_or_conn, sa.Connection):
        return _ensure(engine_or_conn, days)
    if engine_or_conn.dialect.name != "postgresql":
        return []
    with engine_or_conn.connect() as c:
        if not set(_wanted(days)) - set(_partitions(c)):
            return []  # the usual case: made ahead, nothing to lock
        c.rollback()
        with c.begin():
            return _ensure(c, days)


def _ensure(c: sa.Connection, days: set[int]) -> list[str]:
    if c.dialect.name != "postgresql":
        return []
    c.exec_driver_sql(f"SELECT pg_advisory_xact_lock({LOCK_KEY})")  # another Core may be at it
    have = _partitions(c)
    made = []
    for table, (bounds, suffix) in sorted(_wanted(days).items()):
        if table not in have:
            _create(c, table, bounds, suffix)
            made.append(table)
    return made


def drop_expired(engine: sa.Engine, cutoff: float) -> int | None:
    """Detach and drop every day partition that ends at or before ``cutoff`` (all its rows are
    expired); returns how many rows they held. Another Core doing it meanwhile (several Response
    Stacks share the database): this one skips and returns None, and must not purge row by row
    either, or it would delete, one row at a time, the rows of the partitions being dropped (and
    both would count them).

    ``DETACH ... CONCURRENTLY`` waits for transactions that may still read the partition (at most
    :data:`DETACH_TIMEOUT`); if it is interrupted the partition stays "detach pending" and the next
    call finalises it."""
    if engine.dialect.name != "postgresql":
        return 0
    dropped = 0
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        if not c.exec_driver_sql(f"SELECT pg_try_advisory_lock({LOCK_KEY})").scalar():
            return None
        try:
            c.exec_driver_sql(f"SET lock_timeout = '{DETACH_TIMEOUT}'")
            for table, pending in sorted(_partitions(c).items()):
                day = _day_from(table)
                if day is None or (day + 1) * DAY > cutoff:
                    continue
                n = int(c.exec_driver_sql(f'SELECT count(*) FROM "{table}"').scalar_one())
                try:
                    c.exec_driver_sql(f'ALTER TABLE results DETACH PARTITION "{table}" '
                                      + ("FINALIZE" if pending else "CONCURRENTLY"))
                except sa.exc.OperationalError as e:
                    if getattr(e.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                        raise
                    continue  # readers still on it after DETACH_TIMEOUT: the next purge finishes it
                c.exec_driver_sql(f'DROP TABLE "{table}"')
                dropped += n
        finally:
            c.exec_driver_sql("RESET lock_timeout")
            c.exec_driver_sql(f"SELECT pg_advisory_unlock({LOCK_KEY})")
    return dropped
