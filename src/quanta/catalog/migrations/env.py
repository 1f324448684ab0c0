from alembic import context
from sqlalchemy import engine_from_config, pool

from quanta.catalog.tables import catalog

config = context.config
target_metadata = catalog


def _only_catalog(obj, name, type_, reflected, compare_to):  # type: ignore[no-untyped-def]
    # the catalog may share a database with the master: never touch tables that are not its own
    return type_ != "table" or name in target_metadata.tables


def run() -> None:
    connectable = engine_from_config(config.get_section(config.config_ini_section, {}),
                                     prefix="sqlalchemy.", poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          version_table=config.attributes["version_table"], render_as_batch=True,
                          include_object=_only_catalog)
        with context.begin_transaction():
            context.run_migrations()


run()
