"""Batch enrolment: one certificate (own Ed25519 key, CN = device name) per simulated device.

A fleet directory holds what every simulated agent needs::

    FLEETDIR/fleet.json        device names, the Switch list, the server's data directory
    FLEETDIR/ca.crt            the CA the agents verify the Switch against
    FLEETDIR/signing.pub       the key that signs instructions
    FLEETDIR/devices/NAME.pem  the device's private key followed by its certificate

Issuing is ~70 µs per certificate with ``cryptography`` (Ed25519 key generation plus an ECDSA
signature by the CA), so 50,000 devices take a few seconds in one process; registering them
in the master database is one bulk insert.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from quanta.pki import Pki, Purpose, leaf_certificate, new_client_key

FLEET_FILE = "fleet.json"


@dataclass(frozen=True)
class Fleet:
    root: Path
    names: list[str]
    switches: list[tuple[str, int]]

    ca = property(lambda self: self.root / "ca.crt")
    signing_pub = property(lambda self: self.root / "signing.pub")

    def pem(self, name: str) -> Path:
        return self.root / "devices" / f"{name}.pem"

    @classmethod
    def load(cls, root: Path) -> Fleet:
        root = Path(root)
        f = root / FLEET_FILE
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: create the fleet with 'quanta enroll-batch'")
        data = json.loads(f.read_text())
        return cls(root, list(data["devices"]), [(h, int(p)) for h, p in data["switches"]])


def issue_batch(pki: Pki, names: list[str], out: Path, serials: list[int] | None = None) -> list[tuple[str, str]]:
    """Write ``out/devices/NAME.pem`` (a device certificate, ``serials[i]`` or random) for every name;
    return ``(name, serial hex)`` pairs."""
    ca, ca_key = pki._load_ca()
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    d = out / "devices"
    d.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i, name in enumerate(names):
        key = new_client_key()
        cert = leaf_certificate(ca, ca_key, name, key.public_key(), purpose=Purpose.DEVICE,
                                serial=serials[i] if serials is not None else None, not_before=now)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM)
        fd = os.open(d / f"{name}.pem", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        pairs.append((name, format(cert.serial_number, "x")))
    return pairs


def enroll_batch(root: Path, prefix: str, count: int, out: Path, *, start: int = 1,
                 switch_host: str | None = None, replace: bool = False) -> tuple[Fleet, float]:
    """Enrol ``count`` devices named ``{prefix}{n:06d}`` into the server at ``root``.

    As ``quanta enroll``: names already enrolled are refused (``store.DeviceAlreadyEnrolled``, before
    any certificate is issued) unless ``replace``, which revokes their earlier certificates."""
    from quanta.db import make_engine, store
    from quanta.settings import DataDir, load_settings

    t0 = time.perf_counter()
    settings = load_settings(root)
    dd = DataDir(root)
    pki = Pki(dd.pki)
    master = make_engine(dd.master_url(settings))
    width = max(6, len(str(start + count - 1)))
    names = [f"{prefix}{n:0{width}d}" for n in range(start, start + count)]
    out.mkdir(parents=True, exist_ok=True)
    # recorded (and old certificates revoked) before any certificate exists, as 'quanta enroll' does
    serials = [x509.random_serial_number() for _ in names]
    try:
        superseded = store.register_devices(master, [(n, format(s, "x")) for n, s in zip(names, serials)],
                                            replace=replace, before_commit=pki.revoke_many)
        issue_batch(pki, names, out, serials)
        shutil.copy(pki.ca_crt, out / "ca.crt")
        shutil.copy(pki.signing_pub, out / "signing.pub")
        host = switch_host or settings.server_name
        switches = [(host, int(r["Port"])) for r in store.switch_rows(master) if r["Enabled"]] or \
            [(host, settings.port("switch"))]
        existing: list[str] = []
        if (out / FLEET_FILE).exists():
            existing = [n for n in json.loads((out / FLEET_FILE).read_text()).get("devices", [])
                        if n not in set(names)]
        (out / FLEET_FILE).write_text(json.dumps({"server": str(dd.root), "switches": switches,
                                                  "devices": existing + names}))
        store.audit(master, "quanta enroll-batch", "enroll-batch", f"{prefix}*", count=count,
                    first=names[0] if names else None, last=names[-1] if names else None,
                    revoked=len(superseded))
    finally:
        master.dispose()
    return Fleet.load(out), time.perf_counter() - t0
