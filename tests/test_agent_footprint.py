"""An agent stays small: it never loads ``cryptography`` (the server signs with it; the agent
verifies with PyNaCl, loaded at its first verification), and the signing key is still checked
when the agent starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from quanta.pki import Pki, Signer
from quanta.signing import Verifier


def test_verifier_checks_the_key_at_once_and_loads_cryptography_lazily(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.create("localhost")
    code = f"""
import sys
import quanta.agent.runtime
from quanta.signing import Verifier
from pathlib import Path
v = Verifier.from_file(Path({str(pki.signing_pub)!r}))
assert "cryptography" not in sys.modules, "cryptography loaded by an idle agent"
assert "nacl" not in sys.modules, "PyNaCl loaded before the first verification"
sig = bytes.fromhex(sys.argv[1])
assert v.verify(b"instruction body", sig)
assert not v.verify(b"instruction bodY", sig)
assert "nacl" in sys.modules and "cryptography" not in sys.modules, "cryptography loaded to verify"
print("idle-ok")
"""
    signed = Signer.from_file(pki.signing_key).sign(b"instruction body")  # by cryptography, as the server does
    r = subprocess.run([sys.executable, "-c", code, signed.hex()], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "idle-ok" in r.stdout, r.stderr
    v = Verifier.from_file(pki.signing_pub)
    sig = Signer.from_file(pki.signing_key).sign(b"body")
    assert v.verify(b"body", sig) and not v.verify(b"other", sig)
    # malformed signatures are refused, never raised: wrong length, empty, flipped bit, not bytes
    for bad_sig in (sig[:-1], sig + b"\0", b"", bytes([sig[0] ^ 1]) + sig[1:], "text"):
        assert v.verify(b"body", bad_sig) is False  # type: ignore[arg-type]
    # another installation's key does not verify this one's signatures
    other = Pki(tmp_path / "other")
    other.create("localhost")
    assert Verifier.from_file(other.signing_pub).verify(b"body", sig) is False
    for bad in (b"junk", pki.ca_crt.read_bytes(),
                b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"):
        with pytest.raises(ValueError):
            Verifier(bad)
