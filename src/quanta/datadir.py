"""Paths inside a server data directory (no I/O, cheap to import: the ``quanta ask`` client
finds its credentials and CA here without loading the settings model)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from quanta.settings import Settings

CONFIG_FILE = "quanta.toml"
# master database URL -> the PKI directory whose secrets key seals its stored secrets (quanta.secretbox)
SECRET_KEY_DIRS: dict[str, Path] = {}
PRIVATE_UMASK = 0o077  # files this process creates: owner only (0600 files, 0700 directories)


def private_umask() -> int:
    """Make every file and directory this process creates from now on owner-only; return the old
    umask. Server components and ``quanta init`` / ``quanta enroll`` run with it, so databases
    (and their -wal/-shm), keys, secrets, logs and content are never world-readable, whichever
    code creates them."""
    return os.umask(PRIVATE_UMASK)


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) and make it 0700, if it already existed too."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (0600 from the first byte; atomic: temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def tighten(root: Path) -> list[Path]:
    """Make an existing data directory private: every directory in it (itself included) loses its
    group and other bits (0700), every file too (0600; owner bits are kept, nothing is made more
    open; symbolic links are not followed). Returns what was changed. Run by ``quanta init`` and by the Core and web tier at
    start-up, so an installation made before these modes were enforced is repaired."""
    changed: list[Path] = []
    if not root.is_dir():
        return changed
    for path in [root, *root.rglob("*")]:
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if path.is_symlink():
            continue
        want = 0o700 if path.is_dir() else 0o600
        if st.st_mode & 0o077:
            os.chmod(path, (st.st_mode & 0o700) | (want & 0o700))
            changed.append(path)
    return changed


class DataDir(NamedTuple):
    """Paths inside a server data directory. (A NamedTuple rather than a dataclass: importing
    ``dataclasses`` costs ``quanta ask`` about 6 ms of its start-up.)"""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def master_db(self) -> Path:
        return self.root / "master.db"

    @property
    def responses_db(self) -> Path:
        return self.root / "responses.db"

    @property
    def secret_file(self) -> Path:
        return self.root / "pki" / "internal.secret"

    @property
    def content(self) -> Path:
        return self.root / "content"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def admin_credentials(self) -> Path:
        return self.root / "admin.credentials"

    def master_url(self, s: Settings) -> str:
        url = s.database_url or f"sqlite:///{self.master_db}"
        SECRET_KEY_DIRS[url] = self.pki  # its stored secrets are sealed with this installation's key
        return url

    def responses_url(self, s: Settings) -> str:
        return s.responses_database_url or s.database_url or f"sqlite:///{self.responses_db}"

    @property
    def secrets_key(self) -> Path:
        """The Fernet key that encrypts secrets stored in the database (quanta.secretbox)."""
        return self.root / "pki" / "secrets.key"

    def create_private(self) -> None:
        """The data directory exists, is 0700, and this process creates owner-only files from now on."""
        private_umask()
        make_private_dir(self.root)
        tighten(self.root)

    def internal_secret(self) -> bytes:
        return bytes.fromhex(self.secret_file.read_text().strip())
