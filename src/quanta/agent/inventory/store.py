"""The Activity Record's store: one SQLite database, written by one thread in batches.

Capture threads hand rows to :meth:`Store.put` (and row updates to :meth:`Store.update`), which
never block: past ``queue_rows`` waiting rows a row is dropped and counted in ``stats``. The
writer thread writes what waits in one transaction at least every ``flush_seconds`` (or at once
when ``batch_rows`` wait), in WAL mode: a committed batch survives a kill -9 of the agent, so a
crash loses at most the batch being collected, and SQLite's journal keeps the file consistent.

The writer also runs the maintenance on the store's clock: aggregation of complete periods from
live to hourly, hourly to daily and daily to monthly (from where the last run stopped, so a
device that was off catches up), retention per table (age and rows) and the total size cap
(oldest rows first, whatever their table).

When the database cannot be written (disk full, locked by another program, an I/O error) the
batch is dropped and counted, and the next batch tries again; when it is corrupt (it does not
pass ``quick_check`` on opening, or a write reports it malformed), it is moved aside as
``inventory.db.corrupt-<time>`` and a new store is started, so capture goes on.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quanta.scale.tables import (GRANULARITIES, SOURCE_BY_NAME, SOURCES, aggregate_sql, ddl, missing_columns_sql,
                                 period_start, table_names)
from .settings import InventorySettings

log = logging.getLogger("quanta.agent.inventory")

DB_NAME = "inventory.db"
_UPDATES = {
    # the process's exit: every row of this pid recorded since it started (an exec replaces the
    # image of a running process, so one process may have several rows)
    "process_exit": 'UPDATE "Process_Live" SET "ExitTs" = ? WHERE "ProcessId" = ? AND "ExitTs" IS NULL AND "TS" >= ?',
    "tcp_seen": 'UPDATE "TCP_Live" SET "LastSeenTs" = ? WHERE rowid = (SELECT max(rowid) FROM "TCP_Live" WHERE '
                '"LocalPort" = ? AND "Port" = ? AND "LocalAddress" = ? AND "IpAddress" = ?)',
}
def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """A store made by an earlier version gets the columns declared since (NULL in its old rows)
    and the declared casing of their names (``TS``)."""
    existing = {t: [r[1] for r in conn.execute(f'PRAGMA table_info("{t}")')] for t in table_names()}
    existing = {t: cols for t, cols in existing.items() if cols}
    for stmt in missing_columns_sql(existing):
        conn.execute(stmt)


_INSERTS = {
    s.table("Live"): (tuple(c.name for c in s.live),
                      f'INSERT INTO "{s.table("Live")}" ({", ".join(chr(34) + c.name + chr(34) for c in s.live)}) '
                      f'VALUES ({", ".join("?" * len(s.live))})')
    for s in SOURCES
}


@dataclass
class StoreStats:
    queued: int = 0
    written: int = 0  # rows and updates committed
    dropped_full_queue: int = 0  # refused by put/update: the writer is behind
    dropped_write_failed: int = 0  # in a batch that could not be written
    batches: int = 0
    trimmed_for_size: int = 0  # rows deleted by the size cap
    errors: list[str] = field(default_factory=list)  # the last few write errors

    def error(self, text: str) -> None:
        self.errors.append(text)
        del self.errors[:-10]


def secure_file(path: Path) -> None:
    """Create ``path`` if missing (never through a symlink) and make it 0600."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class Store:
    def __init__(self, path: Path, settings: InventorySettings, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.settings = settings
        self.clock = clock
        self.stats = StoreStats()
        self._cond = threading.Condition()
        self._items: deque[tuple[str, str, Any]] = deque()
        self._controls: deque[tuple[Callable[[sqlite3.Connection], Any], Future[Any]]] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._next_maintenance = 0.0
        self._reported = (0, 0)

    # ------------------------------------------------------------------ producers (any thread)
    def put(self, table: str, row: dict[str, Any]) -> bool:
        """Queue a live row (column name -> value); False when it was dropped (queue full)."""
        return self._queue(("insert", table, row))

    def update(self, name: str, params: tuple[Any, ...]) -> bool:
        return self._queue(("update", name, params))

    def _queue(self, item: tuple[str, str, Any]) -> bool:
        with self._cond:
            if len(self._items) >= self.settings.queue_rows or self._stopping:
                self.stats.dropped_full_queue += 1
                return False
            self._items.append(item)
            self.stats.queued += 1
            if len(self._items) >= self.settings.batch_rows:
                self._cond.notify()
        return True

    def call(self, fn: Callable[[sqlite3.Connection], Any], timeout: float = 30.0) -> Any:
        """Run ``fn(connection)`` on the writer thread after the rows queued so far are written."""
        fut: Future[Any] = Future()
        with self._cond:
            self._controls.append((fn, fut))
            self._cond.notify()
        return fut.result(timeout)

    def flush(self, timeout: float = 30.0) -> None:
        """Return when every row queued before the call is committed (or dropped)."""
        self.call(lambda conn: None, timeout)

    def maintain(self, now: float | None = None, timeout: float = 60.0) -> None:
        """Aggregate, apply retention and the size cap now (``now`` defaults to the clock)."""
        self.call(lambda conn: self._maintain(conn, self.clock() if now is None else now), timeout)

    def reconfigure(self, settings: InventorySettings) -> None:
        """New settings, in force from now: batching at once, the next maintenance (retention, size
        cap) within the new interval."""
        with self._cond:
            self.settings = settings
            self._next_maintenance = min(self._next_maintenance, self.clock() + settings.maintenance_seconds)
            self._cond.notify()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="quanta-inventory-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the writer thread
    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # noqa: BLE001 - the writer must not take the agent down
            log.exception("activity record writer stopped")
        finally:
            if self._conn is not None:
                try:
                    self._conn.close()
                except sqlite3.Error:
                    pass
                self._conn = None
            with self._cond:
                for _, fut in self._controls:
                    fut.set_exception(RuntimeError("the activity record writer stopped"))
                self._controls.clear()

    def _loop(self) -> None:
        self._next_maintenance = self.clock() + min(5.0, self.settings.maintenance_seconds)
        flushed = time.monotonic()
        while True:
            with self._cond:
                while not (self._stopping or self._controls or len(self._items) >= self.settings.batch_rows):
                    left = flushed + self.settings.flush_seconds - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                items = list(self._items)
                self._items.clear()
                controls = list(self._controls)
                self._controls.clear()
                stopping = self._stopping
            if items:
                self._write(items)
            flushed = time.monotonic()
            for fn, fut in controls:
                try:
                    fut.set_result(fn(self._connection()))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
            if stopping:
                return
            if self.clock() >= self._next_maintenance:
                self._next_maintenance = self.clock() + self.settings.maintenance_seconds
                try:
                    self._maintain(self._connection(), self.clock())
                except (sqlite3.Error, MemoryError, OSError) as e:
                    self._failed(e, "maintenance")
                self._report_drops()

    def _report_drops(self) -> None:
        """Log the rows lost since the last report (a full queue, failed writes), once per maintenance."""
        st = self.stats
        now = (st.dropped_full_queue, st.dropped_write_failed)
        if now != self._reported:
            log.warning("activity record: %d rows dropped because the writer was behind and %d in batches that "
                        "could not be written, since the last report", now[0] - self._reported[0],
                        now[1] - self._reported[1])
            self._reported = now

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        secure_file(self.path)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        try:
            conn.execute("PRAGMA auto_vacuum=FULL")  # takes effect on a new database only
            ok = conn.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {ok}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a crash of the process
            conn.execute("PRAGMA cache_size=-2048")
            conn.execute("PRAGMA wal_autocheckpoint=256")  # a WAL of about 1 MiB, reused
            conn.execute("PRAGMA journal_size_limit=1048576")
            for stmt in ddl():
                conn.execute(stmt)
            _add_missing_columns(conn)
            conn.execute('CREATE TABLE IF NOT EXISTS "_Meta" (key TEXT PRIMARY KEY, value INTEGER)')
        except sqlite3.DatabaseError as e:
            conn.close()
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                raise
            self._set_aside(e)
            return self._open_fresh()
        for suffix in ("-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                os.chmod(p, 0o600)
        self._reserve()
        return conn

    def _open_fresh(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        secure_file(self.path)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        conn.execute("PRAGMA auto_vacuum=FULL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint=256")
        conn.execute("PRAGMA journal_size_limit=1048576")
        for stmt in ddl():
            conn.execute(stmt)
        conn.execute('CREATE TABLE IF NOT EXISTS "_Meta" (key TEXT PRIMARY KEY, value INTEGER)')
        return conn

    def _set_aside(self, err: Exception) -> None:
        aside = Path(f"{self.path}.corrupt-{int(time.time())}")
        log.error("activity record store %s is unusable (%s): moved to %s, starting a new one", self.path, err, aside)
        self.stats.error(f"store corrupt, moved aside: {err}")
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                os.replace(p, str(aside) + suffix)

    def _write(self, items: list[tuple[str, str, Any]]) -> None:
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                i = 0
                while i < len(items):
                    kind, name, payload = items[i]
                    if kind == "insert":
                        j = i
                        while j < len(items) and items[j][0] == "insert" and items[j][1] == name:
                            j += 1
                        cols, sql = _INSERTS[name]
                        conn.executemany(sql, [tuple(_value(it[2].get(c)) for c in cols) for it in items[i:j]])
                        i = j
                    else:
                        conn.execute(_UPDATES[name], payload)
                        i += 1
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except (sqlite3.Error, MemoryError, OSError, ValueError, KeyError) as e:
            self.stats.dropped_write_failed += len(items)
            self._failed(e, f"batch of {len(items)}")
            return
        self.stats.written += len(items)
        self.stats.batches += 1
        try:
            self._enforce_size(conn)
        except (sqlite3.Error, MemoryError, OSError) as e:
            self._failed(e, "size cap")

    def _failed(self, e: BaseException, what: str) -> None:
        text = f"{what}: {type(e).__name__}: {e}"
        self.stats.error(text)
        log.warning("activity record store: %s", text)
        if isinstance(e, sqlite3.DatabaseError) and ("malformed" in str(e) or "not a database" in str(e)):
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._set_aside(e)
        elif isinstance(e, sqlite3.OperationalError) and "full" in str(e) and self._conn is not None:
            self._make_room(self._conn)

    @property
    def reserve_path(self) -> Path:
        return Path(f"{self.path}.reserve")

    def _reserve(self) -> None:
        """Hold a little disk space in reserve (``inventory.db.reserve``, a 50th of the size cap
        between 64 KiB and 4 MiB): on a full disk, deleting rows needs room in the WAL."""
        size = max(64 * 1024, min(4 * 1024 * 1024, self.settings.max_size_bytes // 50))
        p = self.reserve_path
        try:
            if p.exists() and p.stat().st_size >= size:
                return
            secure_file(p)
            with open(p, "r+b") as f:
                f.write(b"\x00" * size)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            p.unlink(missing_ok=True)  # no room for it now: the next maintenance tries again

    def _make_room(self, conn: sqlite3.Connection) -> None:
        """The disk is full: release the reserve, give the WAL's space back, delete the oldest
        fifth of the rows (the size cap's trimming, whatever the cap), so the next batch fits."""
        try:
            self.reserve_path.unlink(missing_ok=True)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            self._trim_oldest(conn, self.used_bytes(conn) * 8 // 10)
            log.warning("activity record store: disk full, the oldest rows were deleted to make room")
        except (sqlite3.Error, MemoryError, OSError) as err:
            self.stats.error(f"making room on a full disk: {err}")
        self._reserve()

    # ------------------------------------------------------------------ maintenance
    def _maintain(self, conn: sqlite3.Connection, now: float) -> None:
        self._reserve()
        self.aggregate(conn, int(now))
        self.apply_retention(conn, int(now))
        self._enforce_size(conn)

    def aggregate(self, conn: sqlite3.Connection, now: int) -> None:
        """Aggregate every complete period (ended ``aggregation_grace_seconds`` before ``now``)
        not aggregated yet, from live to hourly, hourly to daily, daily to monthly."""
        horizon = now - int(self.settings.aggregation_grace_seconds)
        for g in GRANULARITIES[1:]:
            finer = {"Hourly": "Live", "Daily": "Hourly", "Monthly": "Daily"}[g]
            until = period_start(g, horizon)
            for src in SOURCES:
                key = f"aggregated:{src.table(g)}"
                row = conn.execute('SELECT value FROM "_Meta" WHERE key = ?', (key,)).fetchone()
                start = row[0] if row else None
                if start is None:
                    first = conn.execute(f'SELECT min("TS") FROM "{src.table(finer)}"').fetchone()[0]
                    if first is None:
                        continue
                    start = period_start(g, int(first))
                if start >= until:
                    continue
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.execute(aggregate_sql(src, g), (start, until))
                    conn.execute('INSERT OR REPLACE INTO "_Meta" (key, value) VALUES (?, ?)', (key, until))
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise

    def apply_retention(self, conn: sqlite3.Connection, now: int) -> None:
        for src in SOURCES:
            retention = self.settings.source(src.name).retention if src.name in self.settings.sources else src.retention
            for g in GRANULARITIES:
                days, rows = retention.get(g, src.retention[g])
                t = src.table(g)
                conn.execute(f'DELETE FROM "{t}" WHERE "TS" < ?', (now - int(days * 86400),))
                n = conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]
                if n > rows:
                    conn.execute(f'DELETE FROM "{t}" WHERE rowid IN (SELECT rowid FROM "{t}" ORDER BY "TS", rowid '
                                 f'LIMIT ?)', (n - rows,))

    @staticmethod
    def used_bytes(conn: sqlite3.Connection) -> int:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        return (pages - free) * size

    def _enforce_size(self, conn: sqlite3.Connection) -> None:
        cap = self.settings.max_size_bytes
        if self.used_bytes(conn) > cap:
            self._trim_oldest(conn, cap * 9 // 10)

    def _trim_oldest(self, conn: sqlite3.Connection, target: int) -> None:
        """Delete the oldest rows of the whole store, in chunks, until it uses ``target`` bytes."""
        for _ in range(200):
            if self.used_bytes(conn) <= target:
                break
            oldest: tuple[int, str] | None = None
            for src in SOURCES:
                for g in GRANULARITIES:
                    t = src.table(g)
                    ts = conn.execute(f'SELECT min("TS") FROM "{t}"').fetchone()[0]
                    if ts is not None and (oldest is None or ts < oldest[0]):
                        oldest = (ts, t)
            if oldest is None:
                break
            t = oldest[1]
            n = conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]
            chunk = max(100, n // 20)
            cur = conn.execute(f'DELETE FROM "{t}" WHERE rowid IN (SELECT rowid FROM "{t}" ORDER BY "TS", rowid '
                               f'LIMIT ?)', (chunk,))
            self.stats.trimmed_for_size += max(cur.rowcount, 0)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # the file shrinks now (unless read)


def _value(v: Any) -> Any:
    if v is None or isinstance(v, (int, float, str)):
        if isinstance(v, str):
            if "\x00" in v:
                v = v.replace("\x00", " ")
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates (psutil's undecodable bytes): SQLite refuses them
                v = v.encode("utf-8", "replace").decode("utf-8")
            return v
        if isinstance(v, int) and not -(2**63) <= v < 2**63:
            return str(v)
        return v
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def source_names() -> list[str]:
    return list(SOURCE_BY_NAME)
