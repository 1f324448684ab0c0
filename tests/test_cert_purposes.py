"""Certificates have purposes; revoking a device revokes every certificate issued to it.

Only device certificates (clientAuth and Quanta's device purpose) are accepted by the Switch and the
Background Channel; the agent's interaction-port certificate, the server certificate and a remote
host's certificate are refused, at the TLS handshake where it is reached, and before the first frame
(or any content) in any case, each with a log line naming the reason, the subject and the serial.
Enrolment records every certificate it issues, so ``quanta revoke`` puts all of them on the CRL;
enrolling an existing name is refused unless ``--replace``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

import quanta.pki as qpki
from conftest import Server, make_server, quanta, wait_until
from quanta.agent.config import interaction_name
from quanta.background.auth import AuthError, DeviceVerifier, sign_request
from quanta.db import make_engine, migrate, store, tables
from quanta.pki import DEVICE_PURPOSE, Pki, Purpose, device_refusal, load_cert

CLIENT, SERVER = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH
# What certificates looked like before purposes: devices clientAuth only, servers (and so the
# interaction port) serverAuth and clientAuth.
LEGACY_EKU = {Purpose.DEVICE: [CLIENT], Purpose.SERVER: [SERVER, CLIENT]}


def _eku(path: Path) -> list[x509.ObjectIdentifier]:
    return list(load_cert(path).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _serial(path: Path) -> str:
    return format(load_cert(path).serial_number, "x")


def _legacy(pki: Pki, monkeypatch: pytest.MonkeyPatch, purpose: Purpose, name: str, out: Path,
            san: list[str] | None = None) -> tuple[Path, Path]:
    """A certificate as issued before purposes existed (same key type, same extensions)."""
    with monkeypatch.context() as m:
        m.setitem(qpki._EKU, purpose, x509.ExtendedKeyUsage(LEGACY_EKU[purpose]))
        pki.issue(name, out / f"{name}.crt", out / f"{name}.key", purpose=purpose, san=san)
    return out / f"{name}.crt", out / f"{name}.key"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    p = Pki(tmp_path / "pki")
    p.create("localhost")
    return p


@pytest.fixture
def certs(pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[Path, Path]]:
    """One certificate of every kind the installation issues or issued: label -> (crt, key)."""
    out = tmp_path / "certs"
    out.mkdir()
    pki.issue("dev1", out / "dev1.crt", out / "dev1.key")
    pki.issue(interaction_name("dev1"), out / "int.crt", out / "int.key", purpose=Purpose.INTERACTION,
              san=[interaction_name("dev1")])
    pki.issue("host2", out / "host.crt", out / "host.key", purpose=Purpose.SERVER, san=["host2", "127.0.0.1"])
    return {"device": (out / "dev1.crt", out / "dev1.key"), "interaction": (out / "int.crt", out / "int.key"),
            "server": (pki.server_crt, pki.server_key), "host": (out / "host.crt", out / "host.key"),
            "legacy device": _legacy(pki, monkeypatch, Purpose.DEVICE, "old-dev", out),
            "legacy server": _legacy(pki, monkeypatch, Purpose.SERVER, "old-srv", out, ["old-srv"]),
            "legacy interaction": _legacy(pki, monkeypatch, Purpose.SERVER, interaction_name("old-dev"), out,
                                          [interaction_name("old-dev")])}


NOT_DEVICES = ("interaction", "server", "host", "legacy device", "legacy server", "legacy interaction")


# ----------------------------------------------------------------------------------- issuing
def test_each_certificate_carries_only_its_purpose(pki: Pki, certs: dict[str, tuple[Path, Path]]) -> None:
    assert _eku(certs["device"][0]) == [CLIENT, DEVICE_PURPOSE]
    for label in ("interaction", "server", "host"):
        assert _eku(certs[label][0]) == [SERVER], label  # no clientAuth, no device purpose
    assert device_refusal(load_cert(certs["device"][0])) is None
    for label in ("interaction", "server", "host", "legacy server", "legacy interaction"):
        assert "a server or interaction-port certificate" in str(device_refusal(load_cert(certs[label][0]))), label
    legacy = device_refusal(load_cert(certs["legacy device"][0]))
    assert legacy is not None and "no Quanta device purpose" in legacy and "--replace" in legacy
    # the OID is under the UUID arc (ITU-T X.667): nobody else's, no registration needed
    assert DEVICE_PURPOSE.dotted_string.startswith("2.25.")


def test_a_certificate_without_extended_key_usage_is_not_a_device(pki: Pki) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ca, ca_key = pki._load_ca()
    key = ed25519.Ed25519PrivateKey.generate()
    bare = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(qpki._now()).not_valid_after(qpki._now() + qpki.dt.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    assert "no extended key usage" in str(device_refusal(bare))


# ------------------------------------------------------------------------- TLS handshake
@contextlib.contextmanager
def _tls_server(ctx: ssl.SSLContext) -> Iterator[int]:
    """A real socket served with ``ctx``; each connection whose handshake passes is answered b"ok"."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        srv.shutdown(socket.SHUT_RDWR)
        srv.close()
        t.join(5)


def _tls_answer(port: int, ca: Path, crt: Path, key: Path) -> str:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(crt, key)
    try:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="localhost") as s:
            return s.recv(10).decode() or "closed"
    except (ssl.SSLError, OSError) as e:
        return f"refused: {e}"


def _logged(caplog: pytest.LogCaptureFixture, cert: x509.Certificate) -> str:
    """The one log line that names this certificate's serial (waited for: the server is a thread)."""
    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if f"serial {cert.serial_number:x}" in r.getMessage()]
    wait_until(lambda: lines(), 5, f"a log line for serial {cert.serial_number:x}")
    [line] = lines()
    return line


def test_handshake_accepts_only_device_certificates(pki: Pki, certs: dict[str, tuple[Path, Path]],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="quanta.switch")
    with _tls_server(pki.server_context(require_client_cert=True)) as port:
        assert _tls_answer(port, pki.ca_crt, *certs["device"]) == "ok"
        for label in NOT_DEVICES:
            caplog.clear()
            got = _tls_answer(port, pki.ca_crt, *certs[label])
            assert got.startswith("refused") and "unsupported certificate" in got, (label, got)
            cert = load_cert(certs[label][0])
            line = _logged(caplog, cert)
            assert line.startswith("refused TLS handshake from 127.0.0.1:") and "not a device certificate" in line
            assert f"subject {cert.subject.rfc4514_string()!r}" in line, line
    # a revoked device certificate is refused at the handshake, with its reason, subject and serial
    caplog.clear()
    dev = load_cert(certs["device"][0])
    pki.revoke(dev.serial_number, "dev1")
    with _tls_server(pki.server_context(require_client_cert=True)) as port:
        assert _tls_answer(port, pki.ca_crt, *certs["device"]).startswith("refused")
        assert "certificate revoked (subject 'CN=dev1,O=Quanta'" in _logged(caplog, dev)


def test_per_connection_check_cost(certs: dict[str, tuple[Path, Path]]) -> None:
    """What the Switch does per connection: parse the certificate once for serial, name and purpose."""
    import timeit

    from cryptography.hazmat.primitives import serialization

    der = load_cert(certs["device"][0]).public_bytes(serialization.Encoding.DER)
    assert qpki.peer_device(der)[1:] == ("dev1", None)
    n = 2000
    cost = min(timeit.repeat(lambda: qpki.peer_device(der), number=n, repeat=3)) / n
    assert cost < 500e-6, f"{cost * 1e6:.1f} µs per connection"  # measured ~20 µs; this bounds a regression


# --------------------------------------------------------------------- Background Channel
def test_background_verifier_accepts_only_device_certificates(pki: Pki, certs: dict[str, tuple[Path, Path]],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="quanta.background")
    v = DeviceVerifier(pki.ca_crt, pki.crl)

    def headers(label: str) -> dict[str, str]:
        crt, key = certs[label]
        return sign_request("GET", "/Background/x", crt.read_bytes(), key.read_bytes())

    assert v.verify("GET", "/Background/x", headers("device")) == "dev1"
    for label in NOT_DEVICES:
        caplog.clear()
        with pytest.raises(AuthError, match="not a device certificate"):
            v.verify("GET", "/Background/x", headers(label))
        cert = load_cert(certs[label][0])
        [line] = [r.getMessage() for r in caplog.records]
        assert "refused Background Channel request GET '/Background/x': not a device certificate" in line
        assert f"serial {cert.serial_number:x}" in line and cert.subject.rfc4514_string() in line


# ------------------------------------------------------------------------------ the store
def test_enrolment_records_every_certificate_and_revocation_returns_them_all(db_url: str) -> None:
    migrate(db_url, "master")
    e = make_engine(db_url)
    try:
        assert store.register_device(e, "d1", "a1", "b1") == {}
        with pytest.raises(store.DeviceAlreadyEnrolled, match="'d1'"):
            store.register_device(e, "d1", "a2", "b2")
        crl: list[dict[str, str]] = []
        assert store.register_device(e, "d1", "a2", "b2", replace=True, before_commit=crl.append) == \
            {"a1": "d1", "b1": "d1"}
        assert crl == [{"a1": "d1", "b1": "d1"}]
        assert {d["device_id"]: d["cert_serial"] for d in store.list_devices(e)} == {"d1": "a2"}
        # a failing CRL write leaves the database as it was
        def fail(_: dict[str, str]) -> None:
            raise OSError("disk full")
        with pytest.raises(OSError):
            store.register_device(e, "d1", "a3", "b3", replace=True, before_commit=fail)
        assert {d["device_id"]: d["cert_serial"] for d in store.list_devices(e)} == {"d1": "a2"}
        # revoking returns every certificate ever issued to the device, replaced ones included
        got: list[dict[str, str]] = []
        assert store.mark_revoked(e, "d1", before_commit=got.append) == ["a1", "a2", "b1", "b2"]
        assert got == [{s: "d1" for s in ("a1", "a2", "b1", "b2")}]
        with e.connect() as c:
            assert c.execute(sa.select(sa.func.count()).where(
                tables.device_certificates.c.revoked_at.is_(None))).scalar() == 0
        # a revoked name is still enrolled: a careless re-enrolment is refused too
        with pytest.raises(store.DeviceAlreadyEnrolled):
            store.register_device(e, "d1", "a4")
        assert store.mark_revoked(e, "nobody") is None
        # batches: one enrolled name refuses the whole batch, and nothing of it is written
        with pytest.raises(store.DeviceAlreadyEnrolled, match="'d1'"):
            store.register_devices(e, [("n1", "c1"), ("d1", "c2")], chunk=1)
        assert "n1" not in {d["device_id"] for d in store.list_devices(e)}
        # a device known only from elsewhere (no certificate yet) enrols without --replace
        with e.begin() as c:
            c.execute(tables.devices.insert().values(device_id="imported", tags={}, source="cmdb"))
        assert store.register_devices(e, [("imported", "c3")]) == {}
        # a device recorded before certificates were tracked (only devices.cert_serial) is enrolled
        with e.begin() as c:
            c.execute(tables.devices.insert().values(device_id="old", cert_serial="f00d", tags={}))
        with pytest.raises(store.DeviceAlreadyEnrolled):
            store.register_device(e, "old", "f00e")
        assert store.mark_revoked(e, "old") == ["f00d"]
    finally:
        e.dispose()


def test_migration_records_existing_device_certificates(tmp_path: Path) -> None:
    from alembic import command

    from quanta.db import alembic_config

    url = f"sqlite:///{tmp_path / 'm.db'}"
    command.upgrade(alembic_config(url, "master"), "master_0001")
    e = make_engine(url)
    try:
        with e.begin() as c:
            c.execute(sa.text("INSERT INTO devices (device_id, tags, cert_serial, revoked) VALUES "
                              "('live', '{}', 'aa', 0), ('gone', '{}', 'bb', 1), ('seen', '{}', NULL, 0)"))
        migrate(url, "master")
        with e.connect() as c:
            rows = {r.serial: r for r in c.execute(sa.select(tables.device_certificates))}
        assert set(rows) == {"aa", "bb"}
        assert rows["aa"].device_id == "live" and rows["aa"].revoked_at is None and rows["aa"].purpose == "device"
        assert rows["bb"].revoked_at is not None
    finally:
        e.dispose()


def test_the_certificates_table_matches_its_migration(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    migrate(db_url, "master")
    e = make_engine(db_url)
    try:
        with e.connect() as c:
            diff = compare_metadata(MigrationContext.configure(c), tables.master)
    finally:
        e.dispose()
    mine = [d for d in diff if "device_certificates" in repr(d)]
    assert mine == []


# ------------------------------------------------------------------------------ the CLI
def test_enroll_twice_is_refused_unless_replace_and_revoke_revokes_everything(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    root, agent = server.root, tmp_path / "agents" / "pc1"
    (tmp_path / "a-file").write_text("")
    r = quanta("enroll", str(root), "--device", "pc1", "--out", str(tmp_path / "a-file"), check=False)
    assert r.returncode == 2 and "cannot create the agent directory" in r.stderr + r.stdout
    quanta("enroll", str(root), "--device", "pc1", "--out", str(agent))  # the failed attempt enrolled nothing
    first = {f: (agent / f).read_bytes() for f in ("device.crt", "device.key", "interaction.crt", "agent.conf")}
    old = [_serial(agent / "device.crt"), _serial(agent / "interaction.crt")]
    assert _eku(agent / "interaction.crt") == [SERVER]

    r = quanta("enroll", str(root), "--device", "pc1", "--out", str(agent), check=False)
    assert r.returncode == 2
    assert "already enrolled" in r.stderr + r.stdout and "--replace" in r.stderr + r.stdout
    assert {f: (agent / f).read_bytes() for f in first} == first  # nothing was touched
    assert Pki(root / "pki").revoked() == {}

    r = quanta("enroll", str(root), "--device", "pc1", "--out", str(agent), "--replace")
    assert "2 earlier certificates revoked" in r.stdout
    new = [_serial(agent / "device.crt"), _serial(agent / "interaction.crt")]
    assert set(new).isdisjoint(old)
    crl = {r.serial_number for r in x509.load_pem_x509_crl((root / "pki" / "crl.pem").read_bytes())}
    assert {int(s, 16) for s in old} <= crl and not {int(s, 16) for s in new} & crl

    r = quanta("revoke", str(root), "--device", "pc1")
    assert "4 certificates" in r.stdout
    crl = {r.serial_number for r in x509.load_pem_x509_crl((root / "pki" / "crl.pem").read_bytes())}
    assert {int(s, 16) for s in old + new} <= crl  # the interaction certificates included
    r = quanta("revoke", str(root), "--device", "nobody", check=False)
    assert r.returncode == 2 and "no enrolled device" in r.stderr + r.stdout


def test_batch_enrolment_follows_the_same_rule(tmp_path: Path) -> None:
    from quanta.simulate import Fleet, enroll_batch

    server = make_server(tmp_path)
    fleet, _ = enroll_batch(server.root, "b-", 3, tmp_path / "fleet")
    before = {n: fleet.pem_bytes(n) for n in fleet.names}
    with pytest.raises(store.DeviceAlreadyEnrolled):
        enroll_batch(server.root, "b-", 5, tmp_path / "fleet")  # b-000001..3 are enrolled
    assert {n: Fleet.load(tmp_path / "fleet").pem_bytes(n) for n in fleet.names} == before
    with pytest.raises(KeyError):
        Fleet.load(tmp_path / "fleet").pem_bytes("b-000004")
    r = quanta("enroll-batch", str(server.root), "--count", "2", "--prefix", "b-", "--out", str(tmp_path / "fleet"),
               check=False)
    assert r.returncode == 2 and "already enrolled: 'b-000001', 'b-000002'" in r.stderr and "--replace" in r.stderr
    enroll_batch(server.root, "b-", 5, tmp_path / "fleet", replace=True)
    crl = {r.serial_number for r in x509.load_pem_x509_crl((server.root / "pki" / "crl.pem").read_bytes())}
    old = {x509.load_pem_x509_certificate(pem[pem.index(b"-----BEGIN CERTIFICATE"):]).serial_number
           for pem in before.values()}
    assert old <= crl
    for n in (again := Fleet.load(tmp_path / "fleet")).names:
        pem = again.pem_bytes(n)
        cert = x509.load_pem_x509_certificate(pem[pem.index(b"-----BEGIN CERTIFICATE"):])
        assert cert.serial_number not in crl and device_refusal(cert) is None



# ------------------------------------------------------------- a real server, real processes
SUMMARY = "@s = Device.GetSummary(); SELECT * FROM @s;"
SCRIPT = b"#!/bin/sh\necho background content\n"


def _background(server: Server, crt: Path, key: Path, digest: str) -> httpx.Response:
    path = f"/Background/{digest}"
    return httpx.get(f"https://localhost:{server.https}{path}",
                     verify=ssl.create_default_context(cafile=str(server.root / "pki" / "ca.crt")),
                     headers=sign_request("GET", path, crt.read_bytes(), key.read_bytes()), timeout=10)


def _upload(server: Server) -> str:
    from quanta.client import ConsumerClient

    with ConsumerClient.for_data_dir(server.root) as api:
        r = api.http.post("/Consumer/Content", content=SCRIPT)
        assert r.status_code == 201, r.text
        return str(r.json()["sha256"])


def _log_line(server: Server, *parts: str) -> str:
    """The server log's line holding every one of ``parts`` (waited for)."""
    def find() -> str | None:
        return next((ln for ln in server.log_text().splitlines() if all(p in ln for p in parts)), None)
    wait_until(lambda: find() is not None, 15, f"a log line with {parts}", server)
    return find() or ""


def _refused_everywhere(server: Server, crt: Path, key: Path, digest: str, reason: str) -> None:
    """Refused by the Switch (at the handshake, logged with reason, subject and serial) and by the
    Background Channel (401, nothing served, logged likewise)."""
    from test_e2e_single_server import _handshake, _tls_client

    cert = load_cert(crt)
    serial, subject = f"serial {cert.serial_number:x}", f"subject {cert.subject.rfc4514_string()!r}"
    assert _handshake(server, _tls_client(server, crt, key)).startswith("refused")  # TLS 1.3: on the first read
    assert _handshake(server, _tls_client(server, crt, key, tls12=True)).startswith("handshake:")
    line = _log_line(server, "refused TLS handshake from 127.0.0.1:", serial)
    assert reason in line and subject in line, line
    r = _background(server, crt, key, digest)
    assert r.status_code == 401 and reason in r.text and SCRIPT not in r.content, r.text
    line = _log_line(server, "refused Background Channel request GET", serial)
    assert reason in line and subject in line, line


@pytest.mark.slow
def test_switch_and_background_refuse_all_but_device_certificates(server: Server, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from test_e2e_single_server import _handshake, _tls_client

    agent = server.enroll("dev1")
    server.enroll("good")
    server.start_agent("good")
    server.wait_online({"good"})
    digest = _upload(server)
    pki = Pki(server.root / "pki")
    out = tmp_path / "other-certs"
    out.mkdir()
    # a remote host's certificate, as 'quanta host export' issues it
    pki.issue("host2", out / "host2.crt", out / "host2.key", purpose=Purpose.SERVER, san=["host2", "localhost"])
    cases = {"interaction": (agent / "interaction.crt", agent / "interaction.key"),
             "server": (pki.server_crt, pki.server_key), "host": (out / "host2.crt", out / "host2.key"),
             "legacy device": _legacy(pki, monkeypatch, Purpose.DEVICE, "dev-old", out),
             "legacy server": _legacy(pki, monkeypatch, Purpose.SERVER, "srv-old", out, ["srv-old"])}
    for label, (crt, key) in cases.items():
        why = "no Quanta device purpose" if label == "legacy device" else "a server or interaction-port certificate"
        _refused_everywhere(server, crt, key, digest, why)
    assert "localhost" not in {d["device_id"] for d in json.loads(quanta("devices", str(server.root), "--json").stdout)}
    # the device certificate works on both
    assert _handshake(server, _tls_client(server, agent / "device.crt", agent / "device.key")) == "ok"
    r = _background(server, agent / "device.crt", agent / "device.key", digest)
    assert r.status_code == 200 and r.content == SCRIPT
    # and the well-behaved device never noticed
    asked = quanta("ask", str(server.root), SUMMARY, "--json", "--wait", "20", "--device", "good")
    assert json.loads(asked.stdout)["states"] == {"success": 1}


@pytest.mark.slow
def test_revoking_a_device_refuses_its_interaction_certificate_too(server: Server) -> None:
    agent = server.enroll("dev1")
    server.start_agent("dev1")
    server.wait_online({"dev1"})
    digest = _upload(server)
    quanta("revoke", str(server.root), "--device", "dev1")
    wait_until(lambda: "dev1" not in server.online(), 15, "dev1 dropped after revoke", server)
    revoked = Pki(server.root / "pki").revoked()
    for f in ("device.crt", "interaction.crt"):
        assert _serial(agent / f) in revoked, f  # both on the CRL
    server.stop_agent("dev1")
    _refused_everywhere(server, agent / "device.crt", agent / "device.key", digest, "revoked")
    _refused_everywhere(server, agent / "interaction.crt", agent / "interaction.key", digest, "")
    r = _background(server, agent / "interaction.crt", agent / "interaction.key", digest)
    assert r.status_code == 401 and "revoked" in r.text


@pytest.mark.slow
def test_enrolling_twice_needs_replace_which_retires_the_old_certificate(server: Server, tmp_path: Path) -> None:
    from test_e2e_single_server import _handshake, _tls_client

    agent = server.enroll("pc1")
    server.start_agent("pc1")
    server.wait_online({"pc1"})
    digest = _upload(server)
    old = tmp_path / "old"
    old.mkdir()
    for f in ("device.crt", "device.key", "interaction.crt", "interaction.key"):
        (old / f).write_bytes((agent / f).read_bytes())

    r = quanta("enroll", str(server.root), "--device", "pc1", "--out", str(tmp_path / "elsewhere"), check=False)
    assert r.returncode == 2 and "'pc1' is already enrolled; nothing was changed" in r.stderr + r.stdout
    assert not (tmp_path / "elsewhere" / "device.crt").exists()
    assert "pc1" in server.online() and Pki(server.root / "pki").revoked() == {}

    server.stop_agent("pc1")
    quanta("enroll", str(server.root), "--device", "pc1", "--out", str(agent), "--replace")
    # the Switch watches the CRL file: wait until it holds the two retired certificates
    wait_until(lambda: "CRL loaded: 2 revoked" in server.log_text(), 20, "the Switch loaded the new CRL", server)
    server.start_agent("pc1")
    server.wait_online({"pc1"})
    assert _handshake(server, _tls_client(server, agent / "device.crt", agent / "device.key")) == "ok"
    _refused_everywhere(server, old / "device.crt", old / "device.key", digest, "revoked")
    _refused_everywhere(server, old / "interaction.crt", old / "interaction.key", digest, "")
    r = quanta("ask", str(server.root), SUMMARY, "--json", "--wait", "20", "--device", "pc1")
    assert json.loads(r.stdout)["states"] == {"success": 1}


@pytest.mark.slow
def test_a_resumed_session_without_the_device_purpose_is_closed_before_its_first_frame(
        server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TLS session resumed from a ticket skips the handshake's certificate checks; a ticket made
    by a Switch that did not check purposes (one before this change, sharing pki/ticket.secret)
    must still not let a non-device certificate in."""
    from quanta.switch.tls import TicketKeys

    pki = Pki(server.root / "pki")
    crt, key = _legacy(pki, monkeypatch, Purpose.SERVER, "srv-old", tmp_path, ["srv-old"])
    # the old Switch: mutual TLS, same CA and ticket key, no purpose check
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    old.load_cert_chain(pki.server_crt, pki.server_key)
    old.verify_mode = ssl.CERT_REQUIRED
    old.load_verify_locations(cafile=str(pki.ca_crt))
    old.num_tickets = 1
    TicketKeys(old, pki.root / "ticket.secret").refresh()
    client = ssl.create_default_context(cafile=str(pki.ca_crt))
    client.load_cert_chain(crt, key)
    with _tls_server(old) as port:
        with client.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                                server_hostname="localhost") as s:
            assert s.recv(10) == b"ok"
            session = s.session
    assert session is not None and session.has_ticket
    with client.wrap_socket(socket.create_connection(("127.0.0.1", server.switch), timeout=10),
                            server_hostname="localhost", session=session) as s:
        assert s.session_reused  # no certificate check happened in this handshake
        s.sendall(b"GET /agent HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except (ssl.SSLError, OSError):
            pass
    head, _, frame = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), data
    assert frame[0] == 0x88 and int.from_bytes(frame[2:4], "big") == 1008, frame  # a close frame, nothing else
    assert b"not a device certificate" in frame[4:]
    cert = load_cert(crt)
    line = _log_line(server, "closing agent connection", f"serial {cert.serial_number:x}")
    assert "device srv-old:" in line and "a server or interaction-port certificate" in line
