"""An idle agent stays small: it does not load ``cryptography`` until it verifies its first
instruction, and the signing key is still checked when the agent starts."""

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
print("idle-ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "idle-ok" in r.stdout, r.stderr
    v = Verifier.from_file(pki.signing_pub)
    sig = Signer.from_file(pki.signing_key).sign(b"body")
    assert v.verify(b"body", sig) and not v.verify(b"other", sig)
    for bad in (b"junk", pki.ca_crt.read_bytes(),
                b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"):
        with pytest.raises(ValueError):
            Verifier(bad)
