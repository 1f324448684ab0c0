"""A Remote Catalog served over HTTPS: the API key never travels in clear.

`quanta catalog serve DIR --https-port N` serves /Catalog over TLS (Quanta's TLS policy) with a
server certificate of the installation CA; the plain HTTP port keeps the CRL and health and
refuses every /Catalog request (403) without reading it; a master whose catalog_url is https
verifies the Catalog against the installation CA and normalises through it.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
from conftest import free_port, quanta, wait_until

from quanta.pki import Pki, Purpose
from quanta.settings import DataDir


def test_catalog_over_https(tmp_path: Path) -> None:
    master = tmp_path / "master"
    quanta("init", str(master), "--server-name", "localhost", "--port", f"core={free_port()}")
    cat, http_port, https_port = tmp_path / "catalog-host", free_port(), free_port()
    quanta("catalog", "init", str(cat), "--port", str(http_port))
    (cat / "pki").mkdir()
    Pki(DataDir(master).pki).issue("catalog", cat / "pki" / "server.crt", cat / "pki" / "server.key",
                                   purpose=Purpose.SERVER, san=["127.0.0.1", "localhost"])
    key = quanta("catalog", "key", "add", str(cat), "--name", "master").stdout.strip()
    # a careless operator: no certificate where it is looked for
    r = quanta("catalog", "serve", str(cat), "--https-port", str(https_port), "--cert", str(tmp_path / "none.crt"),
               check=False)
    assert r.returncode != 0 and "no TLS certificate" in r.stderr
    proc = subprocess.Popen([sys.executable, "-m", "quanta", "catalog", "serve", str(cat), "--https-port",
                             str(https_port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    ca = str(DataDir(master).pki / "ca.crt")
    try:
        def up() -> bool:
            try:
                return httpx.get(f"https://127.0.0.1:{https_port}/health", verify=ssl.create_default_context(cafile=ca),
                                 timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 30, "catalog https")
        # plain HTTP: CRL and health only; /Catalog refused, even with the right key
        assert httpx.get(f"http://127.0.0.1:{http_port}/health").status_code == 200
        for path in ("/Catalog/Products", "/Catalog/Info", "/Catalog/", "/Catalog"):
            r = httpx.get(f"http://127.0.0.1:{http_port}{path}", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 403 and "HTTPS only" in r.text, (path, r.status_code)
        # HTTPS: the API wants its key, as before
        verify = ssl.create_default_context(cafile=ca)
        assert httpx.get(f"https://127.0.0.1:{https_port}/Catalog/Products", verify=verify).status_code == 401
        # the master, with catalog_url https://..., verifies the Catalog against the installation CA
        (master / "quanta.toml").write_text(f'catalog_url = "https://127.0.0.1:{https_port}/Catalog"\n'
                                            + (master / "quanta.toml").read_text())
        (master / "catalog.key").write_text(key + "\n")
        out = json.loads(quanta("catalog", "normalize", str(master), "--title", "openssl",
                                "--version", "1:3.0.11-1").stdout)
        assert out[0]["product"] == "OpenSSL"
        # a master of another installation does not trust this Catalog's certificate
        other = tmp_path / "other"
        quanta("init", str(other), "--server-name", "localhost", "--port", f"core={free_port()}")
        (other / "quanta.toml").write_text(f'catalog_url = "https://127.0.0.1:{https_port}/Catalog"\n'
                                           + (other / "quanta.toml").read_text())
        shutil.copy(master / "catalog.key", other / "catalog.key")
        r = quanta("catalog", "normalize", str(other), "--title", "openssl", check=False)
        assert r.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in r.stderr
        # and its TLS is Quanta's policy: a CBC-only TLS 1.2 client fails
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        c.check_hostname, c.verify_mode = False, ssl.CERT_NONE
        c.maximum_version = ssl.TLSVersion.TLSv1_2
        c.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:@SECLEVEL=0")
        try:
            with socket.create_connection(("127.0.0.1", https_port), timeout=5) as raw, c.wrap_socket(raw):
                raise AssertionError("a CBC-only client got a TLS session")
        except ssl.SSLError:
            pass
    finally:
        proc.terminate()
        proc.wait(10)
