"""Background Channel: content addressed by SHA-256, devices authenticated per request."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import pytest

from conftest import Server
from quanta.agent.background import BackgroundFetcher, ResourceError
from quanta.agent.config import load_agent_config
from quanta.background import ContentError, ContentStore
from quanta.background.auth import H_SIG, AuthError, DeviceVerifier, sign_request
from quanta.pki import Pki, load_cert


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    p = Pki(tmp_path / "pki")
    p.create("localhost")
    p.issue("dev1", tmp_path / "dev1.crt", tmp_path / "dev1.key")
    return p


def _headers(tmp_path: Path, name: str = "dev1", path: str = "/Background/x", now: float | None = None) -> dict[str, str]:
    return sign_request("GET", path, (tmp_path / f"{name}.crt").read_bytes(), (tmp_path / f"{name}.key").read_bytes(),
                        now=now)


def test_device_request_signatures(pki: Pki, tmp_path: Path) -> None:
    v = DeviceVerifier(pki.ca_crt, pki.crl)
    assert v.verify("GET", "/Background/x", _headers(tmp_path)) == "dev1"
    with pytest.raises(AuthError, match="signature invalid"):
        v.verify("GET", "/Background/y", _headers(tmp_path))  # signed for another path
    with pytest.raises(AuthError, match="timestamp"):
        v.verify("GET", "/Background/x", _headers(tmp_path, now=time.time() - 3600))
    with pytest.raises(AuthError, match="missing"):
        v.verify("GET", "/Background/x", {})
    bad = _headers(tmp_path)
    bad[H_SIG] = "!!!"
    with pytest.raises(AuthError, match="base64"):
        v.verify("GET", "/Background/x", bad)
    other = Pki(tmp_path / "other")
    other.create("localhost")
    other.issue("dev9", tmp_path / "dev9.crt", tmp_path / "dev9.key")
    with pytest.raises(AuthError, match="not issued by"):
        v.verify("GET", "/Background/x", _headers(tmp_path, "dev9"))
    pki.revoke(load_cert(tmp_path / "dev1.crt").serial_number, "dev1")
    with pytest.raises(AuthError, match="revoked"):
        v.verify("GET", "/Background/x", _headers(tmp_path))


def test_device_keys_of_both_kinds_authenticate(pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """New device certificates hold Ed25519 keys; ones issued before (ECDSA P-256) keep working."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    import quanta.pki as qpki

    assert isinstance(load_cert(tmp_path / "dev1.crt").public_key(), ed25519.Ed25519PublicKey)
    monkeypatch.setattr(qpki, "new_client_key", lambda: ec.generate_private_key(ec.SECP256R1()))
    pki.issue("legacy", tmp_path / "legacy.crt", tmp_path / "legacy.key")
    assert isinstance(load_cert(tmp_path / "legacy.crt").public_key(), ec.EllipticCurvePublicKey)
    v = DeviceVerifier(pki.ca_crt, pki.crl)
    assert v.verify("GET", "/Background/x", _headers(tmp_path, "legacy")) == "legacy"
    assert v.verify("GET", "/Background/x", _headers(tmp_path)) == "dev1"
    with pytest.raises(AuthError, match="signature invalid"):
        v.verify("GET", "/Background/y", _headers(tmp_path, "legacy"))


def test_each_crl_is_later_than_the_last(pki: Pki) -> None:
    """A Switch adds a new CRL to its live store, where OpenSSL uses the one with the latest
    thisUpdate, so two revocations in the same second must still give increasing thisUpdates."""
    from cryptography import x509

    stamps = []
    for i in range(3):
        pki.revoke(1000 + i, f"d{i}")
        stamps.append(x509.load_pem_x509_crl(pki.crl.read_bytes()).last_update_utc)
    assert stamps[0] < stamps[1] < stamps[2]


def test_content_store(tmp_path: Path) -> None:
    s = ContentStore(tmp_path / "c")
    digest = s.put(b"echo hi\n")
    assert digest == hashlib.sha256(b"echo hi\n").hexdigest()
    assert s.put(b"echo hi\n") == digest  # idempotent
    assert s.get(digest).read_bytes() == b"echo hi\n"
    assert s.get("0" * 64) is None
    for bad in ("../../etc/passwd", "ABC", "g" * 64):
        with pytest.raises(ContentError):
            s.get(bad)
    assert s.list() == [{"sha256": digest, "size": 8}]


@pytest.mark.slow
def test_agent_fetches_verified_resources(server: Server, tmp_path: Path) -> None:
    from quanta.client import ConsumerClient
    from quanta.scale import AgentContext, compile_scale, run_program

    agent_dir = server.enroll("fetcher")
    script = b"#!/bin/bash\necho \"from the background channel: $((6 * 7))\"\n"
    with ConsumerClient.for_data_dir(server.root) as api:
        r = api.http.post("/Consumer/Content", content=script)
        assert r.status_code == 201, r.text
        digest = r.json()["sha256"]
        assert digest == hashlib.sha256(script).hexdigest()
        assert api.http.post("/Consumer/Content", content=b"").status_code == 422
    base = f"https://localhost:{server.https}/Background/{digest}"
    # without device authentication: refused before anything else
    r = httpx.get(base, verify=False)
    assert r.status_code == 401 and "device authentication failed" in r.text
    cfg = load_agent_config(agent_dir)
    fetch = BackgroundFetcher(cfg)
    local = fetch(digest)
    assert local.read_bytes() == script
    # the method that runs it (an action) gets the verified copy
    ctx = AgentContext(data_dir=cfg.state, fetch_resource=fetch)
    res = run_program(compile_scale(f'Scripting.Run(Language: "bash", Resource: "{digest}");'), context=ctx,
                      allow_actions=True)
    assert res.status == "success", res.error
    assert res.rows[0][res.columns.index("Output")] == "from the background channel: 42"
    # unknown content, and content altered on the server's disk, are refused by the agent
    with pytest.raises(ResourceError, match="404"):
        fetch("1" * 64)
    stored = next((server.root / "content").glob(f"??/{digest}"))
    stored.write_bytes(b"#!/bin/bash\nrm -rf /tmp/whatever\n")
    local.chmod(0o600)
    local.unlink()
    with pytest.raises(ResourceError, match="failed verification"):
        fetch(digest)
    assert not (cfg.state / "content" / digest).exists()
