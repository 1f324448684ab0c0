"""Paths inside a server data directory (no I/O, cheap to import: the ``quanta ask`` client
finds its credentials and CA here without loading the settings model)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from quanta.settings import Settings

CONFIG_FILE = "quanta.toml"


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
        return s.database_url or f"sqlite:///{self.master_db}"

    def responses_url(self, s: Settings) -> str:
        return s.responses_database_url or s.database_url or f"sqlite:///{self.responses_db}"

    def internal_secret(self) -> bytes:
        return bytes.fromhex(self.secret_file.read_text().strip())
