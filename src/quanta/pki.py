"""Quanta's own PKI: a CA, the server certificate, device certificates, the CRL, and the
Ed25519 key that signs every instruction the server issues.

Files under ``DIR/pki``::

    ca.crt ca.key            the issuing CA (keep ca.key offline in production)
    server.crt server.key    web tier, Switch and Background Channel certificate
    host.crt host.key        a remote host's client certificate (Purpose.HOST: hub, cross-host links)
    secrets.key              Fernet key sealing secrets stored in the database (quanta.secretbox)
    crl.pem                  certificate revocation list, re-signed on every revocation
    revoked.json             serial -> device name, the CRL's source of truth
    signing.key signing.pub  instruction signing key pair (Ed25519)

Every certificate has one purpose (:class:`Purpose`), spelled in its extended key usage:

- a **device** certificate carries ``clientAuth`` and :data:`DEVICE_PURPOSE`; only these are
  accepted on the Switch and the Background Channel (:func:`device_refusal`);
- an **interaction** certificate (the agent's local interaction port) carries ``serverAuth`` only;
- a **server** certificate (web tier, Switch, remote hosts' certificates) carries ``serverAuth`` only;
- a **host** certificate (a remote Response Stack's or DMZ server's identity towards the Master hub
  and the cross-host links) carries ``clientAuth`` and :data:`HOST_PURPOSE` (:func:`host_refusal`).

Certificates issued before purposes existed carry no :data:`DEVICE_PURPOSE` and are refused as
devices; the operator re-enrols such a device with ``quanta enroll --replace``.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import json
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from quanta.signing import Signer, Verifier, client_context  # re-exported: one import for server code

# Every TLS listener's policy (:func:`harden_server_context`): TLS 1.2 and 1.3 only; in TLS 1.2
# ephemeral ECDH with AEAD ciphers only (no CBC, so no LUCKY13; no RSA key exchange; no SHA-1 MACs).
# TLS 1.3's suites are all AEAD (AES-GCM, ChaCha20-Poly1305) and OpenSSL's default list is kept.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!SHA1:!CBC"
CRL_PATH = "/crl.pem"  # on the HTTP port (quanta.http_tier), the seed's CRL distribution point

CA_DAYS = 3650
LEAF_DAYS = 825
CRL_DAYS = 30

# The extended key usage that makes a certificate a Quanta device certificate. It lives under the
# UUID arc 2.25 (ITU-T X.667 / ISO/IEC 9834-8: an OID made of a random UUID needs no registration
# and collides with no one's); UUID 9e514508-f00f-45f2-aead-8a388842c950.
DEVICE_PURPOSE = x509.ObjectIdentifier("2.25.210439999573940847600489727119430175056")
# The extended key usage of a Quanta host certificate: a remote Response Stack's or DMZ server's
# identity on the Master hub and the cross-host links (UUID 6f1c2b1e-3d0a-4c1e-9a55-2c7e8f4d9b31).
HOST_PURPOSE = x509.ObjectIdentifier("2.25.147690566383513503837353854691684752177")
REENROL_HINT = "re-enrol the device with 'quanta enroll DIR --device NAME --out AGENTDIR --replace'"


class Purpose(str, enum.Enum):
    """What a certificate is for; the value is what the Master database records."""

    DEVICE = "device"  # an agent's identity on the Switch and the Background Channel
    INTERACTION = "interaction"  # TLS of the agent's local interaction port
    SERVER = "server"  # a server's TLS (web tier, Switch, a remote host)
    HOST = "host"  # a remote host's client identity on the Master hub and the cross-host links


_EKU: dict[Purpose, x509.ExtendedKeyUsage] = {
    Purpose.DEVICE: x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, DEVICE_PURPOSE]),
    Purpose.INTERACTION: x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
    Purpose.SERVER: x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
    Purpose.HOST: x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, HOST_PURPOSE]),
}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256 for the CA and server certificates: fast handshakes (DESIGN §6: a whole-fleet
    # reconnect is CPU bound) and what every TLS client accepts.
    return ec.generate_private_key(ec.SECP256R1())


def new_client_key() -> ed25519.Ed25519PrivateKey:
    """Key for a client-only certificate (devices, Switches' and tools' client certificates).

    Ed25519: a Switch keeps every connected device's certificate parsed for the connection's
    life, and an Ed25519 public key is a 32-byte value where a P-256 key carries a copy of its
    curve group (about 2 KiB less per connection); signing and verifying cost about the same.
    """
    return ed25519.Ed25519PrivateKey.generate()


@dataclass(frozen=True)
class Pki:
    root: Path  # DIR/pki

    ca_crt = property(lambda self: self.root / "ca.crt")
    ca_key = property(lambda self: self.root / "ca.key")
    server_crt = property(lambda self: self.root / "server.crt")
    server_key = property(lambda self: self.root / "server.key")
    host_crt = property(lambda self: self.root / "host.crt")
    host_key = property(lambda self: self.root / "host.key")
    crl = property(lambda self: self.root / "crl.pem")
    revoked_index = property(lambda self: self.root / "revoked.json")
    signing_key = property(lambda self: self.root / "signing.key")
    signing_pub = property(lambda self: self.root / "signing.pub")

    # ---------------------------------------------------------------- creation
    def create(self, server_name: str, extra_names: list[str] | None = None) -> None:
        """Create the CA, server certificate, empty CRL and signing key."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        ca_key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Quanta"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"Quanta CA ({server_name})")])
        ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(_now() - dt.timedelta(minutes=5))
              .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False,
                                           encipher_only=False, decipher_only=False), critical=True)
              .add_extension(ski, critical=False)
              .sign(ca_key, hashes.SHA256()))
        _write_private(self.ca_key, _key_pem(ca_key))
        self.ca_crt.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        names = [server_name, "localhost", "127.0.0.1", *(extra_names or [])]
        self.issue(server_name, self.server_crt, self.server_key, purpose=Purpose.SERVER, san=names)
        self.issue(server_name, self.host_crt, self.host_key, purpose=Purpose.HOST)
        self.revoked_index.write_text("{}")
        self.write_crl()
        sk = ed25519.Ed25519PrivateKey.generate()
        _write_private(self.signing_key, _key_pem(sk))
        self.signing_pub.write_bytes(sk.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def ensure_host_certificate(self, server_name: str) -> bool:
        """Issue this host's host certificate if it has none and holds the CA key (a Master made
        before host certificates existed); True if one was issued."""
        if self.host_crt.exists() or not self.ca_key.exists():
            return False
        self.issue(server_name, self.host_crt, self.host_key, purpose=Purpose.HOST)
        return True

    def crl_url(self) -> str | None:
        """Where the CRL of this CA is published: the HTTP port of the server whose data directory
        holds this PKI (``http://<server name>[:<http port>]/crl.pem``), None outside a data directory."""
        root = self.root.parent
        if not (root / "quanta.toml").exists():
            return None
        from quanta.settings import load_settings  # lazy: settings is heavier than this module

        s = load_settings(root)
        port = s.port("http")
        return f"http://{s.server_name}{'' if port == 80 else f':{port}'}{CRL_PATH}"

    def _load_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        ca = x509.load_pem_x509_certificate(self.ca_crt.read_bytes())
        key = serialization.load_pem_private_key(self.ca_key.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return ca, key

    def issue(self, common_name: str, crt_path: Path, key_path: Path, *, purpose: Purpose = Purpose.DEVICE,
              san: list[str] | None = None, serial: int | None = None) -> x509.Certificate:
        """Issue a leaf certificate for ``purpose`` signed by the CA; returns it.

        ``serial``: the serial to use (enrolment records it in the Master database before the
        certificate exists, so no certificate is ever valid without being tracked); default random.
        """
        ca, ca_key = self._load_ca()
        key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey = \
            new_client_key() if purpose is Purpose.DEVICE else _new_key()
        cert = leaf_certificate(ca, ca_key, common_name, key.public_key(), purpose=purpose, san=san,
                                serial=serial, crl_url=self.crl_url())
        _write_private(key_path, _key_pem(key))
        crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert

    # ------------------------------------------------------------- revocation
    def revoked(self) -> dict[str, str]:
        """Serial (hex) -> device name for every revoked certificate."""
        if not self.revoked_index.exists():
            return {}
        return json.loads(self.revoked_index.read_text())

    def revoke(self, serial: int, device: str) -> None:
        self.revoke_many({format(serial, "x"): device})

    def revoke_many(self, serials: Mapping[str, str]) -> None:
        """Put these certificates (serial in hex -> device name, as the Master database records them)
        on the CRL: one index write, one CRL signature."""
        index = self.revoked()
        index.update({format(int(serial, 16), "x"): device for serial, device in serials.items()})
        _atomic_write(self.revoked_index, json.dumps(index, indent=1).encode())
        self.write_crl()

    def write_crl(self) -> None:
        """Sign and write the CRL.

        Each CRL's ``thisUpdate`` is later than the previous one's (back-dated by up to a minute
        against clock skew, then at least a second after the last), so a server that adds the new
        CRL to a live certificate store, where OpenSSL uses the latest, applies it at once.
        """
        ca, ca_key = self._load_ca()
        this_update = (_now() - dt.timedelta(minutes=1)).replace(microsecond=0)
        if self.crl.exists():
            try:
                previous = x509.load_pem_x509_crl(self.crl.read_bytes()).last_update_utc
                this_update = min(max(this_update, previous + dt.timedelta(seconds=1)), _now().replace(microsecond=0))
            except ValueError:
                pass  # an unreadable CRL is replaced
        builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
                   .last_update(this_update)
                   .next_update(_now() + dt.timedelta(days=CRL_DAYS)))
        for serial_hex in self.revoked():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(serial_hex, 16))
                .revocation_date(_now() - dt.timedelta(minutes=1)).build())
        crl = builder.sign(ca_key, hashes.SHA256())
        _atomic_write(self.crl, crl.public_bytes(serialization.Encoding.PEM))

    # ------------------------------------------------------------ TLS contexts
    def server_context(self, *, require_client_cert: bool) -> ssl.SSLContext:
        """Server-side TLS; with ``require_client_cert`` it is mutual TLS for devices: CRL checks,
        and the handshake refuses any certificate without the device purpose (where OpenSSL's
        verification can be reached, see :func:`quanta.switch.tls.refuse_non_devices`)."""
        ctx = tls_server_context(self.server_crt, self.server_key)
        if require_client_cert:
            from quanta.switch.tls import refuse_non_devices  # lazy: quanta.switch imports this module

            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=str(self.ca_crt))
            ctx.load_verify_locations(cafile=str(self.crl))
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            refuse_non_devices(ctx)
        return ctx


def harden_server_context(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Apply Quanta's TLS policy to a server context: TLS 1.2 and 1.3 only, AEAD suites with
    ephemeral ECDH only (:data:`TLS12_CIPHERS`), no compression, no renegotiation, the server's
    order of preference. Every listener's context goes through here (web tier, Coordinator,
    Switch, hub, Catalog over HTTPS, remote hosts' links)."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    return ctx


def tls_server_context(certfile: Path | str, keyfile: Path | str, *, client_ca: Path | str | None = None,
                       crl: Path | str | None = None) -> ssl.SSLContext:
    """A server context under Quanta's TLS policy for ``certfile``/``keyfile``; with ``client_ca``
    the peer must present a certificate issued by that CA (mutual TLS), checked against ``crl``
    if given."""
    ctx = harden_server_context(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(str(certfile), str(keyfile))
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(client_ca))
        if crl is not None:
            ctx.load_verify_locations(cafile=str(crl))
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def leaf_certificate(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str,
                     public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey, *, purpose: Purpose,
                     san: list[str] | None = None, serial: int | None = None,
                     not_before: dt.datetime | None = None, crl_url: str | None = None) -> x509.Certificate:
    """A leaf certificate for ``purpose``, signed by the CA (the one place a leaf is built); with
    ``crl_url``, it names the CA's CRL distribution point (what a relying party, a TLS scanner
    included, fetches to learn whether it is revoked)."""
    not_before = not_before or _now() - dt.timedelta(minutes=5)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Quanta"),
                                        x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca.subject).public_key(public_key)
               .serial_number(serial if serial is not None else x509.random_serial_number())
               .not_valid_before(not_before)
               .not_valid_after(not_before + dt.timedelta(days=LEAF_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if purpose is not Purpose.DEVICE or san:
        # the names a server is checked against; a device is known by its CN, and a Switch keeps every
        # device certificate parsed, so a device certificate carries no SAN it never uses
        alt: list[x509.GeneralName] = []
        for n in san or [common_name]:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    if crl_url is not None:
        builder = builder.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(crl_url)], relative_name=None, reasons=None,
            crl_issuer=None)]), critical=False)
    return (builder
            .add_extension(_EKU[purpose], critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))


def device_refusal(cert: x509.Certificate) -> str | None:
    """Why ``cert`` is not a device certificate, or None if it is (it carries :data:`DEVICE_PURPOSE`).

    Checks the purpose only: the issuer, validity and revocation are the caller's (the TLS
    handshake, or the Background Channel's verifier)."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return f"not a device certificate (no extended key usage; {REENROL_HINT})"
    except ValueError:
        return "not a device certificate (its extensions cannot be parsed)"
    if DEVICE_PURPOSE in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku:
        return None
    if ExtendedKeyUsageOID.SERVER_AUTH in eku:
        return "not a device certificate (a server or interaction-port certificate)"
    return f"not a device certificate (no Quanta device purpose: issued before certificate purposes? {REENROL_HINT})"


def host_refusal(cert: x509.Certificate) -> str | None:
    """Why ``cert`` is not a Quanta host certificate (:data:`HOST_PURPOSE`), or None if it is. A
    device certificate, issued by the same CA for client authentication, is not one."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "not a host certificate (no extended key usage)"
    except ValueError:
        return "not a host certificate (its extensions cannot be parsed)"
    if HOST_PURPOSE in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku:
        return None
    if DEVICE_PURPOSE in eku:
        return "not a host certificate (a device certificate)"
    return "not a host certificate (no Quanta host purpose: re-export the host with 'quanta host export')"


def peer_device(der: bytes) -> tuple[int, str, str | None]:
    """(serial, CN, :func:`device_refusal`) of a peer's DER certificate, parsed once."""
    cert = x509.load_der_x509_certificate(der)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return cert.serial_number, str(cn[0].value) if cn else "", device_refusal(cert)


def cert_serial_and_name(der: bytes) -> tuple[int, str]:
    serial, name, _ = peer_device(der)
    return serial, name


def describe(cert: x509.Certificate) -> str:
    """A certificate's subject and serial for a log line (the subject quoted: a peer chose it)."""
    return f"subject {cert.subject.rfc4514_string()!r}, serial {cert.serial_number:x}"


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())
