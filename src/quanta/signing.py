"""Instruction signing (Ed25519) and the client TLS context.

Kept apart from :mod:`quanta.pki` so the agent loads neither X.509 building nor anything else it
does not need: an idle agent should cost little memory.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


def client_context(ca_file: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Client-side TLS that verifies the server against ``ca_file`` and presents ``cert``."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


class Signer:
    def __init__(self, key_pem: bytes) -> None:
        key = serialization.load_pem_private_key(key_pem, None)
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        self._key = key

    @classmethod
    def from_file(cls, path: Path) -> Signer:
        return cls(path.read_bytes())

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


class Verifier:
    def __init__(self, pub_pem: bytes) -> None:
        key = serialization.load_pem_public_key(pub_pem)
        assert isinstance(key, ed25519.Ed25519PublicKey)
        self._key = key

    @classmethod
    def from_file(cls, path: Path) -> Verifier:
        return cls(path.read_bytes())

    def verify(self, data: bytes, signature: bytes) -> bool:
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            return False
        return True
