"""SCALE module Storage: the model's user-defined persistent storage tables.

An instruction saves a table (``Storage.Set(Name: "X", Value: @t)``, optionally appending) and a
later one loads it back (``Storage.Get``), checks for it (``Storage.Check``) or deletes it
(``Storage.Delete``), as in the model. Quanta keeps them in their own SQLite file,
``storage.db`` in the agent's state directory (mode 0600), apart from the Activity Record and out of
reach of ``SELECT``: a payload reads a stored table only through ``Storage.Get``. Writing (``Set``,
``Delete``) is an action, so it needs the approval any action needs.

Owner: a table belongs to the *owner* of the instruction that made it, recorded with the table
when it is created, and only that owner reads, writes, checks, lists or deletes it (each owner has
its own names: another owner's table of the same name is a different table, and cannot be seen).
The owner is not taken from anything a pack chooses, such as its definitions' names: the server
signs it into the instruction's body (``InstructionBody.owner``, see
:func:`quanta.instructions.storage_owner`) from the identity it verified when the pack was
imported: ``pack:<pack name>@<fingerprint of the publisher's key>``. A pack that names its
definitions like another pack's, or calls itself by another publisher's pack name, therefore gets
an owner of its own. Raw SCALE instructions (no definition) share ``adhoc@<fingerprint of the
server's signing key>``; an instruction from a server that predates the owner field is ``adhoc``,
and a payload run outside an agent (``quanta scale run``) is ``local``.

Tables of an earlier agent: before owners were signed, an agent recorded as a table's owner the
instruction's name up to its last ``-`` (``Quanta-Inventory-Seen`` -> ``Quanta-Inventory``). Such a
name is no identity (any pack, any publisher could name its instructions so), so these tables are
never handed to a signed owner by their name, not even when exactly one pack's name matches. The
first time a store is opened by this version its tables of that form are moved into their own name
space, ``legacy:<old owner>`` (the store records that it was done, in ``storage_meta``), where no
instruction reaches them: no signed owner may start with ``legacy:``. ``adhoc`` is moved too, since
an old agent gave it to an instruction named ``adhoc-...`` and it now means an instruction from a
server without signed owners; ``local`` meant and means a payload run outside an agent. They still
count towards the total size cap. The device's operator lists them with ``quanta agent-storage
DIR``, gives them to an owner with ``--adopt OLD --to OWNER`` or deletes them with ``--drop OLD``
(:func:`owners`, :func:`adopt_legacy`, :func:`drop_legacy`).

Every statement here is a fixed text with bound parameters: table names are values in a column,
never SQL identifiers, and are checked against a strict pattern as well.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from pathlib import Path

from ..spec import ColumnSpec as C
from ..spec import MethodEnv, MethodError, method
from ..spec import ParamSpec as P
from ._common import iso

FILE_NAME = "storage.db"
MAX_TABLES_PER_OWNER = 64
MAX_ROWS_PER_TABLE = 100_000  # the model's SelectRowsLimit default
MAX_BYTES_PER_TABLE = 8 * 1024 * 1024  # the table as stored (JSON)
MAX_TOTAL_BYTES = 64 * 1024 * 1024  # every owner's tables together
DEFAULT_MAX_ROW_COUNT = 1000  # the model's default when appending
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")  # the model: case-insensitive, up to 128 characters
_OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@\-]{0,199}$")
_LOCK = threading.Lock()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS storage_tables (
    owner TEXT NOT NULL, key TEXT NOT NULL, name TEXT NOT NULL, columns TEXT NOT NULL, rows TEXT NOT NULL,
    nrows INTEGER NOT NULL, bytes INTEGER NOT NULL, updated INTEGER NOT NULL, PRIMARY KEY (owner, key));
CREATE TABLE IF NOT EXISTS storage_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
LEGACY = "legacy:"
OWNERS_VERSION = "signed"  # storage_meta 'owners': the old owners were moved to legacy:<old owner>
# an owner an earlier agent recorded: an instruction name's prefix (no ':' or '@'), or 'adhoc'
_OLD_FORM_SQL = "instr(owner, ':') = 0 AND instr(owner, '@') = 0 AND owner <> 'local'"


def owner_of(context) -> str:
    """The owner of this payload's tables (see the module's docstring)."""
    owner = context.storage_owner or "local"
    if not _OWNER_RE.match(owner) or owner.lower().startswith(LEGACY):
        raise MethodError("The instruction's owner cannot own storage")
    return owner


def _migrate_owners(conn: sqlite3.Connection) -> None:
    """Once per store: move the tables of an earlier agent's owners to ``legacy:<owner>``."""
    if conn.execute("SELECT 1 FROM storage_meta WHERE key = 'owners'").fetchone():
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not conn.execute("SELECT 1 FROM storage_meta WHERE key = 'owners'").fetchone():
            conn.execute(f"UPDATE OR IGNORE storage_tables SET owner = '{LEGACY}' || owner WHERE {_OLD_FORM_SQL}")
            # left only where a legacy:<owner> row of the same name was already there (a crafted file)
            conn.execute(f"DELETE FROM storage_tables WHERE {_OLD_FORM_SQL}")
            conn.execute("INSERT INTO storage_meta (key, value) VALUES ('owners', ?)", (OWNERS_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def storage_path(data_dir: Path) -> Path:
    return Path(data_dir) / FILE_NAME


def _connect(data_dir: Path) -> sqlite3.Connection:
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = storage_path(data_dir)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as e:
        raise MethodError(f"Storage unavailable: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        import stat as _stat

        if not _stat.S_ISREG(st.st_mode):
            raise MethodError("Storage unavailable: storage.db is not a regular file")
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    conn = sqlite3.connect(path, timeout=5, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses at most the last commits, never the file
        conn.execute("PRAGMA trusted_schema=OFF")
        conn.executescript(_SCHEMA)
        _migrate_owners(conn)
    except sqlite3.DatabaseError as e:
        conn.close()
        raise MethodError(f"Storage unavailable: {e}") from None
    for side in ("-wal", "-shm"):
        try:
            os.chmod(str(path) + side, 0o600)
        except OSError:
            pass
    return conn


_CONNS: dict[str, tuple[sqlite3.Connection, tuple[int, int]]] = {}
_MAX_CONNS = 8


def _connection(data_dir: Path) -> sqlite3.Connection:
    """The open connection to this agent's storage.db (under _LOCK), reopened when the file was
    replaced; the path is checked at every call (a regular file, not a link)."""
    import stat as _stat

    path = storage_path(data_dir)
    key = str(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise MethodError(f"Storage unavailable: {e.strerror or e}") from None
    if st is not None and not _stat.S_ISREG(st.st_mode):
        raise MethodError("Storage unavailable: storage.db is not a regular file")
    cached = _CONNS.get(key)
    if cached is not None and st is not None and cached[1] == (st.st_dev, st.st_ino):
        return cached[0]
    if cached is not None:
        cached[0].close()
        del _CONNS[key]
    conn = _connect(data_dir)
    st = os.lstat(path)
    if len(_CONNS) >= _MAX_CONNS:
        old = next(iter(_CONNS))
        _CONNS.pop(old)[0].close()
    _CONNS[key] = (conn, (st.st_dev, st.st_ino))
    return conn


def _name(args: dict[str, object]) -> str:
    name = str(args["Name"])
    if not NAME_RE.match(name):
        raise MethodError("Name must be 1 to 128 letters, digits, '_', '.' or '-', starting with a letter or digit")
    return name


def _run(env: MethodEnv, work, write: bool = True):
    """``work(conn, owner)`` in one transaction. A read of a device that never stored anything
    creates nothing: it answers an empty table."""
    owner = owner_of(env.context)
    if not write and not os.path.lexists(storage_path(env.context.data_dir)):
        return None
    with _LOCK:
        conn = _connection(env.context.data_dir)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = work(conn, owner)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return out
        except sqlite3.DatabaseError as e:
            raise MethodError(f"Storage error: {e}") from None


def _cell(v: object) -> object:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, float) and v != v:  # NaN has no JSON form
        return None
    return v


def _merge(old_cols: list[str], old_rows: list[list], cols: list[str], rows: list[list]) -> tuple[list[str], list[list]]:
    """Appended rows under the stored columns (new columns added at the end, missing cells NULL)."""
    merged = list(old_cols) + [c for c in cols if c not in old_cols]
    if merged == list(cols) == list(old_cols):
        return merged, old_rows + rows
    width = len(merged)
    out = [r + [None] * (width - len(r)) for r in old_rows]
    idx = [merged.index(c) for c in cols]
    for r in rows:
        row: list[object] = [None] * width
        for i, v in zip(idx, r):
            row[i] = v
        out.append(row)
    return merged, out


@method(
    "Storage", "Set",
    "Save a table as the named persistent storage table (name case-insensitive), replacing it, or with "
    f"Append: true adding its rows after the stored ones and keeping the last MaxRowCount rows (default "
    f"{DEFAULT_MAX_ROW_COUNT:,}; appended columns the stored table lacks are added, missing cells are NULL). "
    f"Caps: {MAX_ROWS_PER_TABLE:,} rows and {MAX_BYTES_PER_TABLE // (1024 * 1024)} MB per table, "
    f"{MAX_TABLES_PER_OWNER} tables per owner, {MAX_TOTAL_BYTES // (1024 * 1024)} MB for all; past a cap the call "
    "fails and nothing is stored.",
    params=(
        P("Name", "string", required=True, description="1 to 128 letters, digits, '_', '.' or '-'; case is not significant"),
        P("Value", "table", required=True, description="the table to save, e.g. @rows"),
        P("Append", "boolean", default=False, description="add to the stored rows instead of replacing them"),
        P("MaxRowCount", "integer", default=None,
          description=f"with Append, keep at most this many rows, the newest (1 to {MAX_ROWS_PER_TABLE:,}; default "
                      f"{DEFAULT_MAX_ROW_COUNT:,})"),
    ),
    columns=(C("Name", "string"),), is_action=True,
)
def set_table(env: MethodEnv, args: dict[str, object]):
    name = _name(args)
    table = args["Value"]
    cols = [str(c) for c in table.columns]  # type: ignore[attr-defined]
    rows = [[_cell(v) for v in r] for r in table.rows]  # type: ignore[attr-defined]
    append = bool(args["Append"])
    max_rows = args.get("MaxRowCount")
    if max_rows is not None and not append:
        raise MethodError("MaxRowCount can be given only with Append: true")
    limit = DEFAULT_MAX_ROW_COUNT if max_rows is None else int(max_rows)  # type: ignore[call-overload]
    if not 1 <= limit <= MAX_ROWS_PER_TABLE:
        raise MethodError(f"MaxRowCount must be between 1 and {MAX_ROWS_PER_TABLE:,}")
    if not append and len(rows) > MAX_ROWS_PER_TABLE:
        raise MethodError(f"Storage table '{name}' would exceed {MAX_ROWS_PER_TABLE:,} rows")

    def work(conn: sqlite3.Connection, owner: str) -> None:
        key = name.lower()
        old = conn.execute("SELECT columns, rows, bytes FROM storage_tables WHERE owner = ? AND key = ?",
                           (owner, key)).fetchone()
        new_cols, new_rows = cols, rows
        if append and old is not None:
            new_cols, new_rows = _merge(json.loads(old[0]), json.loads(old[1]), cols, rows)
        if append:
            new_rows = new_rows[-limit:]
        cols_text = json.dumps(new_cols, ensure_ascii=False)
        rows_text = json.dumps(new_rows, ensure_ascii=False, allow_nan=False)
        size = len(cols_text.encode()) + len(rows_text.encode())
        if size > MAX_BYTES_PER_TABLE:
            raise MethodError(f"Storage table '{name}' would exceed {MAX_BYTES_PER_TABLE // (1024 * 1024)} MB")
        if old is None:
            (n,) = conn.execute("SELECT COUNT(*) FROM storage_tables WHERE owner = ?", (owner,)).fetchone()
            if n >= MAX_TABLES_PER_OWNER:
                raise MethodError(f"Storage: at most {MAX_TABLES_PER_OWNER} tables per owner")
        (total,) = conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM storage_tables").fetchone()
        if total - (old[2] if old else 0) + size > MAX_TOTAL_BYTES:
            raise MethodError(f"Storage is full: {MAX_TOTAL_BYTES // (1024 * 1024)} MB for all tables")
        conn.execute(
            "INSERT INTO storage_tables (owner, key, name, columns, rows, nrows, bytes, updated) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (owner, key) DO UPDATE SET name = excluded.name, "
            "columns = excluded.columns, rows = excluded.rows, nrows = excluded.nrows, bytes = excluded.bytes, "
            "updated = excluded.updated",
            (owner, key, name, cols_text, rows_text, len(new_rows), size, int(time.time())),
        )

    _run(env, work)
    return [[name]]


@method(
    "Storage", "Get",
    "The named persistent storage table as it was saved (its own columns). A table that does not exist gives an "
    "empty result. The only way a payload reads storage: SELECT cannot name it.",
    params=(P("Name", "string", required=True),),
    columns=(C("(stored columns)", "string", "the columns of the table as saved"),),
    dynamic_columns=True,
)
def get_table(env: MethodEnv, args: dict[str, object]):
    name = _name(args)

    def work(conn: sqlite3.Connection, owner: str):
        return conn.execute("SELECT columns, rows FROM storage_tables WHERE owner = ? AND key = ?",
                            (owner, name.lower())).fetchone()

    found = _run(env, work, write=False)
    if found is None:
        return [], []
    cols = json.loads(found[0])
    return cols, [env.take(r) for r in json.loads(found[1])]


@method(
    "Storage", "Check",
    "Whether the named persistent storage table exists: one row with its name when it does, none when it does not "
    "(so IF (@found) ... works).",
    params=(P("Name", "string", required=True),),
    columns=(C("Name", "string", "the name as saved"),),
)
def check_table(env: MethodEnv, args: dict[str, object]):
    name = _name(args)

    def work(conn: sqlite3.Connection, owner: str):
        return conn.execute("SELECT name FROM storage_tables WHERE owner = ? AND key = ?",
                            (owner, name.lower())).fetchone()

    found = _run(env, work, write=False)
    return [[found[0]]] if found else []


@method(
    "Storage", "Delete", "Delete the named persistent storage table. Deleted is false when it did not exist.",
    params=(P("Name", "string", required=True),),
    columns=(C("Name", "string"), C("Deleted", "boolean")), is_action=True,
)
def delete_table(env: MethodEnv, args: dict[str, object]):
    name = _name(args)

    def work(conn: sqlite3.Connection, owner: str) -> bool:
        return conn.execute("DELETE FROM storage_tables WHERE owner = ? AND key = ?",
                            (owner, name.lower())).rowcount > 0

    return [[name, _run(env, work)]]


@method(
    "Storage", "List", "The persistent storage tables of the instruction's owner, with their size (Quanta).",
    columns=(C("Name", "string"), C("Rows", "integer"), C("Bytes", "integer"), C("Updated", "datetime")),
)
def list_tables(env: MethodEnv, args: dict[str, object]):
    def work(conn: sqlite3.Connection, owner: str):
        return conn.execute("SELECT name, nrows, bytes, updated FROM storage_tables WHERE owner = ? ORDER BY key",
                            (owner,)).fetchall()

    found = _run(env, work, write=False) or []
    return [env.take([n, r, b, iso(u)]) for n, r, b, u in found]


# --- the device operator's view (``quanta agent-storage``), not reachable from SCALE --------------


class StorageAdminError(ValueError):
    """An operator's request that cannot be done; the message says why."""


def _admin(data_dir: Path, work):
    path = storage_path(data_dir)
    if not os.path.lexists(path):
        return work(None)
    with _LOCK:
        try:
            conn = _connection(data_dir)
        except MethodError as e:
            raise StorageAdminError(str(e)) from None
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = work(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            raise StorageAdminError(f"Storage error: {e}") from None
        return out


def owners(data_dir: Path) -> list[tuple[str, int, int, int]]:
    """Every owner of the store's tables: (owner, tables, rows, bytes); earlier agents' owners are
    ``legacy:<owner>``."""
    def work(conn):
        if conn is None:
            return []
        return [tuple(r) for r in conn.execute(
            "SELECT owner, COUNT(*), SUM(nrows), SUM(bytes) FROM storage_tables GROUP BY owner ORDER BY owner")]

    return _admin(data_dir, work)


def _legacy(old: str) -> str:
    old = old[len(LEGACY):] if old.lower().startswith(LEGACY) else old
    if not _OWNER_RE.match(old) or ":" in old or "@" in old:
        raise StorageAdminError(f"{old!r} is not an earlier agent's owner (an instruction name's prefix)")
    return LEGACY + old


def adopt_legacy(data_dir: Path, old: str, new_owner: str) -> tuple[int, list[str]]:
    """Give the tables of the earlier agent's owner ``old`` to ``new_owner`` (an owner as the
    server signs it, e.g. ``pack:Quanta-Inventory@<fingerprint>``). A table whose name the new
    owner has already is left where it was. Returns (tables moved, names left)."""
    src = _legacy(old)
    if not _OWNER_RE.match(new_owner) or new_owner.lower().startswith(LEGACY):
        raise StorageAdminError(f"{new_owner!r} is not an owner a signed instruction can have")

    def work(conn):
        if conn is None:
            raise StorageAdminError("this agent has no storage.db")
        names = [r[0] for r in conn.execute("SELECT key FROM storage_tables WHERE owner = ? ORDER BY key", (src,))]
        if not names:
            raise StorageAdminError(f"no tables of {src}")
        taken = {r[0] for r in conn.execute("SELECT key FROM storage_tables WHERE owner = ?", (new_owner,))}
        move = [k for k in names if k not in taken]
        if len(taken) + len(move) > MAX_TABLES_PER_OWNER:
            raise StorageAdminError(f"{new_owner} would have more than {MAX_TABLES_PER_OWNER} tables")
        for k in move:
            conn.execute("UPDATE storage_tables SET owner = ? WHERE owner = ? AND key = ?", (new_owner, src, k))
        return len(move), [k for k in names if k in taken]

    return _admin(data_dir, work)


def drop_legacy(data_dir: Path, old: str) -> int:
    """Delete the tables of the earlier agent's owner ``old``; returns how many."""
    src = _legacy(old)

    def work(conn):
        if conn is None:
            return 0
        return conn.execute("DELETE FROM storage_tables WHERE owner = ?", (src,)).rowcount

    return _admin(data_dir, work)
