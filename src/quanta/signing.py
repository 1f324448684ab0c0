"""Instruction signing (Ed25519) and the client TLS context.

Kept apart from :mod:`quanta.pki` so the agent loads neither X.509 building nor anything else it
does not need: an idle agent should cost little memory.
"""

from __future__ import annotations

import base64
import binascii
import ssl
from pathlib import Path
from typing import Any

# An Ed25519 SubjectPublicKeyInfo is this 12-byte DER prefix and the 32-byte key.
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


class ResumingContext(ssl.SSLContext):
    """A client context that offers the TLS session of its previous connection (set ``session``
    after a connection is up; with TLS 1.3 the ticket arrives after the handshake, so read it
    once the first message has come)."""

    session: ssl.SSLSession | None = None

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):  # type: ignore[no-untyped-def,override]
        return super().wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname,
                                session=session or self.session)


def client_context(ca_file: Path, cert: Path | None = None, key: Path | None = None, *,
                   resuming: bool = False) -> ssl.SSLContext:
    """Client-side TLS that verifies the server against ``ca_file`` and presents ``cert``;
    ``resuming``: a :class:`ResumingContext`."""
    ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT) if resuming else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


class Signer:
    def __init__(self, key_pem: bytes) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        key = serialization.load_pem_private_key(key_pem, None)
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        self._key = key

    @classmethod
    def from_file(cls, path: Path) -> Signer:
        return cls(path.read_bytes())

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    @property
    def fingerprint(self) -> str:
        """:func:`fingerprint` of this key's public half."""
        from cryptography.hazmat.primitives import serialization

        return fingerprint(self._key.public_key().public_bytes(serialization.Encoding.PEM,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo))


class Verifier:
    """Ed25519 verification on the agent, with PyNaCl (libsodium). The PEM is checked at
    construction; PyNaCl is loaded at the first verification. (``cryptography``, which signs on
    the server, would add ~7.5 MB to every agent that has verified one instruction; PyNaCl adds
    under 1 MB. Both implement RFC 8032, so either verifies the other's signatures.)"""

    def __init__(self, pub_pem: bytes) -> None:
        self._raw = _ed25519_public_raw(pub_pem)
        self._key: Any = None

    @classmethod
    def from_file(cls, path: Path) -> Verifier:
        return cls(path.read_bytes())

    def verify(self, data: bytes, signature: bytes) -> bool:
        from nacl.exceptions import BadSignatureError

        if self._key is None:
            from nacl.signing import VerifyKey

            self._key = VerifyKey(self._raw)
        try:
            self._key.verify(data, signature)
        except (BadSignatureError, ValueError, TypeError):  # a wrong-length signature is a ValueError
            return False
        return True


def fingerprint(pub_pem: bytes) -> str:
    """An Ed25519 public key's fingerprint: the first 32 hex digits of the SHA-256 of its 32 raw
    bytes (ValueError when the PEM is not such a key)."""
    import hashlib

    return hashlib.sha256(_ed25519_public_raw(pub_pem)).hexdigest()[:32]


def _ed25519_public_raw(pem: bytes) -> bytes:
    """The 32 raw key bytes of a PEM ``PUBLIC KEY`` holding an Ed25519 key; ValueError otherwise."""
    lines = pem.decode("ascii", "replace").strip().splitlines()
    if len(lines) < 3 or lines[0].strip() != "-----BEGIN PUBLIC KEY-----" or lines[-1].strip() != "-----END PUBLIC KEY-----":
        raise ValueError("not a PEM public key")
    try:
        der = base64.b64decode("".join(x.strip() for x in lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not a PEM public key: bad base64") from None
    if len(der) != 44 or not der.startswith(_ED25519_SPKI_PREFIX):
        raise ValueError("not an Ed25519 public key")
    return der[12:]
