"""``quanta migrate``: an existing directory whose databases lack this version's last migrations is brought
to the current schema (SQLite and PostgreSQL), a current one is left alone, a running server is refused."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
from alembic import command

from conftest import make_server, quanta
from quanta.db import alembic_config, make_engine
from quanta.settings import DataDir, load_settings
from quanta.status import status_path


def _heads(which: str) -> list[str]:
    """This version's heads of one migration chain (read from its scripts, so a new migration needs
    no change here)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://", which)).get_heads()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migrate_applies_what_is_missing_and_then_nothing(tmp_path: Path, backend: str, request) -> None:
    extra = ("--database-url", request.getfixturevalue("pg_url")) if backend == "postgresql" else ()
    root = make_server(tmp_path, *extra).root
    dd, settings = DataDir(root), load_settings(root)
    # an older version's schema: the last master and responses migrations not applied
    command.downgrade(alembic_config(dd.master_url(settings), "master"), "master_0022")
    command.downgrade(alembic_config(dd.responses_url(settings), "responses"), "responses_0002")
    import sqlalchemy as sa

    assert "device_attributes" not in sa.inspect(make_engine(dd.master_url(settings))).get_table_names()

    r = quanta("migrate", str(root))
    said = " ".join(r.stdout.split())
    master_heads = ", ".join(sorted(_heads("master")))
    assert "master: migrated" in said and f"-> {master_heads}" in said, said
    assert f"responses: migrated responses_0002 -> {_heads('responses')[0]}" in said, said
    assert "catalog: up to date" in said, said
    assert "device_attributes" in sa.inspect(make_engine(dd.master_url(settings))).get_table_names()

    again = " ".join(quanta("migrate", str(root)).stdout.split())
    assert "master: up to date" in again and "responses: up to date" in again and "migrated" not in again
    assert json.loads(quanta("user", "list", str(root), "--json").stdout)[0]["username"] == "admin"


def test_migrate_refuses_a_running_server_and_a_non_directory(tmp_path: Path) -> None:
    root = make_server(tmp_path).root
    me = psutil.Process()  # a record naming a live supervisor (this process, truly: start time and command line)
    path = status_path(root, "server")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"version": 1, "updated_at": 1.0, "children": {}, "supervisor": {
        "name": "server", "pid": me.pid, "started": me.create_time(), "argv": me.cmdline(), "state": "running"}}))
    r = quanta("migrate", str(root), check=False)
    assert r.returncode == 2 and f"pid {me.pid}" in r.stderr and "stop it before migrating" in r.stderr, r.stderr
    r = quanta("migrate", str(tmp_path / "missing"), check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
