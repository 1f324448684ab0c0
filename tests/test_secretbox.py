"""Secrets in the database are sealed with the installation's key (pki/secrets.key, 0600).

The SMTP password is stored as ``fernet:...``, read back in clear by ``load_smtp``; a password
stored in clear by an older version is read once and re-sealed; another installation's key, a
tampered value or a missing key is a clear error; ``quanta smtp`` never prints it.
"""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import free_port, quanta

from quanta import secretbox
from quanta.coordinator import load_smtp, save_smtp
from quanta.db import make_engine
from quanta.db.tables import smtp_settings
from quanta.settings import DataDir, load_settings

PASSWORD = "s3cr3t-smtp-pässword"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "server"
    quanta("init", str(r), "--server-name", "localhost", "--port", f"core={free_port()}")
    return r


def _stored(engine: sa.Engine) -> str | None:
    with engine.connect() as c:
        return c.execute(sa.select(smtp_settings.c.password)).scalar_one()


def test_the_smtp_password_is_sealed_and_read_back(root: Path) -> None:
    pw = root / "pw"
    pw.write_text(PASSWORD + "\n")
    r = quanta("smtp", str(root), "--username", "mailer", "--password-file", str(pw))
    assert PASSWORD not in r.stdout and json.loads(r.stdout)["password"] == "***"
    engine = make_engine(DataDir(root).master_url(load_settings(root)))
    stored = _stored(engine)
    assert stored.startswith("fernet:") and PASSWORD not in stored and PASSWORD.encode() not in DataDir(root).master_db.read_bytes()
    assert load_smtp(engine).password == PASSWORD
    key = DataDir(root).secrets_key
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_plain_password_from_before_is_read_once_and_resealed(root: Path) -> None:
    engine = make_engine(DataDir(root).master_url(load_settings(root)))
    with engine.begin() as c:
        c.execute(smtp_settings.update().values(password="legacy-plain"))
    assert load_smtp(engine).password == "legacy-plain"
    assert _stored(engine).startswith("fernet:")
    assert load_smtp(engine).password == "legacy-plain"


def test_hostile_and_careless_values(root: Path, tmp_path: Path) -> None:
    engine = make_engine(DataDir(root).master_url(load_settings(root)))
    cfg = load_smtp(engine)
    save_smtp(engine, dataclasses.replace(cfg, password=PASSWORD))
    sealed = _stored(engine)
    # a tampered value: a clear error, not garbage and not the ciphertext
    with engine.begin() as c:
        c.execute(smtp_settings.update().values(password=sealed[:-4] + "AAAA"))
    with pytest.raises(secretbox.SecretBoxError, match="does not decrypt"):
        load_smtp(engine)
    # another installation's key
    other = tmp_path / "other"
    quanta("init", str(other), "--server-name", "localhost", "--port", f"core={free_port()}")
    other_engine = make_engine(DataDir(other).master_url(load_settings(other)))
    with other_engine.begin() as c:
        c.execute(smtp_settings.update().values(password=sealed))
    with pytest.raises(secretbox.SecretBoxError):
        load_smtp(other_engine)
    # a long password (a token, say) round-trips; one past the limit is refused, nothing changed
    long_pw = "ä" * 500  # 1000 bytes
    save_smtp(engine, dataclasses.replace(cfg, password=long_pw))
    assert len(_stored(engine)) > 255 and load_smtp(engine).password == long_pw
    with pytest.raises(ValueError, match="at most 4096 bytes \\(this one is 5000\\)"):
        save_smtp(engine, dataclasses.replace(cfg, password="x" * 5000))
    assert load_smtp(engine).password == long_pw
    save_smtp(engine, dataclasses.replace(cfg, password="x" * secretbox.MAX_PLAIN_BYTES))
    assert load_smtp(engine).password == "x" * secretbox.MAX_PLAIN_BYTES
    # a database whose installation is unknown: refused, never stored in clear
    loose = sa.create_engine(f"sqlite:///{tmp_path / 'loose.db'}")
    with pytest.raises(secretbox.SecretBoxError, match="no secrets key"):
        secretbox.seal(loose, "p")
    # a corrupt key file
    bad = tmp_path / "badpki"
    bad.mkdir()
    (bad / secretbox.KEY_FILE).write_text("not a key")
    with pytest.raises(secretbox.SecretBoxError, match="not a valid secrets key"):
        secretbox.box(bad)


def test_a_plain_password_is_still_read_where_no_key_is_known(root: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    engine = make_engine(DataDir(root).master_url(load_settings(root)))
    with engine.begin() as c:
        c.execute(smtp_settings.update().values(password="legacy-plain"))
    engine.dispose()
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(DataDir(root).master_db, loose / "master.db")  # a database away from its data directory
    other = sa.create_engine(f"sqlite:///{loose / 'master.db'}")
    with caplog.at_level("WARNING"):
        assert load_smtp(other).password == "legacy-plain"
    assert _stored(other) == "legacy-plain" and "cannot be sealed here" in caplog.text
    assert "legacy-plain" not in caplog.text


def test_quanta_smtp_after_the_key_is_lost_says_so_in_one_line_and_can_set_a_new_password(root: Path) -> None:
    pw = root / "pw"
    pw.write_text(PASSWORD)
    quanta("smtp", str(root), "--password-file", str(pw))
    DataDir(root).secrets_key.unlink()  # lost (or replaced): the stored password no longer decrypts
    r = quanta("smtp", str(root), check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "set it again with --password-file" in r.stderr
    pw.write_text("new-password")
    r = quanta("smtp", str(root), "--password-file", str(pw))
    assert json.loads(r.stdout)["password"] == "***"
    engine = make_engine(DataDir(root).master_url(load_settings(root)))
    assert load_smtp(engine).password == "new-password"  # sealed with the new key
