"""Provisioning a server and its devices: ``quanta init``, ``quanta enroll``, ``quanta revoke``.

The commands in :mod:`quanta.cli.provisioning` parse and print; the work is here, through the
store and accounts services (no SQL of its own), so tests and tools can provision without the CLI.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ProvisioningError", "InitResult", "EnrollResult", "init_server", "enroll_device", "revoke_device",
           "parse_ports"]


class ProvisioningError(ValueError):
    """A refusal that changed nothing (or says what it left behind)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def parse_ports(items: list[str] | None) -> dict[str, int]:
    """``NAME=NUMBER`` items (``--port``); a name must be a settable port, a number 1-65535."""
    from quanta.settings import SETTABLE_PORTS

    ports: dict[str, int] = {}
    for item in items or []:
        name, sep, number = item.partition("=")
        name, number = name.strip(), number.strip()
        if not sep or not number.isdigit() or len(number) > 5:
            raise ProvisioningError(f"--port expects NAME=NUMBER, got {item!r}")
        if name not in SETTABLE_PORTS:
            raise ProvisioningError(f"--port {item!r}: unknown port name {name!r}; known: {', '.join(SETTABLE_PORTS)}")
        if not 1 <= int(number) <= 65535:
            raise ProvisioningError(f"--port {item!r}: a port is 1-65535")
        ports[name] = int(number)
    return ports


def _resolvable(name: str) -> bool:
    try:
        socket.getaddrinfo(name, None)
        return True
    except OSError:
        return False


@dataclass
class InitResult:
    root: Path
    settings: Any
    admin_credentials: Path
    warnings: list[str] = field(default_factory=list)


def init_server(root: Path, *, ports: dict[str, int] | None = None, database_url: str | None = None,
                responses_database_url: str | None = None, server_name: str | None = None, switches: int = 1,
                force: bool = False) -> InitResult:
    """Create a server data directory: settings, PKI, databases, SwitchConfiguration, SMTP
    defaults, the Catalog key and the administrator (its generated password in
    ``admin.credentials``, 0600)."""
    from quanta import settings as st
    from quanta.accounts import Accounts, Actor, Conflict, Policy
    from quanta.catalog.app import KEY_FILE
    from quanta.catalog.db import catalog_db_url, open_catalog
    from quanta.catalog.store import add_key, remove_key
    from quanta.coordinator import SmtpConfig, save_smtp
    from quanta.db import make_engine, migrate, store
    from quanta.pki import Pki
    from quanta.roles import FULL_ADMIN

    dd = st.DataDir(root)
    if dd.config.exists() and not force:
        raise ProvisioningError(f"{dd.config} exists: this directory is already initialised (use --force to start over)")
    if dd.root.exists() and not dd.root.is_dir():
        raise ProvisioningError(f"{dd.root} exists and is not a directory")
    merged = st.default_ports() | (ports or {})
    warnings: list[str] = []
    name = server_name or socket.getfqdn()
    if not _resolvable(name):
        warnings.append(f"{name!r} does not resolve here; using 'localhost' (set --server-name)")
        name = "localhost"
    try:
        settings = st.Settings(server_name=name, ports=merged, database_url=database_url,
                               responses_database_url=responses_database_url, switches=switches)
    except ValueError as e:
        raise ProvisioningError(f"invalid settings: {e}") from None
    if force and dd.root.exists():
        for sub in ("pki", "run", "content"):
            shutil.rmtree(dd.root / sub, ignore_errors=True)
        for f in (dd.master_db, dd.responses_db, dd.admin_credentials):
            for suffix in ("", "-wal", "-shm"):
                Path(str(f) + suffix).unlink(missing_ok=True)
    dd.create_private()  # 0700, and every file init creates 0600 (databases, keys, secrets)
    st.save_settings(root, settings)
    Pki(dd.pki).create(name)
    _write_private(dd.secret_file, st.new_internal_secret())
    migrate(dd.master_url(settings), "master")
    migrate(dd.responses_url(settings), "responses")
    master = make_engine(dd.master_url(settings))
    store.set_switches(master, name, settings.ports["switch"], switches)
    save_smtp(master, SmtpConfig(enabled=True, host="localhost", port=settings.port("smtp"), username=None,
                                 password=None, starttls=False, from_addr=f"quanta@{name}",
                                 require_approval_code=False))
    password = secrets.token_urlsafe(18)
    accounts = Accounts(master, Policy.from_settings(settings))
    actor = Actor.local("quanta init", source="cli")
    try:
        accounts.create_user(actor, "admin", password, FULL_ADMIN)
    except Conflict:  # a shared (PostgreSQL) database initialised before: the administrator again
        accounts.update_user(actor, "admin", role=FULL_ADMIN, disabled=False)
        accounts.reset_password(actor, "admin", password)
    # a key for this Master's own use of the co-located Catalog (software normalisation); a shared database
    # initialised before has the earlier directory's key, which this one replaces
    catalog = open_catalog(catalog_db_url(dd.root, settings))
    remove_key(catalog, "master")
    _write_private(dd.root / KEY_FILE, add_key(catalog, "master") + "\n")
    _write_private(dd.admin_credentials, f"username=admin\npassword={password}\n")
    store.audit(master, "quanta init", "init", str(dd.root), ports=settings.ports, switches=switches)
    return InitResult(dd.root, settings, dd.admin_credentials, warnings)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


@dataclass
class EnrollResult:
    device: str
    out_dir: Path
    switches: str
    superseded: list[str]


def check_device_name(device: str) -> str:
    if not device or any(ch in device for ch in "/\\\x00") or len(device) > 255 or device != device.strip():
        raise ProvisioningError(f"invalid device name {device!r}")
    return device


def enroll_device(root: Path, device: str, out_dir: Path, *, switch_host: str | None = None,
                  switch: str | None = None, background_url: str | None = None, replace: bool = False) -> EnrollResult:
    """Issue a device certificate and an interaction-port certificate and write an agent directory.
    The serials are recorded (and, with ``replace``, the old certificates revoked) before any
    certificate exists, so no certificate is ever valid without the Master knowing whose it is."""
    from cryptography import x509

    from quanta.agent.config import interaction_name, write_conf
    from quanta.db import make_engine, store
    from quanta.pki import Pki, Purpose
    from quanta.settings import DataDir, load_settings

    check_device_name(device)
    settings = load_settings(root)
    dd = DataDir(root)
    pki = Pki(dd.pki)
    master = make_engine(dd.master_url(settings))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProvisioningError(f"cannot create the agent directory {out_dir}: {e}; nothing was enrolled") from None
    device_serial, interaction_serial = x509.random_serial_number(), x509.random_serial_number()
    try:
        superseded = store.register_device(master, device, format(device_serial, "x"), format(interaction_serial, "x"),
                                           replace=replace, before_commit=pki.revoke_many)
    except store.DeviceAlreadyEnrolled:
        raise ProvisioningError(
            f"device {device!r} is already enrolled; nothing was changed. To issue it new certificates, run "
            f"'quanta enroll {root} --device {device} --out AGENTDIR --replace' (this revokes every certificate "
            f"issued to it before); to retire it, 'quanta revoke {root} --device {device}'") from None
    try:
        pki.issue(device, out_dir / "device.crt", out_dir / "device.key", serial=device_serial)
        pki.issue(interaction_name(device), out_dir / "interaction.crt", out_dir / "interaction.key",
                  purpose=Purpose.INTERACTION, san=[interaction_name(device)], serial=interaction_serial)
        shutil.copy(pki.ca_crt, out_dir / "ca.crt")
        shutil.copy(pki.signing_pub, out_dir / "signing.pub")
    except OSError as e:
        raise ProvisioningError(f"cannot write the agent directory {out_dir}: {e}; {device!r} is enrolled without "
                                "usable certificates: run again with --replace", 1) from None
    rows = store.switch_rows(master)
    host = switch_host or settings.server_name
    switches = switch or ",".join(f"{switch_host or r['Host']}:{r['Port']}" for r in rows if r["Enabled"]) \
        or f"{host}:{settings.port('switch')}"
    write_conf(out_dir, device_name=device, switches=switches,
               background_url=background_url or f"https://{host}:{settings.port('https')}/Background",
               interaction_port=settings.port("interaction"))
    store.audit(master, "quanta enroll", "re-enroll" if superseded else "enroll", device,
                serial=format(device_serial, "x"), interaction_serial=format(interaction_serial, "x"),
                revoked=sorted(superseded))
    return EnrollResult(device, out_dir, switches, sorted(superseded))


def revoke_device(root: Path, device: str) -> list[str]:
    """Revoke every certificate issued to ``device`` (the CRL is rewritten before the commit);
    the serials revoked."""
    from quanta.db import make_engine, store
    from quanta.pki import Pki
    from quanta.settings import DataDir, load_settings

    dd = DataDir(root)
    master = make_engine(dd.master_url(load_settings(root)))
    serials = store.mark_revoked(master, device, before_commit=Pki(dd.pki).revoke_many)
    if serials is None:
        raise ProvisioningError(f"no enrolled device named {device!r}")
    store.audit(master, "quanta revoke", "revoke", device, serials=serials)
    return list(serials)
