"""How Quanta's components authenticate to one another and make HTTP calls: one place for each.

* The internal bearer token (derived from the installation's internal secret) is checked by
  :func:`bearer_ok` (constant time) wherever a component accepts internal calls, and sent with
  :func:`bearer`.
* Outgoing HTTP calls between components share one pooled ``httpx.AsyncClient`` per event loop
  and TLS verification setting (:func:`http_client`), so a question's Issue and Wait calls reuse
  a kept-alive connection instead of a new TCP (and TLS) handshake each.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ssl
import weakref
from typing import Any

import httpx

from quanta.protocol.messages import internal_token

__all__ = ["bearer", "bearer_ok", "http_client", "internal_token", "require_bearer", "tls_context"]


def bearer(token: str) -> dict[str, str]:
    """The header that authenticates an internal call."""
    return {"Authorization": f"Bearer {token}"}


def bearer_ok(value: str | bytes | None, token: str) -> bool:
    """Whether an ``Authorization`` header value carries ``token`` (the scheme's case is free)."""
    if value is None:
        return False
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, given = value.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def require_bearer(token: str) -> Any:
    """A FastAPI dependency that refuses (401) a request without the internal token, before the
    route reads anything else."""
    from fastapi import Header, HTTPException

    def check(authorization: str | None = Header(default=None)) -> None:
        if not bearer_ok(authorization, token):
            raise HTTPException(401, "missing or wrong internal token")

    return check


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, httpx.AsyncClient]] = (
    weakref.WeakKeyDictionary())


@functools.lru_cache(maxsize=8)
def tls_context(verify: str | bool | None) -> ssl.SSLContext | bool:
    """The TLS context for internal calls, built once per CA path (None/True: the system store;
    False: no verification). Building one loads a CA bundle, ~50 ms with the system store."""
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    if verify is None or verify is True:
        return ssl.create_default_context()
    return False


def http_client(verify: str | bool | ssl.SSLContext | None = True) -> httpx.AsyncClient:
    """The pooled client of the running event loop for this ``verify``: a CA path, True/None (the
    system store), False (no verification) or an ``ssl.SSLContext``. Callers pass their own
    timeout per request and must not close it."""
    loop = asyncio.get_running_loop()
    per_loop = _clients.setdefault(loop, {})
    if verify is None:
        verify = True
    key = id(verify) if isinstance(verify, ssl.SSLContext) else verify
    client = per_loop.get(key)
    if client is None or client.is_closed:
        ctx = verify if isinstance(verify, ssl.SSLContext) else tls_context(verify)
        client = per_loop[key] = httpx.AsyncClient(verify=ctx, timeout=30)
    return client
