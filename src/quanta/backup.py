"""``quanta backup DIR --out FILE``: one archive of a server data directory, taken while the server runs.

The archive (a gzip'd tar, 0600, written under a temporary name and renamed when complete) holds:

- every SQLite database of the directory (``master.db``, ``responses.db``), each a consistent snapshot made
  with SQLite's online backup API (the server keeps writing meanwhile; its ``-wal``/``-shm`` files are not
  copied: the snapshot already contains what they held). The two databases are snapshotted one after the
  other, so an answer that arrives in between may be in one and not the other, as after any crash;
- everything else in the directory (``quanta.toml``, ``pki/`` with the CA key, the signing key,
  ``secrets.key`` that seals the stored SMTP password and ``internal.secret``, ``content/``, the
  administrator's and the Catalog's key files, ``integrate.toml``), with its modes (0600 files, 0700
  directories), except ``run/`` (the running processes' state) and the live database files.

A database on PostgreSQL is not in the archive (``pg_dump`` it: docs/operations.md); the command says so.
Restore: ``mkdir -m 700 NEWDIR && tar -xpzf FILE -C NEWDIR``.
"""

from __future__ import annotations

import os
import sqlite3
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from quanta.datadir import DataDir
from quanta.db import is_sqlite, normalise_url

SKIP_DIRS = ("run",)


class BackupError(ValueError):
    pass


@dataclass
class BackupResult:
    out: Path
    databases: list[str] = field(default_factory=list)  # archive names of the SQLite snapshots
    files: int = 0
    not_included: list[str] = field(default_factory=list)  # why a database is not in the archive


def _sqlite_file(url: str) -> Path | None:
    if not is_sqlite(url):
        return None
    from sqlalchemy.engine import make_url

    db = make_url(normalise_url(url)).database
    return Path(db).resolve() if db and db != ":memory:" else None


def _snapshot(src: Path, dst: Path) -> None:
    """A consistent copy of the SQLite database ``src`` while others write to it (the online backup API)."""
    source = sqlite3.connect(f"file:{src}?mode=rw", uri=True, timeout=30)
    try:
        target = sqlite3.connect(dst)
        try:
            source.backup(target)  # all pages in one step, under one read transaction: one moment's state
            ok = target.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise BackupError(f"the snapshot of {src} fails SQLite's quick_check: {ok}")
            target.execute("PRAGMA journal_mode=DELETE")  # a single file, no -wal beside it
        finally:
            target.close()
    finally:
        source.close()


def backup(root: Path, out: Path, settings: object) -> BackupResult:
    dd = DataDir(Path(root).resolve())
    out = out.resolve()
    if out.exists():
        raise BackupError(f"{out} exists: give a new file name (a backup never overwrites one)")
    if not out.parent.is_dir():
        raise BackupError(f"{out.parent} is not a directory")
    if out.is_relative_to(dd.root):
        raise BackupError(f"{out} is inside {dd.root}: write the backup outside the data directory")
    result = BackupResult(out)
    databases: dict[Path, str] = {}  # live file -> name in the archive
    for what, url in (("Master", dd.master_url(settings)), ("Responses", dd.responses_url(settings))):  # type: ignore[arg-type]
        path = _sqlite_file(url)
        if path is None:
            result.not_included.append(f"the {what} database is not a SQLite file of this directory ({url.split('@')[-1]}):"
                                       " back it up with pg_dump")
            continue
        if not path.is_relative_to(dd.root):
            result.not_included.append(f"the {what} database {path} is outside {dd.root}: copy it with "
                                       "'sqlite3 FILE .backup COPY'")
            continue
        databases.setdefault(path, str(path.relative_to(dd.root)))
    live = {p for db in databases for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}-journal"))}
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".quanta-backup-") as work:
        partial = Path(work) / out.name
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for path in sorted(dd.root.rglob("*")):
                rel = path.relative_to(dd.root)
                if rel.parts[0] in SKIP_DIRS or path in live or path.is_symlink() and not path.exists():
                    continue
                try:
                    tar.add(path, arcname=str(rel), recursive=False)
                except FileNotFoundError:  # removed since the listing (content replaced meanwhile)
                    continue
                result.files += path.is_file()
            for db, name in databases.items():
                if not db.exists():
                    raise BackupError(f"{db} does not exist (is {dd.root} initialised?)")
                snap = Path(work) / f"snapshot-{len(result.databases)}.db"
                _snapshot(db, snap)
                info = tar.gettarinfo(str(snap), arcname=name)
                info.mode = 0o600
                with open(snap, "rb") as f:
                    tar.addfile(info, f)
                result.databases.append(name)
        os.chmod(partial, 0o600)
        os.replace(partial, out)  # complete, or not there at all
    return result
