"""The Catalog database: URL, migrations (own stream), engine."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from quanta.db import make_engine, normalise_url
from quanta.settings import DataDir, Settings

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version_catalog"


def catalog_db_url(root: Path | str, settings: Settings) -> str:
    """``catalog_database_url``, or the master database (the default, co-located Catalog)."""
    return settings.catalog_database_url or DataDir(Path(root)).master_url(settings)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    cfg.attributes["version_table"] = VERSION_TABLE
    return cfg


def migrate_catalog(url: str) -> None:
    command.upgrade(alembic_config(url), "heads")


def open_catalog(url: str) -> sa.Engine:
    """Migrate (idempotent) and load the seed rules into an empty catalog; return the engine."""
    from .store import ensure_seeded

    migrate_catalog(url)
    engine = make_engine(url)
    ensure_seeded(engine)
    return engine
