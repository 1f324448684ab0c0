"""File modes: a fresh data directory and a fresh agent directory are private to their owner.

``stat`` on what ``quanta init`` and ``quanta enroll`` write: directories 0700, every file
(databases, keys, secrets, credentials, the CA key, settings) 0600; the databases' -wal/-shm
inherit the database's mode; the agent's journal of answers is 0600 in a 0700 directory; an
installation made before (0644 files, 0755 directories) is repaired at start-up.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import free_port, quanta

from quanta.agent.journal import FileStore
from quanta.datadir import DataDir, tighten, write_private
from quanta.db import make_engine


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def _loose(root: Path) -> dict[str, str]:
    """Every path under ``root`` (itself included) that group or others may use."""
    return {str(p.relative_to(root.parent)): oct(_mode(p)) for p in [root, *root.rglob("*")]
            if not p.is_symlink() and _mode(p) & 0o077}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("modes") / "server"
    old = os.umask(0o022)  # a careless operator's ordinary umask
    try:
        quanta("init", str(root), "--server-name", "localhost", "--port", f"core={free_port()}")
    finally:
        os.umask(old)
    return root


def test_a_fresh_data_directory_is_private(fresh: Path) -> None:
    dd = DataDir(fresh)
    assert _mode(fresh) == 0o700 and _mode(dd.pki) == 0o700
    for f in (dd.master_db, dd.responses_db, dd.secret_file, dd.admin_credentials, dd.config, dd.pki / "ca.key",
              dd.pki / "server.key", dd.pki / "signing.key", fresh / "catalog.key"):
        assert f.exists() and _mode(f) == 0o600, (f, oct(_mode(f)))
    assert _loose(fresh) == {}


def test_sqlite_wal_and_shm_take_the_databases_mode(fresh: Path) -> None:
    old = os.umask(0o022)
    try:
        engine = make_engine(f"sqlite:///{DataDir(fresh).responses_db}")
        with engine.begin() as c:
            c.execute(sa.text("CREATE TABLE IF NOT EXISTS t_modes (x INTEGER)"))
            c.execute(sa.text("INSERT INTO t_modes VALUES (1)"))
            wal = Path(str(DataDir(fresh).responses_db) + "-wal")
            shm = Path(str(DataDir(fresh).responses_db) + "-shm")
            assert wal.exists() and shm.exists()
            assert _mode(wal) == 0o600 and _mode(shm) == 0o600
        engine.dispose()
    finally:
        os.umask(old)


def test_a_fresh_agent_directory_is_private(fresh: Path, tmp_path: Path) -> None:
    out = tmp_path / "agents" / "dev1"
    old = os.umask(0o022)
    try:
        quanta("enroll", str(fresh), "--device", "dev1", "--out", str(out))
    finally:
        os.umask(old)
    assert _mode(out) == 0o700
    for name in ("device.key", "interaction.key", "device.crt", "interaction.crt", "ca.crt", "agent.conf"):
        assert _mode(out / name) == 0o600, name
    assert _loose(out) == {}


def test_the_journal_of_answers_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        state = tmp_path / "state"
        state.mkdir(mode=0o755)
        os.chmod(state, 0o755)
        j = FileStore(state / "journal.bin")
        j.compact()
        j.close()
    finally:
        os.umask(old)
    assert _mode(state) == 0o700 and _mode(state / "journal.bin") == 0o600


def test_an_old_installation_is_repaired(tmp_path: Path) -> None:
    root = tmp_path / "old"
    (root / "pki").mkdir(parents=True, mode=0o755)
    os.chmod(root, 0o755)
    os.chmod(root / "pki", 0o755)
    (root / "master.db").write_bytes(b"x")
    os.chmod(root / "master.db", 0o644)
    (root / "pki" / "ca.key").write_bytes(b"k")
    os.chmod(root / "pki" / "ca.key", 0o666)
    (root / "elsewhere").write_bytes(b"e")
    (root / "link").symlink_to(tmp_path / "elsewhere-target")  # a dangling link is neither followed nor fatal
    changed = tighten(root)
    assert _loose(root) == {} and root / "master.db" in changed
    assert _mode(root / "pki" / "ca.key") == 0o600 and _mode(root) == 0o700
    assert tighten(root) == []  # idempotent


def test_write_private_is_0600_from_the_first_byte_and_atomic(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_text("old")
    os.chmod(target, 0o644)
    write_private(target, b"new")
    assert target.read_bytes() == b"new" and _mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]
