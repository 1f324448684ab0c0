"""Database access: engines for the Master and Responses databases, and their migrations.

SQLite files in the data directory are the embedded default; PostgreSQL is used when a URL is
given. Both run the same Alembic migrations and the same tests.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event

from . import tables

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLES = {"master": "alembic_version_master", "responses": "alembic_version_responses"}


def normalise_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and use the psycopg 3 driver."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str, **kw: object) -> sa.Engine:
    url = normalise_url(url)
    if is_sqlite(url):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kw)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    kw.setdefault("pool_pre_ping", True)
    return sa.create_engine(url, **kw)


def alembic_config(url: str, which: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS / which))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    cfg.attributes["version_table"] = VERSION_TABLES[which]
    return cfg


def migrate(url: str, which: str) -> None:
    """Upgrade database ``which`` ("master" or "responses") at ``url`` to the latest schema."""
    command.upgrade(alembic_config(url, which), "heads")  # independent branches may coexist


__all__ = ["make_engine", "migrate", "normalise_url", "is_sqlite", "tables"]
