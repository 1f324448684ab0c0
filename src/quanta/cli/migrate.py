"""``quanta migrate DIR``: bring an existing data directory's databases to this version's schema.

``quanta init`` applies every migration to a new directory; after installing a newer Quanta, this applies
the ones the directory lacks (Alembic, ``upgrade heads``: :func:`quanta.db.migrate`; the Catalog's own stream:
:func:`quanta.catalog.db.migrate_catalog`, which the HTTP tier also runs when it starts). It is a no-op on a
current directory. It refuses while the server runs: stop it and back it up first (docs/operations.md)."""

from __future__ import annotations

import typer

from quanta.cli.common import DirArg, app, fail, load_settings_or_fail, out


def _revisions(url: str, version_table: str) -> list[str]:
    import sqlalchemy as sa
    from alembic.runtime.migration import MigrationContext

    from quanta.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as c:
            return sorted(MigrationContext.configure(c, opts={"version_table": version_table}).get_current_heads())
    except sa.exc.SQLAlchemyError:
        return []
    finally:
        engine.dispose()


@app.command()
def migrate(root: DirArg) -> None:
    """Apply the database migrations of this version to DIR (Master, Responses, Catalog); a no-op when current.

    Stop the server and back up DIR (quanta backup; pg_dump for PostgreSQL) first. Exit 0 when the
    databases are current, 2 when the server runs or DIR is not a data directory, 1 when a migration fails."""
    from quanta.catalog.db import VERSION_TABLE as CATALOG_VERSIONS
    from quanta.catalog.db import catalog_db_url, migrate_catalog
    from quanta.db import VERSION_TABLES, migrate as upgrade
    from quanta.settings import DataDir
    from quanta.status import running_supervisor

    settings = load_settings_or_fail(root)
    if settings.role == "dmz":  # no database: its settings name its Switches (the Master's database is migrated there)
        out.print(f"{root} is a DMZ server: it has no database; nothing to migrate", highlight=False)
        raise typer.Exit(0)
    pid = running_supervisor(root)
    if pid is not None:
        fail(f"error: the server in {root} runs (quanta server, pid {pid}): stop it before migrating", 2)
    dd = DataDir(root)
    streams = [("master", dd.master_url(settings), VERSION_TABLES["master"], lambda u: upgrade(u, "master")),
               ("responses", dd.responses_url(settings), VERSION_TABLES["responses"], lambda u: upgrade(u, "responses")),
               ("catalog", catalog_db_url(root, settings), CATALOG_VERSIONS, migrate_catalog)]
    for name, url, table, apply in streams:
        before = _revisions(url, table)
        try:
            apply(url)
        except Exception as e:  # noqa: BLE001 - any failure of a migration: one line, the database as Alembic left it
            fail(f"error: migrating the {name} database failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                 f"it is at {', '.join(_revisions(url, table)) or 'no revision'}: restore the backup", 1)
        after = ", ".join(_revisions(url, table))
        out.print(f"{name}: up to date at {after}" if before == _revisions(url, table) else
                  f"{name}: migrated {', '.join(before) or 'empty'} -> {after}", highlight=False)
    raise typer.Exit(0)
