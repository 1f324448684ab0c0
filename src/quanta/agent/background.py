"""The agent's Background Channel client: download a resource by SHA-256, verify, cache."""

from __future__ import annotations

import hashlib
import os
import ssl
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from quanta.background import SHA256_RE
from quanta.scale.spec import MethodError

from .config import AgentConfig


class ResourceError(MethodError):
    """Reported by the SCALE method that asked for the resource, with its line and column."""


class BackgroundFetcher:
    def __init__(self, cfg: AgentConfig, timeout: float = 60.0) -> None:
        self.cfg = cfg
        self.cache = cfg.state / "content"
        self.timeout = timeout

    def __call__(self, sha256: str) -> Path:
        return self.fetch(sha256)

    def fetch(self, sha256: str) -> Path:
        sha256 = sha256.lower()
        if not SHA256_RE.match(sha256):
            raise ResourceError(f"resource {sha256!r} is not a SHA-256")
        cached = self.cache / sha256
        if cached.exists() and _digest(cached) == sha256:
            return cached
        import httpx  # only when a resource is needed: an idle agent stays small

        from quanta.background.auth import sign_request

        if not self.cfg.background_url:
            raise ResourceError("BackgroundChannelUrl is not set in agent.conf")
        url = f"{self.cfg.background_url.rstrip('/')}/{sha256}"
        headers = sign_request("GET", urlsplit(url).path, self.cfg.cert.read_bytes(), self.cfg.key.read_bytes())
        ctx = ssl.create_default_context(cafile=str(self.cfg.ca))
        self.cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as f, httpx.stream("GET", url, headers=headers, verify=ctx,
                                                          timeout=self.timeout) as r:
                if r.status_code != 200:
                    raise ResourceError(f"Background Channel answered {r.status_code} for {sha256}: "
                                        f"{r.read().decode(errors='replace')[:200]}")
                for chunk in r.iter_bytes():
                    h.update(chunk)
                    f.write(chunk)
            if h.hexdigest() != sha256:
                raise ResourceError(f"resource {sha256} failed verification: its content hashes to {h.hexdigest()}")
            os.replace(tmp, cached)
            os.chmod(cached, 0o500)
            return cached
        except httpx.HTTPError as e:
            raise ResourceError(f"cannot fetch resource {sha256} from {url}: {e}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()
