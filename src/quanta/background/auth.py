"""Device authentication for HTTPS requests to the Background Channel (sans-I/O).

The web tier serves browsers too, so its TLS does not demand client certificates. A device
proves itself per request instead: it sends its certificate and a signature, made with its
private key (Ed25519; ECDSA P-256/SHA-256 for certificates issued before devices got Ed25519
keys), over the method, the path and a timestamp. The server checks, before it looks at
anything else, that the certificate was issued by the installation's CA, is within its
validity, is not on the CRL, is a device certificate (``quanta.pki.device_refusal``: an
interaction-port, server or host certificate is not), and that the signature is fresh and valid.
Every refusal of a parsed certificate is logged with the reason, its subject and serial.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from quanta.pki import describe, device_refusal, host_refusal

log = logging.getLogger("quanta.background")

H_CERT = "X-Quanta-Certificate"
H_TIME = "X-Quanta-Timestamp"
H_SIG = "X-Quanta-Signature"
# the same proof by a remote host (its host certificate) on the cross-host links: /Core relay, replication
H_HOST_CERT = "X-Quanta-Host-Certificate"
H_HOST_TIME = "X-Quanta-Host-Timestamp"
H_HOST_SIG = "X-Quanta-Host-Signature"
DEVICE_HEADERS = (H_CERT, H_TIME, H_SIG)
HOST_HEADERS = (H_HOST_CERT, H_HOST_TIME, H_HOST_SIG)
MAX_SKEW = 300.0


class AuthError(Exception):
    pass


def _message(method: str, path: str, stamp: str) -> bytes:
    return f"{method.upper()}\n{path}\n{stamp}".encode()


def sign_request(method: str, path: str, cert_pem: bytes, key_pem: bytes, now: float | None = None,
                 names: tuple[str, str, str] = DEVICE_HEADERS) -> dict[str, str]:
    key = serialization.load_pem_private_key(key_pem, None)
    cert = x509.load_pem_x509_certificate(cert_pem)
    stamp = str(int(time.time() if now is None else now))
    msg = _message(method, path, stamp)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        sig = key.sign(msg)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        sig = key.sign(msg, ec.ECDSA(hashes.SHA256()))
    else:
        raise AuthError("device key must be an Ed25519 or EC key")
    return {names[0]: base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode(),
            names[1]: stamp, names[2]: base64.b64encode(sig).decode()}


@dataclass
class DeviceVerifier:
    ca_file: Path
    crl_file: Path
    names = DEVICE_HEADERS
    what = "Background Channel request"

    @staticmethod
    def refusal(cert: x509.Certificate) -> str | None:
        return device_refusal(cert)

    def __post_init__(self) -> None:
        self._ca = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        self._crl_mtime = -1.0
        self._revoked: set[int] = set()

    def _revoked_serials(self) -> set[int]:
        mtime = self.crl_file.stat().st_mtime
        if mtime != self._crl_mtime:
            crl = x509.load_pem_x509_crl(self.crl_file.read_bytes())
            if not crl.is_signature_valid(self._ca.public_key()):  # type: ignore[arg-type]
                raise AuthError("CRL signature invalid")
            self._revoked = {r.serial_number for r in crl}
            self._crl_mtime = mtime
        return self._revoked

    def verify(self, method: str, path: str, headers: dict[str, str], now: float | None = None) -> str:
        """Return the device name, or raise :class:`AuthError` saying why not."""
        h = {k.lower(): v for k, v in headers.items()}  # HTTP header names are case-insensitive
        try:
            der = base64.b64decode(h[self.names[0].lower()], validate=True)
            stamp = h[self.names[1].lower()]
            sig = base64.b64decode(h[self.names[2].lower()], validate=True)
        except KeyError as e:
            raise AuthError(f"missing authentication header {e.args[0]}") from None
        except (binascii.Error, ValueError):
            raise AuthError("authentication headers are not valid base64") from None
        if len(der) > 8192 or len(sig) > 256 or not stamp.isdigit():
            raise AuthError("malformed authentication headers")
        now = time.time() if now is None else now
        if abs(now - int(stamp)) > MAX_SKEW:
            raise AuthError("request timestamp too far from the server's clock")
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise AuthError("device certificate cannot be parsed") from None
        try:
            self._check(cert, method, path, stamp, sig, now)
        except AuthError as e:
            log.warning("refused %s %s %r: %s (%s)", self.what, method, path[:200], e, describe(cert))
            raise
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(cn[0].value) if cn else ""

    def _check(self, cert: x509.Certificate, method: str, path: str, stamp: str, sig: bytes, now: float) -> None:
        try:
            cert.verify_directly_issued_by(self._ca)
        except (ValueError, TypeError, InvalidSignature):
            raise AuthError("certificate was not issued by this installation's CA") from None
        t = dt.datetime.fromtimestamp(now, dt.timezone.utc)
        if not cert.not_valid_before_utc <= t <= cert.not_valid_after_utc:
            raise AuthError("certificate expired or not yet valid")
        if cert.serial_number in self._revoked_serials():
            raise AuthError("certificate revoked")
        refusal = self.refusal(cert)
        if refusal is not None:
            raise AuthError(refusal)
        pub = cert.public_key()
        msg = _message(method, path, stamp)
        try:
            if isinstance(pub, ed25519.Ed25519PublicKey):
                pub.verify(sig, msg)
            elif isinstance(pub, ec.EllipticCurvePublicKey):
                pub.verify(sig, msg, ec.ECDSA(hashes.SHA256()))
            else:
                raise AuthError("device certificate must hold an Ed25519 or EC key")
        except InvalidSignature:
            raise AuthError("request signature invalid") from None


class HostVerifier(DeviceVerifier):
    """The same check for a remote host on a cross-host link: its host certificate
    (``quanta.pki.Purpose.HOST``) and a fresh signature in the ``X-Quanta-Host-*`` headers."""

    names = HOST_HEADERS
    what = "cross-host request"

    @staticmethod
    def refusal(cert: x509.Certificate) -> str | None:
        return host_refusal(cert)
