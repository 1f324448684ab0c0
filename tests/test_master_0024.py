"""master_0024: the unused ``api_tokens`` table is dropped and the sealed SMTP password column is
Text, on SQLite and PostgreSQL, with a working downgrade; a password past the secret box's limit
is one clear line from ``quanta smtp``, nothing stored."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from conftest import free_port, quanta

from quanta.coordinator import load_smtp, save_smtp
from quanta.db import alembic_config, make_engine
from quanta.db.tables import smtp_settings
from quanta.settings import DataDir, load_settings


def _schema(e: sa.Engine) -> tuple[set[str], sa.types.TypeEngine]:
    with e.connect() as c:
        insp = sa.inspect(c)
        password = next(col for col in insp.get_columns("smtp_settings") if col["name"] == "password")
        return set(insp.get_table_names()), password["type"]


def test_upgrade_drops_api_tokens_and_widens_the_password_and_downgrade_restores(db_url: str) -> None:
    cfg = alembic_config(db_url, "master")
    command.upgrade(cfg, "master_0023_attrs")
    e = make_engine(db_url)
    try:
        long_stored = "fernet:" + "A" * 1500  # what a sealed 1000-byte password looks like, roughly
        with e.begin() as c:
            c.execute(sa.text("INSERT INTO users (username, password_hash, role, disabled, created_at) "
                              "VALUES ('u', 'h', 'Viewer', false, 0)"))
            c.execute(sa.text("INSERT INTO api_tokens (token_hash, user_id, expires_at) "
                              "SELECT 'old', id, 0 FROM users WHERE username = 'u'"))
            c.execute(smtp_settings.insert().values(id=1, host="h", port=25, from_addr="f@h", password="short"))
        tables, _ = _schema(e)
        assert "api_tokens" in tables
        command.upgrade(cfg, "master_0024_tokens_smtp")
        tables, ptype = _schema(e)
        assert "api_tokens" not in tables and "users" in tables
        assert isinstance(ptype, sa.Text) and getattr(ptype, "length", None) is None
        with e.begin() as c:
            assert c.execute(sa.select(smtp_settings.c.password)).scalar_one() == "short"  # kept across
            c.execute(smtp_settings.update().values(password=long_stored))
        with e.connect() as c:
            assert c.execute(sa.select(smtp_settings.c.password)).scalar_one() == long_stored
        # a downgrade that would cut the stored password refuses and changes nothing
        with pytest.raises(RuntimeError, match="String\\(255\\) holds 255"):
            command.downgrade(cfg, "master_0023_attrs")
        tables, ptype = _schema(e)
        assert "api_tokens" not in tables and isinstance(ptype, sa.Text)
        with e.begin() as c:
            c.execute(smtp_settings.update().values(password="short again"))
        command.downgrade(cfg, "master_0023_attrs")
        tables, ptype = _schema(e)
        assert "api_tokens" in tables and getattr(ptype, "length", None) == 255
        with e.begin() as c:
            assert c.execute(sa.select(smtp_settings.c.password)).scalar_one() == "short again"
            c.execute(sa.text("INSERT INTO api_tokens (token_hash, user_id, expires_at) "
                              "SELECT 'new', id, 0 FROM users WHERE username = 'u'"))  # the table works again
        command.upgrade(cfg, "heads")
        assert "api_tokens" not in _schema(e)[0]
    finally:
        e.dispose()


def test_a_long_smtp_password_through_the_cli(tmp_path: Path) -> None:
    root = tmp_path / "server"
    quanta("init", str(root), "--server-name", "localhost", "--port", f"core={free_port()}")
    engine = make_engine(DataDir(root).master_url(load_settings(root)))
    pw = tmp_path / "pw"
    pw.write_text("p" * 1000 + "\n")
    r = quanta("smtp", str(root), "--username", "mailer", "--password-file", str(pw))
    assert json.loads(r.stdout)["password"] == "***" and load_smtp(engine).password == "p" * 1000
    pw.write_text("q" * 5000 + "\n")
    r = quanta("smtp", str(root), "--username", "other", "--password-file", str(pw), check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("error: a stored secret is at most 4096 bytes (this one is 5000); "
                                "nothing was changed")
    cfg = load_smtp(engine)
    assert cfg.password == "p" * 1000 and cfg.username == "mailer"  # nothing changed
    save_smtp(engine, dataclasses.replace(cfg, password=None))  # and a password can be cleared
    assert load_smtp(engine).password is None
