"""SCALE module Storage: named tables that an instruction's owner keeps on the device between runs.

The model lets instructions persist data between runs; Quanta's form is a set of small key/value
tables kept in their own SQLite file, ``storage.db`` in the agent's state directory (mode 0600),
apart from the Activity Record and out of reach of ``SELECT``: a payload reads a table only through
``Storage.Get``. Writing (``Create``, ``Set``, ``Delete``, ``Drop``) is an action, so it needs the
approval any action needs.

Owner: a table belongs to the *owner* of the instruction that made it, the instruction's signed
name up to its last ``-`` (``Quanta-Inventory-SeenHashes`` belongs to ``Quanta-Inventory``, as the
model names instructions Vendor-Product-Instruction); a name without ``-`` is its own owner, and a
payload run without an instruction (``quanta scale run``) belongs to ``local``. Instructions of one
pack therefore share tables, and one owner never sees another's.

Every statement here is a fixed text with bound parameters: table and key names are values in
columns, never SQL identifiers, and are checked against a strict pattern as well.
"""

from __future__ import annotations

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
MAX_TABLES_PER_OWNER = 32
MAX_ROWS_PER_TABLE = 10_000
MAX_BYTES_PER_TABLE = 4 * 1024 * 1024  # keys and values, as UTF-8
MAX_TOTAL_BYTES = 64 * 1024 * 1024  # every owner's tables together
MAX_KEY = 256
MAX_VALUE = 64 * 1024
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_LOCK = threading.Lock()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS storage_tables (
    owner TEXT NOT NULL, name TEXT NOT NULL, created INTEGER NOT NULL,
    rows INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (owner, name));
CREATE TABLE IF NOT EXISTS storage_rows (
    owner TEXT NOT NULL, name TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    bytes INTEGER NOT NULL, updated INTEGER NOT NULL, PRIMARY KEY (owner, name, key));
"""


def owner_of(instruction_name: str | None) -> str:
    if not instruction_name:
        return "local"
    if not _OWNER_RE.match(instruction_name):
        raise MethodError("The instruction's name cannot own storage")
    head, sep, _ = instruction_name.rpartition("-")
    return head if sep and head else instruction_name


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
        raise MethodError("Name must be a letter followed by up to 63 letters, digits or '_'")
    return name


def _key(args: dict[str, object]) -> str:
    key = str(args["Key"])
    if not key or len(key) > MAX_KEY or "\0" in key:
        raise MethodError(f"Key must be 1 to {MAX_KEY} characters without NUL")
    return key


def _create(conn: sqlite3.Connection, owner: str, name: str) -> bool:
    if conn.execute("SELECT 1 FROM storage_tables WHERE owner = ? AND name = ?", (owner, name)).fetchone():
        return False
    (n,) = conn.execute("SELECT COUNT(*) FROM storage_tables WHERE owner = ?", (owner,)).fetchone()
    if n >= MAX_TABLES_PER_OWNER:
        raise MethodError(f"Storage: at most {MAX_TABLES_PER_OWNER} tables per owner")
    conn.execute("INSERT INTO storage_tables (owner, name, created) VALUES (?, ?, ?)", (owner, name, int(time.time())))
    return True


def _run(env: MethodEnv, work, write: bool = True):
    """``work(conn, owner)`` in one transaction. A read of a device that never stored anything
    creates nothing: it answers an empty table."""
    owner = owner_of(env.context.instruction_name)
    if not write and not os.path.lexists(storage_path(env.context.data_dir)):
        return []
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


_NAME = P("Name", "string", required=True, description="the table: a letter, then up to 63 letters, digits or '_'")


@method(
    "Storage", "Create",
    f"Create a named table owned by the instruction's pack (at most {MAX_TABLES_PER_OWNER} per owner). "
    "Created is false when it existed.",
    params=(_NAME,), columns=(C("Name", "string"), C("Created", "boolean")), is_action=True,
)
def create(env: MethodEnv, args: dict[str, object]):
    name = _name(args)
    return [[name, _run(env, lambda conn, owner: _create(conn, owner, name))]]


@method(
    "Storage", "Set",
    f"Store Value under Key in a table (created when missing); a Key set again is replaced. Caps: keys up to "
    f"{MAX_KEY} characters, values up to {MAX_VALUE // 1024} KB, {MAX_ROWS_PER_TABLE:,} rows and "
    f"{MAX_BYTES_PER_TABLE // (1024 * 1024)} MB per table, {MAX_TOTAL_BYTES // (1024 * 1024)} MB for all tables; "
    "past a cap the call fails and stores nothing.",
    params=(_NAME, P("Key", "string", required=True), P("Value", "string", required=True)),
    columns=(C("Name", "string"), C("Key", "string"), C("Stored", "boolean")), is_action=True,
)
def set_value(env: MethodEnv, args: dict[str, object]):
    name, key, value = _name(args), _key(args), str(args["Value"])
    if "\0" in value:
        raise MethodError("Value must not contain NUL characters")
    size = len(key.encode()) + len(value.encode())
    if size - len(key.encode()) > MAX_VALUE:
        raise MethodError(f"Value exceeds {MAX_VALUE // 1024} KB")

    def work(conn: sqlite3.Connection, owner: str) -> bool:
        _create(conn, owner, name)
        old = conn.execute("SELECT bytes FROM storage_rows WHERE owner = ? AND name = ? AND key = ?",
                           (owner, name, key)).fetchone()
        rows, used = conn.execute("SELECT rows, bytes FROM storage_tables WHERE owner = ? AND name = ?",
                                  (owner, name)).fetchone()
        (total,) = conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM storage_tables").fetchone()
        delta = size - (old[0] if old else 0)
        if old is None and rows >= MAX_ROWS_PER_TABLE:
            raise MethodError(f"Storage table '{name}' is full: {MAX_ROWS_PER_TABLE:,} rows")
        if used + delta > MAX_BYTES_PER_TABLE:
            raise MethodError(f"Storage table '{name}' is full: {MAX_BYTES_PER_TABLE // (1024 * 1024)} MB")
        if total + delta > MAX_TOTAL_BYTES:
            raise MethodError(f"Storage is full: {MAX_TOTAL_BYTES // (1024 * 1024)} MB for all tables")
        conn.execute(
            "INSERT INTO storage_rows (owner, name, key, value, bytes, updated) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (owner, name, key) DO UPDATE SET value = excluded.value, bytes = excluded.bytes, "
            "updated = excluded.updated",
            (owner, name, key, value, size, int(time.time())),
        )
        conn.execute("UPDATE storage_tables SET rows = rows + ?, bytes = bytes + ? WHERE owner = ? AND name = ?",
                     (0 if old else 1, delta, owner, name))
        return True

    return [[name, key, _run(env, work)]]


@method(
    "Storage", "Get",
    "The rows of one of the owner's tables (one Key, or all in key order). A table that does not exist gives an "
    "empty table. The only way a payload reads storage: SELECT cannot name it.",
    params=(_NAME, P("Key", "string", default=None)),
    columns=(C("Key", "string"), C("Value", "string"), C("Updated", "datetime")),
)
def get_values(env: MethodEnv, args: dict[str, object]):
    name = _name(args)
    key = None if args.get("Key") is None else _key(args)

    def work(conn: sqlite3.Connection, owner: str):
        if key is not None:
            cur = conn.execute("SELECT key, value, updated FROM storage_rows WHERE owner = ? AND name = ? AND key = ?",
                               (owner, name, key))
        else:
            cur = conn.execute("SELECT key, value, updated FROM storage_rows WHERE owner = ? AND name = ? ORDER BY key",
                               (owner, name))
        return [env.take([k, v, iso(u)]) for k, v, u in cur]

    return _run(env, work, write=False)


@method(
    "Storage", "Delete", "Remove one Key from a table. Deleted is false when it was not there.",
    params=(_NAME, P("Key", "string", required=True)),
    columns=(C("Name", "string"), C("Key", "string"), C("Deleted", "boolean")), is_action=True,
)
def delete_value(env: MethodEnv, args: dict[str, object]):
    name, key = _name(args), _key(args)

    def work(conn: sqlite3.Connection, owner: str) -> bool:
        old = conn.execute("SELECT bytes FROM storage_rows WHERE owner = ? AND name = ? AND key = ?",
                           (owner, name, key)).fetchone()
        if old is None:
            return False
        conn.execute("DELETE FROM storage_rows WHERE owner = ? AND name = ? AND key = ?", (owner, name, key))
        conn.execute("UPDATE storage_tables SET rows = rows - 1, bytes = bytes - ? WHERE owner = ? AND name = ?",
                     (old[0], owner, name))
        return True

    return [[name, key, _run(env, work)]]


@method(
    "Storage", "Drop", "Remove a table and its rows. Dropped is false when it did not exist.",
    params=(_NAME,), columns=(C("Name", "string"), C("Dropped", "boolean")), is_action=True,
)
def drop(env: MethodEnv, args: dict[str, object]):
    name = _name(args)

    def work(conn: sqlite3.Connection, owner: str) -> bool:
        conn.execute("DELETE FROM storage_rows WHERE owner = ? AND name = ?", (owner, name))
        return conn.execute("DELETE FROM storage_tables WHERE owner = ? AND name = ?", (owner, name)).rowcount > 0

    return [[name, _run(env, work)]]


@method(
    "Storage", "List", "The owner's tables with their row count and size.",
    columns=(C("Name", "string"), C("Rows", "integer"), C("Bytes", "integer"), C("Created", "datetime")),
)
def list_tables(env: MethodEnv, args: dict[str, object]):
    def work(conn: sqlite3.Connection, owner: str):
        cur = conn.execute(
            "SELECT name, rows, bytes, created FROM storage_tables WHERE owner = ? ORDER BY name", (owner,))
        return [env.take([n, c, b, iso(t)]) for n, c, b, t in cur]

    return _run(env, work, write=False)
