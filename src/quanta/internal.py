"""How Quanta's components authenticate to one another and make HTTP calls: one place for each.

* Each internal hop has its own bearer credential, derived from the installation's internal
  secret per service and purpose (:data:`HOPS`, :func:`credential`): a Switch's credential for
  the Core does not open the Coordinator, the hub or the Background Channel's replication, and
  the other way round. A receiver accepts only its own hops' credentials
  (:func:`credentials_ok`, constant time), on every route, its health and OpenAPI document
  included (:class:`InternalAuth`, an ASGI middleware in front of the whole app). Credentials are
  sent with :func:`bearer`.
* Outgoing HTTP calls between components share one pooled ``httpx.AsyncClient`` per event loop
  and TLS verification setting (:func:`http_client`), so a question's Issue and Wait calls reuse
  a kept-alive connection instead of a new TCP (and TLS) handshake each.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import ssl
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from quanta.protocol.messages import credential as _derive

__all__ = ["HOPS", "Hop", "InternalAuth", "bearer", "bearer_ok", "credential", "credentials_ok", "http_client",
           "require_bearer", "tls_context"]


class Hop(NamedTuple):
    """One internal hop: the receiving service and the caller's purpose there."""

    service: str
    purpose: str


SWITCH_TO_CORE = Hop("core", "switch")              # Switch -> Core link (3900, or /Core/Switch via 443)
CONSUMER_TO_CORE = Hop("core", "consumer")          # Consumer API -> Core (Issue, Cancel, Wait)
COORDINATOR_TO_CORE = Hop("core", "coordinator")    # Coordinator -> Core (Issue after approval)
CONSUMER_TO_COORDINATOR = Hop("coordinator", "consumer")  # Consumer API -> Coordinator (8081)
HUB_PEER = Hop("hub", "peer")                       # Response Stack / DMZ host -> Master hub (3901)
BACKGROUND_REPLICATION = Hop("background", "replicate")   # Master -> DMZ Background Channel (PUT)
INTEGRATE_CLIENT = Hop("integrate", "client")       # quanta integrate-run -> Integrate Agent (loopback)

HOPS: tuple[Hop, ...] = (SWITCH_TO_CORE, CONSUMER_TO_CORE, COORDINATOR_TO_CORE, CONSUMER_TO_COORDINATOR,
                         HUB_PEER, BACKGROUND_REPLICATION, INTEGRATE_CLIENT)

# What each receiver accepts (and nothing else): the Core's HTTP routes, its Switch link, ...
CORE_HTTP = (CONSUMER_TO_CORE, COORDINATOR_TO_CORE)
CORE_SWITCH = (SWITCH_TO_CORE,)


def credential(secret: bytes, hop: Hop) -> str:
    """The bearer credential of ``hop`` for the installation ``secret``."""
    return _derive(secret, hop.service, hop.purpose)


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


def credentials_ok(value: str | bytes | None, tokens: Iterable[str]) -> bool:
    """Whether an ``Authorization`` header carries one of ``tokens``. Every token is compared
    (constant time each), so the time taken says nothing about which one nearly matched."""
    ok = False
    for token in tokens:
        ok |= bearer_ok(value, token)
    return ok


def require_bearer(token: str) -> Any:
    """A FastAPI dependency that refuses (401) a request without the internal credential, before the
    route reads anything else."""
    from fastapi import Header, HTTPException

    def check(authorization: str | None = Header(default=None)) -> None:
        if not bearer_ok(authorization, token):
            raise HTTPException(401, "missing or wrong internal credential")

    return check


class InternalAuth:
    """ASGI middleware in front of an internal app: every HTTP request and WebSocket handshake
    without one of the credentials ``accepted(scope)`` names is refused (HTTP 401; a WebSocket is
    closed before it is accepted, which the server answers 403) before routing, so health, the
    OpenAPI document and unknown paths answer nothing either. Lifespan events pass through."""

    def __init__(self, app: Any, accepted: Callable[[dict[str, Any]], Iterable[str]], name: str) -> None:
        self.app, self.accepted, self.name = app, accepted, name
        self.log = logging.getLogger(f"quanta.{name}")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        value = None
        for k, v in scope.get("headers") or ():
            if k == b"authorization":
                value = v
                break
        if credentials_ok(value, self.accepted(scope)):
            return await self.app(scope, receive, send)
        client = scope.get("client")
        self.log.warning("%s %r from %s refused: missing or wrong internal credential",
                         "WebSocket" if scope["type"] == "websocket" else scope.get("method", "?"),
                         str(scope.get("path", ""))[:200], client[0] if client else "?")
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})
            return
        body = b'{"detail":"missing or wrong internal credential"}'
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


class HostIdentity:
    """This host's host certificate (``pki/host.crt``, Purpose.HOST), with which it signs its
    requests on the cross-host links (``X-Quanta-Host-*`` headers, quanta.background.auth): the
    receiving host checks the certificate is the installation CA's, a host's, not revoked, and the
    signature over the method, path and time fresh. The web tier's TLS cannot ask browsers for a
    certificate, so this is the client half of mutual authentication on port 443."""

    def __init__(self, cert_pem: bytes, key_pem: bytes) -> None:
        self.cert_pem, self.key_pem = cert_pem, key_pem

    @classmethod
    def of(cls, pki_dir: Path) -> HostIdentity | None:
        crt, key = Path(pki_dir) / "host.crt", Path(pki_dir) / "host.key"
        if not crt.exists() or not key.exists():
            return None
        return cls(crt.read_bytes(), key.read_bytes())

    def headers(self, method: str, path: str) -> dict[str, str]:
        from quanta.background.auth import HOST_HEADERS, sign_request

        return sign_request(method, path, self.cert_pem, self.key_pem, names=HOST_HEADERS)


_identity_dir: Path | None = None
_identity: HostIdentity | None = None


def present_host_identity(pki_dir: Path) -> None:
    """Sign this process's HTTPS requests through :func:`http_client` with this host's host
    certificate, from now on (read at the first request: another process may be issuing it)."""
    global _identity_dir, _identity
    _identity_dir, _identity = Path(pki_dir), None


def _current_identity() -> HostIdentity | None:
    global _identity
    if _identity is None and _identity_dir is not None:
        _identity = HostIdentity.of(_identity_dir)
    return _identity


def link_headers(pki_dir: Path, url: str, headers: dict[str, str]) -> dict[str, str]:
    """``headers`` for a WebSocket to ``url``, signed with this host's host certificate when it
    crosses hosts over TLS (``wss://``): a DMZ Switch's link to the Response Stack's ``/Core``."""
    if not url.startswith("wss://"):
        return headers
    identity = HostIdentity.of(pki_dir)
    if identity is None:
        return headers
    return {**headers, **identity.headers("GET", httpx.URL(url).path)}


async def _sign(request: httpx.Request) -> None:
    identity = _current_identity() if request.url.scheme == "https" else None
    if identity is not None:
        request.headers.update(identity.headers(request.method, request.url.path))


def with_tls(config: Any, ctx: ssl.SSLContext) -> Any:
    """A ``uvicorn.Config`` serving TLS with ``ctx`` (Quanta's policy, quanta.pki.tls_server_context)
    instead of the context uvicorn builds from its options, which offers every cipher suite of
    OpenSSL's default list (CBC included) and cannot set a minimum version. The config keeps its
    certificate options, so it still knows it serves https."""
    config.load()
    config.ssl = ctx
    return config


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
        client = per_loop[key] = httpx.AsyncClient(verify=ctx, timeout=30, event_hooks={"request": [_sign]})
    return client
