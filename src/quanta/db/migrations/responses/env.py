from alembic import context
from sqlalchemy import engine_from_config, pool

from quanta.db import tables

config = context.config
target_metadata = tables.responses


def run() -> None:
    connectable = engine_from_config(config.get_section(config.config_ini_section, {}),
                                     prefix="sqlalchemy.", poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          version_table=config.attributes["version_table"], render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run()
