"""The container's HEALTHCHECK: GET /Consumer/health on this server's HTTPS port, verified against the
installation CA under the server's name (exit 0 healthy, 1 not). The web tier answers it only when it runs,
so a server still starting, stopped or restarting its web tier is unhealthy.

    python healthcheck.py [DATA]      (default: $QUANTA_DATA, else /var/lib/quanta)
"""

from __future__ import annotations

import os
import ssl
import sys
from pathlib import Path

TIMEOUT = 5.0


def check(root: Path) -> str | None:
    """None if the web tier answers healthy, else why not (one line)."""
    import httpx

    from quanta.settings import DataDir, load_settings

    try:
        settings = load_settings(root)
    except (OSError, ValueError) as e:
        return f"cannot read the settings of {root}: {e}"
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(settings.bind_host, settings.bind_host)
    url = f"https://{host}:{settings.port('https')}/Consumer/health"
    try:
        ctx = ssl.create_default_context(cafile=str(DataDir(root).pki / "ca.crt"))
        # the certificate names the server, not the loopback address: verify it under the server's name
        with httpx.Client(verify=ctx, timeout=TIMEOUT) as client:
            r = client.get(url, headers={"Host": settings.server_name}, extensions={"sni_hostname": settings.server_name})
    except (OSError, ssl.SSLError, httpx.HTTPError) as e:
        return f"{url}: {type(e).__name__}: {e}"
    if r.status_code != 200:
        return f"{url} answered {r.status_code}"
    try:
        ok = r.json().get("status") == "ok"
    except (ValueError, AttributeError):
        ok = False
    return None if ok else f"{url} answered {r.text[:200]!r}"


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else os.environ.get("QUANTA_DATA", "/var/lib/quanta"))
    problem = check(root)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    print("healthy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
