"""Evaluator: runs a checked :class:`Program` against the live system."""

from __future__ import annotations

import datetime as _dt
import itertools
import math
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Literal

import psutil

from . import ast as A
from .compiler import BUILTIN_TABLES, Program, type_name
from .errors import ScaleError
from .spec import (
    MethodEnv, MethodError, MethodSpec, ParamSpec, current_platform, lookup, row_bytes, stop_message, stop_reason,
)
from .sqlfuncs import SqlFunctions

if TYPE_CHECKING:  # pragma: no cover
    from . import AgentContext, Limits

Status = Literal["success", "nocontent", "error", "notimplemented"]

def set_hard_heap_limit(max_bytes: int) -> int:
    """``PRAGMA hard_heap_limit`` (process-wide; it can only be lowered). Returns the limit in force."""
    conn = sqlite3.connect(":memory:")
    try:
        return int(conn.execute(f"PRAGMA hard_heap_limit={int(max_bytes)}").fetchone()[0])
    finally:
        conn.close()


@dataclass
class Table:
    columns: list[str]
    rows: list[list[object]]
    size: int = -1  # approximate bytes, computed lazily

    def nbytes(self) -> int:
        """Approximate memory held by the table (sampled for large tables whose size was not
        counted as they were produced)."""
        if self.size < 0:
            n = len(self.rows)
            step = max(1, n // 512)
            sample = self.rows[::step]
            per_rows = sum(row_bytes(row) for row in sample)
            self.size = table_bytes(self.columns) + (per_rows * n // len(sample) if sample else 0)
        return self.size


def table_bytes(columns: list[str]) -> int:
    """The memory of an empty table with these columns."""
    return 64 + 16 * len(columns)


@dataclass
class RunResult:
    status: Status
    columns: list[str] = field(default_factory=list)
    rows: list[list[object]] = field(default_factory=list)
    error: ScaleError | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "status": self.status,
            "columns": list(self.columns),
            "rows": [[json_value(v) for v in row] for row in self.rows],
        }
        if self.error is not None:
            out["error"] = self.error.to_json()
        return out


def json_value(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    return v


def normalize(v: object) -> object:
    """Bring a method's output value to an SQLite-storable, JSON-friendly value."""
    if v is None or isinstance(v, (str, float, bool)):
        return v
    if isinstance(v, int):
        return v if -(2**63) <= v < 2**63 else str(v)
    if isinstance(v, _dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=_dt.timezone.utc)
        return v.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(v, PurePath):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    return str(v)


class _Exit(Exception):
    def __init__(self, status: Status, table: Table | None = None, error: ScaleError | None = None) -> None:
        self.status = status
        self.table = table
        self.error = error


def _qi(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_DENIED_NAMES = {
    sqlite3.SQLITE_PRAGMA: "PRAGMA",
    sqlite3.SQLITE_ATTACH: "ATTACH",
    sqlite3.SQLITE_DETACH: "DETACH",
    sqlite3.SQLITE_INSERT: "INSERT",
    sqlite3.SQLITE_UPDATE: "UPDATE",
    sqlite3.SQLITE_DELETE: "DELETE",
    sqlite3.SQLITE_TRANSACTION: "a transaction",
    sqlite3.SQLITE_SAVEPOINT: "a savepoint",
    sqlite3.SQLITE_ALTER_TABLE: "ALTER TABLE",
    sqlite3.SQLITE_REINDEX: "REINDEX",
    sqlite3.SQLITE_ANALYZE: "ANALYZE",
    sqlite3.SQLITE_CREATE_TABLE: "CREATE TABLE",
    sqlite3.SQLITE_CREATE_TEMP_TABLE: "CREATE TABLE",
    sqlite3.SQLITE_CREATE_INDEX: "CREATE INDEX",
    sqlite3.SQLITE_CREATE_TEMP_TRIGGER: "CREATE TRIGGER",
    sqlite3.SQLITE_CREATE_TRIGGER: "CREATE TRIGGER",
    sqlite3.SQLITE_CREATE_VIEW: "CREATE VIEW",
    sqlite3.SQLITE_CREATE_TEMP_VIEW: "CREATE VIEW",
    sqlite3.SQLITE_DROP_TABLE: "DROP TABLE",
    sqlite3.SQLITE_DROP_INDEX: "DROP INDEX",
}


# The schema name under which a SELECT reads the Activity Record store (attached read-only).
ACTIVITY_SCHEMA = "activity"
ACTIVITY_DB = "inventory.db"


def activity_store_path(context: "AgentContext") -> "PurePath":
    """Where the agent keeps its Activity Record (``quanta.agent.inventory``): its data directory."""
    return context.data_dir / ACTIVITY_DB


class Evaluator:
    def __init__(
        self,
        program: Program,
        context: "AgentContext",
        limits: "Limits",
        allow_actions: bool,
        initial: dict[str, Table] | None = None,
    ) -> None:
        self.program = program
        self.context = context
        self.limits = limits
        self.allow_actions = allow_actions
        self.vars: dict[str, Table] = dict(initial or {})
        self.last: Table | None = None
        self.start = time.monotonic()
        self.deadline = self.start + limits.timeout_seconds
        self.conn: sqlite3.Connection | None = None
        self.loaded: dict[int, tuple[str, Table]] = {}
        self.builtins: dict[str, str] = {}
        self.counter = itertools.count(1)
        self.abort_reason: str | None = None  # why the progress handler stopped SQLite
        self.funcs: SqlFunctions | None = None
        self.allowed: set[str] = set()
        self.real_tables: set[str] = set()
        self.denied: str | None = None
        self.activity_attached = False
        self._proc = psutil.Process()
        self._rss0 = self._proc.memory_info().rss
        self._ticks = 0

    # limits ------------------------------------------------------------------------------
    def stop_reason(self) -> str | None:
        """"time", "cancelled" or "stopping" when the payload must stop now, else None."""
        return stop_reason(self.deadline, self.context.cancel)

    def stop_error(self, reason: str, pos: A.Pos) -> ScaleError:
        return ScaleError(stop_message(reason, self.limits.timeout_seconds), pos.line, pos.column)

    def memory_error(self, pos: A.Pos) -> ScaleError:
        return ScaleError(
            f"Memory limit of {self.limits.max_memory_bytes} bytes exceeded", pos.line, pos.column
        )

    def check_time(self, pos: A.Pos) -> None:
        """Raise when the time limit passed, the instruction was cancelled or the agent stops."""
        reason = self.stop_reason()
        if reason is not None:
            raise self.stop_error(reason, pos)

    def check_rows(self, n: int, pos: A.Pos) -> None:
        if n > self.limits.max_rows:
            raise ScaleError(f"Result exceeds the row limit of {self.limits.max_rows} rows", pos.line, pos.column)

    def held_bytes(self) -> int:
        """Memory held by the payload's tables (variables and the last result)."""
        seen: set[int] = set()
        total = 0
        for t in itertools.chain(self.vars.values(), [self.last] if self.last else []):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.nbytes()
        return total

    def check_memory(self, pos: A.Pos) -> None:
        if self.held_bytes() > self.limits.max_memory_bytes:
            raise self.memory_error(pos)

    def _sql_check(self) -> str | None:
        """For long-running SQL functions: the message to stop with, or None."""
        reason = self.stop_reason()
        if reason is None:
            return None
        self.abort_reason = reason
        return stop_message(reason, self.limits.timeout_seconds)

    def _progress(self) -> int:
        reason = self.stop_reason()
        if reason is not None:
            self.abort_reason = reason
            return 1
        self._ticks += 1
        if self._ticks % 64 == 0:
            rss = self._proc.memory_info().rss
            if rss - self._rss0 > self.limits.max_memory_bytes:
                self.abort_reason = "memory"
                return 1
        return 0

    # sqlite ------------------------------------------------------------------------------
    def _authorize(self, action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None) -> int:
        if action == sqlite3.SQLITE_READ:
            # Reads of CTEs and subqueries arrive with their own names; only real tables are
            # restricted: the statement's own @tables are allowed, every other table is not.
            name = (arg1 or "").lower()
            if arg1 in self.allowed or not (
                name in self.real_tables or name.startswith(("sqlite_", "pragma_")) or (db not in ("main", None))
            ):
                return sqlite3.SQLITE_OK
            self.denied = f"reading {arg1}"
            return sqlite3.SQLITE_DENY
        if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE):
            if action == sqlite3.SQLITE_FUNCTION and arg2 and arg2.lower() == "load_extension":
                self.denied = "load_extension"
                return sqlite3.SQLITE_DENY
            return sqlite3.SQLITE_OK
        self.denied = _DENIED_NAMES.get(action, f"operation {action}")
        return sqlite3.SQLITE_DENY

    def connection(self, pos: A.Pos) -> sqlite3.Connection:
        if self.conn is None:
            try:
                self.conn = self._connect()
            except MemoryError:  # the process's hard heap limit is reached by other payloads
                raise self.memory_error(pos) from None
            except sqlite3.Error as e:
                raise ScaleError(f"SQL error: cannot open the SQL engine: {e}", pos.line, pos.column) from None
        return self.conn

    def _connect(self) -> sqlite3.Connection:
        """A new in-memory connection with the payload's limits, functions and progress handler."""
        # a URI connection, so that the Activity Record can be attached read-only ("mode=ro")
        conn = sqlite3.connect("file::memory:", isolation_level=None, check_same_thread=False, uri=True)
        try:
            # One value (a zeroblob, a printf padding, a replace or REGEXPREPLACE result) is at most
            # `length` bytes, a quarter of the memory limit, so the value being built next to the
            # tables already held stays near the limit (the loaded tables are copies of those, and a
            # SELECT cannot create more); sorts and temporary tables stay in memory, bounded by the
            # process's hard heap limit (see limit_process_memory), instead of spilling to disk.
            length = max(1_000_000, min(self.limits.max_memory_bytes // 4, 1_000_000_000))
            conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, length)
            conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
            conn.execute("PRAGMA temp_store=MEMORY")
            self.funcs = SqlFunctions(length, self._sql_check)
            self.funcs.install(conn)
            conn.set_progress_handler(self._progress, 1000)
        except BaseException:
            conn.close()
            raise
        return conn

    def load_table(self, table: Table, label: str, pos: A.Pos) -> str:
        entry = self.loaded.get(id(table))
        if entry is not None and entry[1] is table:
            return entry[0]
        if not table.columns:
            raise ScaleError(f"Table {label} has no columns and cannot be used in a SELECT", pos.line, pos.column)
        conn = self.connection(pos)
        name = f"t{next(self.counter)}"
        cols = ", ".join(_qi(c) for c in table.columns)
        conn.execute(f"CREATE TABLE {_qi(name)} ({cols})")
        if table.rows:
            marks = ", ".join("?" * len(table.columns))
            self.abort_reason = None
            try:
                conn.executemany(f"INSERT INTO {_qi(name)} VALUES ({marks})", table.rows)
            except sqlite3.Error as e:
                raise self.sql_error(e, pos) from None
            except MemoryError:
                raise self.memory_error(pos) from None
        self.loaded[id(table)] = (name, table)
        self.real_tables.add(name)
        return name

    def load_builtin(self, name: str, pos: A.Pos) -> str:
        if name in self.builtins:
            return self.builtins[name]
        from .methods import builtins

        env = MethodEnv(self.context, self.limits, self.deadline)
        try:
            columns, rows = builtins.BUILTINS[name](env)
        except MethodError as e:
            raise ScaleError(f"{e} (in built-in table ${name})", pos.line, pos.column) from None
        sql_name = self.load_table(Table(columns, [[normalize(v) for v in r] for r in rows]), f"${name}", pos)
        self.builtins[name] = sql_name
        return sql_name

    def attach_activity(self, name: str, pos: A.Pos) -> str:
        """The SQL name of Activity Record table ``name`` in the store, attached read-only.

        The store is attached once per payload, by the evaluator itself and before the payload's
        SQL runs with the authorizer: ``mode=ro`` (SQLite refuses every write to it), the attach
        limit then equals the one database attached (no other ATTACH can succeed), and the
        authorizer allows only reads of the tables the SELECT names as ``$Name``."""
        where = f"(in built-in table ${name})"
        if not self.activity_attached:
            path = activity_store_path(self.context)
            if not _is_file(path):
                raise ScaleError(
                    f"Activity Record unavailable: this device has no store (capture is off; "
                    f"Module.Inventory.Enabled=true in agent.conf turns it on) {where}", pos.line, pos.column)
            conn = self.connection(pos)
            uri = "file:" + urllib.parse.quote(str(path)) + "?mode=ro"
            conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 1)
            try:
                conn.execute(f"ATTACH DATABASE ? AS {ACTIVITY_SCHEMA}", (uri,))
                conn.execute("PRAGMA busy_timeout=2000")
                conn.execute(f"SELECT count(*) FROM {ACTIVITY_SCHEMA}.sqlite_master").fetchone()
            except sqlite3.Error as e:
                try:
                    conn.execute(f"DETACH DATABASE {ACTIVITY_SCHEMA}")
                except sqlite3.Error:
                    pass
                conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
                raise ScaleError(f"Activity Record unavailable: {e} {where}", pos.line, pos.column) from None
            except MemoryError:
                raise self.memory_error(pos) from None
            self.activity_attached = True
        return f"{ACTIVITY_SCHEMA}.{_qi(name)}"

    def drop_unused(self) -> None:
        if self.conn is None or len(self.loaded) < 16:
            return
        live = {id(t) for t in self.vars.values()}
        for key in [k for k, (_, t) in self.loaded.items() if k not in live and t is not self.last]:
            name, _ = self.loaded.pop(key)
            if name not in self.builtins.values():
                self.conn.execute(f"DROP TABLE {_qi(name)}")
                self.real_tables.discard(name)

    def run_select(self, sel: A.Select) -> Table:
        self.check_time(sel.pos)
        sql: list[str] = []
        allowed: set[str] = set()
        for part in sel.parts:
            if isinstance(part, A.SqlCode):
                sql.append(part.text)
            elif isinstance(part, A.SqlString):
                sql.append("'" + part.value.replace("'", "''") + "'")
            elif isinstance(part, A.SqlLiteral):
                sql.append(part.sql)
            elif isinstance(part, A.SqlVar):
                table = self.vars.get(part.name)
                if table is None:
                    raise ScaleError(f"Unknown variable @{part.name}", part.pos.line, part.pos.column)
                name = self.load_table(table, f"@{part.name}", part.pos)
                allowed.add(name)
                sql.append(_qi(name))
            elif isinstance(part, A.SqlBuiltin) and part.name not in BUILTIN_TABLES:
                sql.append(self.attach_activity(part.name, part.pos))
                allowed.add(part.name)
            elif isinstance(part, A.SqlBuiltin):
                name = self.load_builtin(part.name, part.pos)
                allowed.add(name)
                sql.append(_qi(name))
            else:  # pragma: no cover - SqlParam is substituted at compile time
                raise ScaleError("Unsubstituted instruction parameter", sel.pos.line, sel.pos.column)
        text = "".join(sql)
        if "\x00" in text:
            raise ScaleError("SELECT contains a NUL character", sel.pos.line, sel.pos.column)
        conn = self.connection(sel.pos)
        assert self.funcs is not None
        self.allowed = allowed
        self.denied = None
        self.abort_reason = None
        self.funcs.error = None
        budget = self.limits.max_memory_bytes - self.held_bytes()
        if self.activity_attached:
            conn.execute("PRAGMA query_only=1")  # besides the authorizer and mode=ro: no write at all
        conn.set_authorizer(self._authorize)
        try:
            cur = conn.execute(text)
            columns = [d[0] for d in cur.description] if cur.description else []
            rows: list[list[object]] = []
            size = table_bytes(columns)
            limit = self.limits.max_rows
            for row in cur:  # one row at a time, so rows and memory are checked as they arrive
                rows.append(list(row))
                size += row_bytes(row)
                if len(rows) > limit:
                    cur.close()
                    self.check_rows(len(rows), sel.pos)
                if size > budget:
                    cur.close()
                    raise self.memory_error(sel.pos)
        except sqlite3.Error as e:
            raise self.sql_error(e, sel.pos) from None
        except MemoryError:  # SQLite's allocation failed at the process's hard heap limit
            raise self.memory_error(sel.pos) from None
        except (ValueError, OverflowError) as e:
            raise ScaleError(f"SQL error: {e}", sel.pos.line, sel.pos.column) from None
        finally:
            conn.set_authorizer(None)
            if self.activity_attached:
                conn.execute("PRAGMA query_only=0")
        return Table(_dedupe(columns), rows, size)

    def sql_error(self, e: sqlite3.Error, pos: A.Pos) -> ScaleError:
        """The ScaleError for a failed statement: the stop, limit or function failure behind it."""
        if self.abort_reason == "memory":
            return self.memory_error(pos)
        if self.abort_reason is not None:
            return self.stop_error(self.abort_reason, pos)
        if self.funcs is not None and self.funcs.error is not None:
            return ScaleError(f"SQL error: {self.funcs.error}", pos.line, pos.column)
        msg = str(e)
        if self.denied:
            msg = f"not authorized: {self.denied} is not allowed in a SELECT"
        if "too big" in msg:
            return ScaleError(f"Memory limit of {self.limits.max_memory_bytes} bytes exceeded: {msg}",
                              pos.line, pos.column)
        return ScaleError(f"SQL error: {msg}", pos.line, pos.column)

    # methods -----------------------------------------------------------------------------
    def coerce(self, p: ParamSpec, value: object, where: str, pos: A.Pos) -> object:
        ok = False
        if p.type == "string":
            ok = isinstance(value, str)
        elif p.type == "integer":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif p.type == "number":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif p.type == "boolean":
            if isinstance(value, bool):
                ok = True
            elif isinstance(value, int) and value in (0, 1):
                value, ok = bool(value), True
            elif isinstance(value, str) and value.lower() in ("true", "false"):
                value, ok = value.lower() == "true", True
        if not ok:
            raise ScaleError(
                f"Parameter '{p.name}' expects {p.type}, got {type_name(value)} {where}", pos.line, pos.column
            )
        return value

    def run_call(self, call: A.Call) -> Table:
        self.check_time(call.pos)
        spec: MethodSpec = lookup(
            call.module, call.method, call.pos.line, call.pos.column, call.method_pos.line, call.method_pos.column
        )
        where = f"(in call to {spec.full_name})"
        if spec.is_action and not self.allow_actions:
            raise ScaleError(
                f"Action method {spec.full_name} is not allowed: actions are not enabled", call.pos.line, call.pos.column
            )
        plat = current_platform()
        if plat not in spec.platforms:
            raise ScaleError(f"{spec.full_name} is not supported on this platform ({plat})", call.pos.line, call.pos.column)
        # Resolve arguments. Column references make one call per row of their table.
        fixed: dict[str, object] = {}
        per_row: dict[str, tuple[ParamSpec, list[object], A.Pos]] = {}
        for arg in call.args:
            p = spec.param(arg.name)
            assert p is not None
            v = arg.value
            if isinstance(v, A.ColumnRef):
                table = self.vars.get(v.var)
                if table is None:
                    raise ScaleError(f"Unknown variable @{v.var}", v.pos.line, v.pos.column)
                if v.column not in table.columns:
                    raise ScaleError(f"Unknown column '{v.column}' in @{v.var} {where}", v.pos.line, v.pos.column)
                idx = table.columns.index(v.column)
                per_row[p.name] = (p, [r[idx] for r in table.rows], v.pos)
            else:
                assert isinstance(v, A.Literal)
                fixed[p.name] = v.value
        for p in spec.params:
            if p.name not in fixed and p.name not in per_row:
                fixed[p.name] = p.default
        if per_row:
            lengths = {len(vals) for (_, vals, _) in per_row.values()} - {1}
            if len(lengths) > 1:
                raise ScaleError(
                    f"Column references in one call must come from tables of the same length {where}",
                    call.pos.line, call.pos.column,
                )
            n = lengths.pop() if lengths else 1
            arg_sets = []
            for i in range(n):
                args = dict(fixed)
                for name, (p, vals, pos) in per_row.items():
                    args[name] = self.coerce(p, vals[i] if len(vals) > 1 else vals[0], where, pos)
                arg_sets.append(args)
        else:
            arg_sets = [fixed]
        columns: list[str] = spec.column_names
        rows: list[list[object]] = []
        budget = self.limits.max_memory_bytes - self.held_bytes()
        size = table_bytes(columns)
        for args in arg_sets:
            self.check_time(call.pos)
            # what this call may still add, so a method that streams stops at the limit
            env = MethodEnv(self.context, self.limits, self.deadline, max_rows=self.limits.max_rows - len(rows),
                            max_bytes=budget - size)
            try:
                assert spec.impl is not None
                out = spec.impl(env, args)
            except MethodError as e:
                reason = self.stop_reason()
                if reason is not None:
                    raise self.stop_error(reason, call.pos) from None
                raise ScaleError(f"{e} {where}", call.pos.line, call.pos.column) from None
            except ScaleError:
                raise
            except Exception as e:  # a method must never take the agent down
                raise ScaleError(f"{spec.full_name} failed: {type(e).__name__}: {e}", call.pos.line, call.pos.column) from None
            if isinstance(out, tuple):
                out_cols, out_rows = list(out[0]), out[1]
            else:
                out_cols, out_rows = columns, out
            norm = [[normalize(v) for v in r] for r in out_rows]
            size += sum(row_bytes(r) for r in norm)
            if size > budget:
                raise self.memory_error(call.pos)
            if out_cols != columns:
                if rows:
                    columns, rows = _merge(columns, rows, out_cols, norm)
                else:
                    columns, rows = out_cols, norm
            else:
                rows.extend(norm)
            self.check_rows(len(rows), call.pos)
        self.check_time(call.pos)
        return Table(columns, rows, size if len(arg_sets) == 1 else -1)

    # statements --------------------------------------------------------------------------
    def produce(self, t: Table, pos: A.Pos) -> Table:
        self.check_rows(len(t.rows), pos)
        self.last = t
        self.check_memory(pos)
        return t

    def exec_block(self, stmts: list[A.Statement]) -> Table | None:
        out: Table | None = None
        for s in stmts:
            r = self.exec_stmt(s)
            if r is not None:
                out = r
        return out

    def exec_stmt(self, s: A.Statement) -> Table | None:
        if isinstance(s, A.Assign):
            v = s.value
            if isinstance(v, A.Literal):
                t: Table | None = Table(["Value"], [[v.value]])
            else:
                t = self.exec_stmt(v)  # type: ignore[arg-type]
                if t is None:
                    t = Table([], [])
            self.vars[s.target] = t
            self.drop_unused()
            return self.produce(t, s.pos)
        if isinstance(s, A.Call):
            return self.produce(self.run_call(s), s.pos)
        if isinstance(s, A.Select):
            return self.produce(self.run_select(s), s.pos)
        if isinstance(s, A.Foreach):
            return self.exec_foreach(s)
        if isinstance(s, A.If):
            table = self.vars.get(s.var)
            if table is None:
                raise ScaleError(f"Unknown variable @{s.var}", s.var_pos.line, s.var_pos.column)
            cond = bool(table.rows) != s.negate
            if cond:
                return self.exec_block(s.then)
            if s.otherwise is not None:
                return self.exec_block(s.otherwise)
            return None
        if isinstance(s, A.Evaluate):
            if self.last is None or not self.last.rows:
                raise _Exit("nocontent", self.last)
            return None
        if isinstance(s, A.Exit):
            if s.kind == "NOCONTENT":
                raise _Exit("nocontent")
            if s.kind == "ERROR":
                raise _Exit("error", error=ScaleError(s.message or "Error", s.pos.line, s.pos.column))
            if s.kind == "NOTIMPLEMENTED":
                raise _Exit(
                    "notimplemented", error=ScaleError(s.message or "Not implemented", s.pos.line, s.pos.column)
                )
            table = self.last
            if s.var is not None:
                table = self.vars.get(s.var)
                if table is None:
                    assert s.var_pos is not None
                    raise ScaleError(f"Unknown variable @{s.var}", s.var_pos.line, s.var_pos.column)
            raise _Exit("success", table)
        raise TypeError(s)  # pragma: no cover

    def exec_foreach(self, s: A.Foreach) -> Table:
        source = self.vars.get(s.table_var)
        if source is None:
            raise ScaleError(f"Unknown variable @{s.table_var}", s.table_pos.line, s.table_pos.column)
        columns: list[str] = []
        rows: list[list[object]] = []
        for row in list(source.rows):
            self.check_time(s.pos)
            self.vars[s.row_var] = Table(list(source.columns), [list(row)])
            out = self.exec_block(s.body)
            if out is not None:
                if out.columns != columns:
                    columns, rows = _merge(columns, rows, out.columns, out.rows)
                else:
                    rows.extend(out.rows)
                self.check_rows(len(rows), s.pos)
        return self.produce(Table(columns, rows), s.pos)

    def run(self) -> RunResult:
        try:
            if self.program.is_action and not self.allow_actions:
                a = self.program.actions[0]
                raise ScaleError(
                    f"Action method {a.method} is not allowed: actions are not enabled", a.line, a.column
                )
            self.exec_block(self.program.script.statements)
            result = self.last
            status: Status = "success" if result is not None and result.rows else "nocontent"
        except _Exit as e:
            if e.status in ("error", "notimplemented"):
                return RunResult(e.status, [], [], e.error)
            result = e.table if e.status == "success" else None
            if e.status == "nocontent":
                return RunResult("nocontent", list(e.table.columns) if e.table else [], [])
            status = "success" if result is not None and result.rows else "nocontent"
        except ScaleError as e:
            return RunResult("error", [], [], e)
        except RecursionError:
            return RunResult("error", [], [], ScaleError("Payload nested too deeply", 1, 1))
        except MemoryError:
            return RunResult("error", [], [], ScaleError(f"Memory limit of {self.limits.max_memory_bytes} bytes exceeded", 1, 1))
        finally:
            if self.conn is not None:
                self.conn.close()
                self.conn = None
        if result is None:
            return RunResult(status, [], [])
        return RunResult(status, list(result.columns), [list(r) for r in result.rows])


def _is_file(path: "PurePath") -> bool:
    import os

    try:
        return os.path.isfile(path)
    except (OSError, ValueError):
        return False


def _dedupe(columns: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for c in columns:
        key = c.lower()
        if key in seen:
            seen[key] += 1
            name = f"{c}_{seen[key]}"
            while name.lower() in seen:
                seen[key] += 1
                name = f"{c}_{seen[key]}"
            seen[name.lower()] = 0
            out.append(name)
        else:
            seen[key] = 0
            out.append(c)
    return out


def _union(a: list[str], b: list[str]) -> list[str]:
    return a + [c for c in b if c not in a]


def _reshape(cols: list[str], rows: list[list[object]], target: list[str]) -> list[list[object]]:
    idx = [cols.index(c) if c in cols else -1 for c in target]
    return [[r[i] if i >= 0 else None for i in idx] for r in rows]


def _merge(cols_a: list[str], rows_a: list[list[object]], cols_b: list[str], rows_b: list[list[object]]):
    cols = _union(cols_a, cols_b)
    return cols, _reshape(cols_a, rows_a, cols) + _reshape(cols_b, rows_b, cols)
