"""``quanta backup``: an archive of a running server's data directory (SQLite online snapshots, PKI,
settings), restored with tar into a new directory that a real server starts from; and the refusals."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import Server, make_server, quanta


def users(root: Path) -> set[str]:
    return {u["username"] for u in json.loads(quanta("user", "list", str(root), "--json").stdout)}


def add_user(root: Path, name: str, tmp: Path) -> None:
    pw = tmp / f"{name}.pw"
    pw.write_text("correct horse battery staple\n")
    quanta("user", "add", str(root), "--username", name, "--role", "Viewer", "--password-file", str(pw))


def restore(archive: Path, into: Path) -> None:
    """What docs/operations.md says to do: a private directory, tar keeping the modes."""
    into.mkdir(mode=0o700)
    subprocess.run(["tar", "-xpzf", str(archive), "-C", str(into)], check=True)


@pytest.mark.slow
def test_a_backup_of_a_running_server_restores_to_a_directory_a_server_starts_from(server: Server,
                                                                                    tmp_path: Path) -> None:
    root = server.root
    add_user(root, "alice", tmp_path)
    secret = tmp_path / "smtp.pw"
    secret.write_text("smtp-password-sealed-by-secrets-key\n")
    quanta("smtp", str(root), "--username", "mailer", "--password-file", str(secret))
    archive = tmp_path / "backups" / "quanta.tar.gz"
    archive.parent.mkdir()
    r = quanta("backup", str(root), "--out", str(archive))  # while every component runs and writes
    assert "master.db, responses.db" in " ".join(r.stdout.split()), r.stdout
    add_user(root, "carol", tmp_path)  # after the backup: not in it
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert [p.name for p in archive.parent.iterdir()] == ["quanta.tar.gz"]  # no temporary left beside it

    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
    for name in ("quanta.toml", "master.db", "responses.db", "pki/ca.key", "pki/ca.crt", "pki/signing.key",
                 "pki/internal.secret", "pki/secrets.key", "admin.credentials"):
        assert name in members, sorted(members)
    assert not [n for n in members if n.startswith("run") or n.endswith(("-wal", "-shm"))], sorted(members)
    for m in members.values():
        assert stat.S_IMODE(m.mode) == (0o700 if m.isdir() else 0o600), (m.name, oct(m.mode))

    server.stop()
    copy = tmp_path / "restored"
    restore(archive, copy)
    assert stat.S_IMODE(copy.stat().st_mode) == 0o700
    assert stat.S_IMODE((copy / "pki" / "ca.key").stat().st_mode) == 0o600
    assert users(copy) >= {"admin", "alice"} and "carol" not in users(copy)
    smtp = json.loads(quanta("smtp", str(copy)).stdout)  # the sealed password opens with the restored key
    assert smtp["username"] == "mailer" and smtp["password"] == "***"

    restored = Server(copy, server.https, server.switch, server.core)
    restored.start()
    try:
        assert quanta("status", str(copy), check=False).returncode in (0, 1)  # running (a Switch may still link)
        server.enroll("after-restore")  # the restored CA issues, the restored master records
    finally:
        restored.stop()


@pytest.fixture(scope="module")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> Server:
    return make_server(tmp_path_factory.mktemp("backup"))


def test_refusals_are_one_line_and_write_nothing(initialised: Server, tmp_path: Path) -> None:
    root = initialised.root
    existing = tmp_path / "old.tar.gz"
    existing.write_bytes(b"an earlier backup")
    for out, why in ((existing, "exists"), (tmp_path / "no" / "such" / "dir.tgz", "is not a directory"),
                     (root / "inside.tgz", "inside")):
        r = quanta("backup", str(root), "--out", str(out), check=False)
        assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
    assert existing.read_bytes() == b"an earlier backup" and not (root / "inside.tgz").exists()
    r = quanta("backup", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.tgz"), check=False)
    assert r.returncode == 2 and "not a directory" in r.stderr and not (tmp_path / "x.tgz").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["old.tar.gz"]


def test_a_restored_copy_without_secrets_key_cannot_open_the_smtp_password(initialised: Server, tmp_path: Path) -> None:
    """Why secrets.key must be backed up with the databases: without it the sealed SMTP password is lost."""
    root = tmp_path / "server"
    subprocess.run(["cp", "-a", str(initialised.root), str(root)], check=True)
    secret = tmp_path / "smtp.pw"
    secret.write_text("hunter2-hunter2\n")
    quanta("smtp", str(root), "--username", "mailer", "--password-file", str(secret))
    archive = tmp_path / "b.tar.gz"
    quanta("backup", str(root), "--out", str(archive))
    copy = tmp_path / "copy"
    restore(archive, copy)
    (copy / "pki" / "secrets.key").unlink()
    r = quanta("smtp", str(copy), check=False)
    assert r.returncode != 0 and "hunter2" not in r.stdout + r.stderr


@pytest.mark.postgres
def test_a_postgresql_directory_says_its_databases_are_not_in_the_archive(tmp_path: Path, pg_url: str) -> None:
    s = make_server(tmp_path, "--database-url", pg_url)
    archive = tmp_path / "pg.tar.gz"
    r = quanta("backup", str(s.root), "--out", str(archive))
    said = " ".join(r.stderr.split())
    assert "the Master database is not a SQLite file" in said and "pg_dump" in said and "root@" not in said, said
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "quanta.toml" in names and "pki/ca.key" in names and not [n for n in names if n.endswith(".db")]
    assert os.stat(archive).st_mode & 0o077 == 0
