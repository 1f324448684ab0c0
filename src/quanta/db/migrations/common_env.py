"""Shared body of the Alembic ``env.py`` scripts (master and responses)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context
from sqlalchemy import engine_from_config, pool


def run(target_metadata: sa.MetaData) -> None:
    config = context.config
    connectable = engine_from_config(config.get_section(config.config_ini_section, {}),
                                     prefix="sqlalchemy.", poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          version_table=config.attributes["version_table"], render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
