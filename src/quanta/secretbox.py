"""Secrets stored in the database (the SMTP password), encrypted with a key kept in the PKI directory.

The key is a Fernet key (AES-128-CBC with HMAC-SHA256, from ``cryptography``) in
``DIR/pki/secrets.key`` (0600), created on first use. A sealed value is stored as
``fernet:<token>``; a value without that prefix is a plain one written before encryption
existed: it is still read (once), and the reader re-seals it (:func:`needs_resealing`).

Which key belongs to a database: a data directory registers its master database's URL when it
builds it (:meth:`quanta.datadir.DataDir.master_url`), so ``load_smtp(engine)`` finds the key
of that installation without every caller passing it; an SQLite database in a data directory
also finds ``pki/`` next to it. With no key known a secret is refused, never stored in clear.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken

PREFIX = "fernet:"
KEY_FILE = "secrets.key"
MAX_PLAIN_BYTES = 4096  # a password or key, not a document; sealed ~5.6 KB (the secret columns are Text)

_lock = threading.Lock()
_by_url: dict[str, Path] = {}  # registered here, or by a DataDir (quanta.datadir.SECRET_KEY_DIRS)
_boxes: dict[Path, Fernet] = {}


class SecretBoxError(RuntimeError):
    pass


def _url_key(url: str | sa.URL) -> str:
    from quanta.db import normalise_url

    u = sa.make_url(normalise_url(url) if isinstance(url, str) else url)
    return u.render_as_string(hide_password=False)


def register(url: str, pki_dir: Path) -> None:
    """The secrets of the database at ``url`` are sealed with the key in ``pki_dir``."""
    with _lock:
        _by_url[_url_key(url)] = Path(pki_dir)


def key_dir_for(engine: sa.Engine) -> Path | None:
    from quanta.datadir import SECRET_KEY_DIRS

    want = _url_key(engine.url)
    with _lock:
        found = _by_url.get(want)
    if found is None:
        found = next((d for url, d in list(SECRET_KEY_DIRS.items()) if _url_key(url) == want), None)
    if found is not None:
        return found
    db = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if db and db != ":memory:":
        pki = Path(db).resolve().parent / "pki"
        if (pki / "ca.crt").exists():
            return pki
    return None


def box(pki_dir: Path) -> Fernet:
    """The Fernet of the key in ``pki_dir``, creating the key (0600, never overwritten) on first use."""
    pki_dir = Path(pki_dir)
    with _lock:
        f = _boxes.get(pki_dir)
        if f is not None:
            return f
        path = pki_dir / KEY_FILE
        if not path.exists():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another process made it first: use theirs
            else:
                with os.fdopen(fd, "wb") as out:
                    out.write(Fernet.generate_key() + b"\n")
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        try:
            f = Fernet(path.read_bytes().strip())
        except ValueError:
            raise SecretBoxError(f"{path} is not a valid secrets key") from None
        _boxes[pki_dir] = f
        return f


def _box_for(engine: sa.Engine) -> Fernet:
    d = key_dir_for(engine)
    if d is None:
        raise SecretBoxError("no secrets key is known for this database (open it through its data directory)")
    return box(d)


def seal(engine: sa.Engine, plain: str | None) -> str | None:
    """``plain`` encrypted for storage in ``engine``'s database (None stays None)."""
    if plain is None:
        return None
    if len(plain.encode()) > MAX_PLAIN_BYTES:
        raise ValueError(f"a stored secret is at most {MAX_PLAIN_BYTES} bytes (this one is {len(plain.encode())}); "
                         "nothing was changed")
    return PREFIX + _box_for(engine).encrypt(plain.encode()).decode()


def unseal(engine: sa.Engine, stored: str | None) -> str | None:
    """The plain secret of a stored value: decrypted if sealed, as it is if written before sealing."""
    if stored is None or not stored.startswith(PREFIX):
        return stored
    try:
        return _box_for(engine).decrypt(stored[len(PREFIX):].encode()).decode()
    except InvalidToken:
        raise SecretBoxError("a stored secret does not decrypt with this installation's secrets key "
                             "(pki/secrets.key replaced or from another installation?)") from None


def needs_resealing(stored: str | None) -> bool:
    """A plain value written before secrets were sealed (to be re-written sealed)."""
    return stored is not None and not stored.startswith(PREFIX)


__all__ = ["KEY_FILE", "MAX_PLAIN_BYTES", "PREFIX", "SecretBoxError", "box", "needs_resealing", "register", "seal", "unseal"]
