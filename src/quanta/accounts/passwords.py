"""Password hashing: Argon2id (argon2-cffi defaults), as ``quanta.consumer_api.hash_password``
has always used, so every stored hash verifies; a hash made with older parameters is re-hashed on
the next good login (``needs_rehash``)."""

from __future__ import annotations

import functools

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    try:
        return _hasher.check_needs_rehash(stored_hash)
    except (InvalidHashError, ValueError):
        return True


@functools.cache
def _dummy_hash() -> str:
    return _hasher.hash("quanta: no such user; same cost as a real one")


def burn(password: str) -> None:
    """Verify against a dummy hash: an unknown user costs what a known one does."""
    verify_password(_dummy_hash(), password)
