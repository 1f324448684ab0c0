"""Batch enrolment: one certificate (own Ed25519 key, CN = device name) per simulated device.

A fleet directory holds what every simulated agent needs::

    FLEETDIR/fleet.json        device names, the Switch list, the server's data directory, and
                               where each device's PEM is in devices.pack (offset, length)
    FLEETDIR/ca.crt            the CA the agents verify the Switch against
    FLEETDIR/signing.pub       the key that signs instructions
    FLEETDIR/devices.pack      every device's private key followed by its certificate (PEM),
                               one after the other; re-enrolling a name appends its new PEM

Fleets written before the pack have ``FLEETDIR/devices/NAME.pem`` instead, which is still read.
One file, not one per device: creating 100,000 small files took ~6 ms each on this machine's
loaded disk (10 minutes), against well under a millisecond of CPU to issue a certificate
(Ed25519 key generation plus an ECDSA signature by the CA). Registering the devices in the
master database is one bulk insert.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from quanta.pki import Pki, Purpose, leaf_certificate, new_client_key

FLEET_FILE = "fleet.json"
PACK_FILE = "devices.pack"


@dataclass(frozen=True)
class Fleet:
    root: Path
    names: list[str]
    switches: list[tuple[str, int]]
    index: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (offset, length) in the pack

    ca = property(lambda self: self.root / "ca.crt")
    signing_pub = property(lambda self: self.root / "signing.pub")
    pack = property(lambda self: self.root / PACK_FILE)

    def pem(self, name: str) -> Path:
        """The per-device file of a fleet written before the pack."""
        return self.root / "devices" / f"{name}.pem"

    def pem_bytes(self, name: str) -> bytes:
        """The device's private key and certificate (PEM). KeyError if the fleet has no such device."""
        at = self.index.get(name)
        if at is None:
            try:
                return self.pem(name).read_bytes()
            except FileNotFoundError:
                raise KeyError(name) from None
        offset, length = at
        fd = os.open(self.pack, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    @classmethod
    def load(cls, root: Path) -> Fleet:
        root = Path(root)
        f = root / FLEET_FILE
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: create the fleet with 'quanta enroll-batch'")
        data = json.loads(f.read_text())
        index = {n: (int(o), int(k)) for n, (o, k) in data.get("pack", {}).items()}
        return cls(root, list(data["devices"]), [(h, int(p)) for h, p in data["switches"]], index)


PARALLEL_FROM = 2000  # certificates; below this, issuing in one process is quicker than starting workers
CHUNK = 2500


def _issue(pki_root: str, names: list[str], serials: list[int] | None, not_before: dt.datetime) -> list[bytes]:
    """PEM (key + certificate) for each name; runs in a worker process too."""
    ca, ca_key = Pki(Path(pki_root))._load_ca()
    out = []
    for i, name in enumerate(names):
        key = new_client_key()
        cert = leaf_certificate(ca, ca_key, name, key.public_key(), purpose=Purpose.DEVICE,
                                serial=serials[i] if serials is not None else None, not_before=not_before)
        out.append(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM))
    return out


def issue_batch(pki: Pki, names: list[str], out: Path, serials: list[int] | None = None,
                workers: int | None = None) -> dict[str, tuple[int, int]]:
    """Append a device certificate and key (``serials[i]`` or a random serial) for every name to
    ``out/devices.pack``; return where each went: name -> (offset, length). Large batches are
    issued by one worker process per core, in chunks, written in order as they come back."""
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    chunks = [(names[i:i + CHUNK], serials[i:i + CHUNK] if serials is not None else None)
              for i in range(0, len(names), CHUNK)]
    where: dict[str, tuple[int, int]] = {}
    fd = os.open(out / PACK_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab", buffering=1 << 20) as f:
        offset = f.seek(0, os.SEEK_END)

        def write(chunk: list[str], pems: list[bytes]) -> None:
            nonlocal offset
            for name, pem in zip(chunk, pems):
                f.write(pem)
                where[name] = (offset, len(pem))
                offset += len(pem)

        if len(names) < PARALLEL_FROM or workers <= 1:
            for chunk, ser in chunks:
                write(chunk, _issue(str(pki.root), chunk, ser, now))
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # fork: a worker needs nothing but this module and the CA (no __main__ to re-import)
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
                for (chunk, _), pems in zip(chunks, pool.map(_issue, [str(pki.root)] * len(chunks),
                                                              [c for c, _ in chunks], [s for _, s in chunks],
                                                              [now] * len(chunks))):
                    write(chunk, pems)
    return where


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
        where = issue_batch(pki, names, out, serials)
        shutil.copy(pki.ca_crt, out / "ca.crt")
        shutil.copy(pki.signing_pub, out / "signing.pub")
        host = switch_host or settings.server_name
        switches = [(host, int(r["Port"])) for r in store.switch_rows(master) if r["Enabled"]] or \
            [(host, settings.port("switch"))]
        existing: list[str] = []
        pack: dict[str, list[int]] = {}
        if (out / FLEET_FILE).exists():
            old = json.loads((out / FLEET_FILE).read_text())
            new = set(names)
            existing = [n for n in old.get("devices", []) if n not in new]
            pack = {n: at for n, at in old.get("pack", {}).items() if n not in new}
        pack.update({n: list(at) for n, at in where.items()})
        tmp = out / (FLEET_FILE + ".tmp")
        tmp.write_text(json.dumps({"server": str(dd.root), "switches": switches, "devices": existing + names,
                                   "pack": pack}))
        os.replace(tmp, out / FLEET_FILE)
        store.audit(master, "quanta enroll-batch", "enroll-batch", f"{prefix}*", count=count,
                    first=names[0] if names else None, last=names[-1] if names else None,
                    revoked=len(superseded))
    finally:
        master.dispose()
    return Fleet.load(out), time.perf_counter() - t0
