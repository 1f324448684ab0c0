"""``quanta scale check``'s look at the columns: a ``SELECT`` that reads only Activity Record
tables (``$Process_Live`` ...) and no ``@table`` is prepared against empty tables of the declared
columns (:mod:`quanta.scale.tables`), so a misspelt column is reported before the payload is
sent; an instruction parameter not bound (``%Days%``, as in a pack's definition) stands for NULL. A ``SELECT`` that also reads ``@tables`` is not checked here (their columns are known only
when it runs)."""

from __future__ import annotations

import sqlite3

from . import ast as A
from .compiler import BUILTIN_TABLES, Program
from .errors import ScaleError
from .tables import ddl, lookup_table


def _selects(stmts: list[A.Statement]) -> list[A.Select]:
    out: list[A.Select] = []
    for s in stmts:
        if isinstance(s, A.Select):
            out.append(s)
        elif isinstance(s, A.Assign) and isinstance(s.value, (A.Select, A.Foreach)):
            out += _selects([s.value])  # type: ignore[list-item]
        elif isinstance(s, A.Foreach):
            out += _selects(s.body)
        elif isinstance(s, A.If):
            out += _selects(s.then) + _selects(s.otherwise or [])
    return out


def check_activity_columns(program: Program) -> None:
    """Raise :class:`ScaleError` (at the SELECT's position) when a SELECT over Activity Record
    tables names a column or table SQLite cannot find."""
    conn: sqlite3.Connection | None = None
    try:
        for sel in _selects(program.script.statements):
            if any(isinstance(p, A.SqlVar) for p in sel.parts):
                continue
            builtins = [p for p in sel.parts if isinstance(p, A.SqlBuiltin)]
            if not builtins or any(p.name in BUILTIN_TABLES or lookup_table(p.name) is None for p in builtins):
                continue
            if conn is None:
                conn = sqlite3.connect(":memory:")
                for stmt in ddl():
                    conn.execute(stmt)
            sql = []
            for p in sel.parts:
                if isinstance(p, A.SqlCode):
                    sql.append(p.text)
                elif isinstance(p, A.SqlString):
                    sql.append("'" + p.value.replace("'", "''") + "'")
                elif isinstance(p, A.SqlLiteral):
                    sql.append(p.sql)
                elif isinstance(p, A.SqlParam):  # an instruction parameter not bound here: any value will do
                    sql.append("NULL")
                elif isinstance(p, A.SqlBuiltin):
                    sql.append('"' + p.name + '"')
            try:
                conn.execute("EXPLAIN " + "".join(sql))
            except sqlite3.Error as e:
                msg = str(e)
                if "no such column" in msg or "no such table" in msg or "syntax error" in msg:
                    raise ScaleError(f"SQL error: {msg}", sel.pos.line, sel.pos.column) from None
    finally:
        if conn is not None:
            conn.close()
