"""How Quanta's components authenticate to one another and make HTTP calls: one place for each.

* Each internal hop has its own bearer credential, derived from the installation's internal
  secret per service and purpose (:data:`HOPS`, :func:`credential`): a Switch's credential for
  the Core does not open the Coordinator, the hub or the Background Channel's replication, and
  the other way round. The Core's wake-up pokes to its Switches are MACed with a hop key of
  their own (:data:`POKE`, :func:`poke_key`). A receiver accepts only its own hops' credentials
  (:func:`credentials_ok`, constant time), on every route, its health and OpenAPI document
  included (:class:`InternalAuth`, an ASGI middleware in front of the whole app). Credentials are
  sent with :func:`bearer`.
* Only the Master (and a single server) holds the secret. A remote host exported from it
  (``quanta host export``) is given only the credentials of the hops its role's components use
  (:data:`ROLE_HOPS`), in ``pki/internal.credentials``; a stolen DMZ host opens no other hop.
  Every component reads its credentials with :func:`host_credentials` and each one with
  :func:`credential`, which refuses (:class:`MissingCredential`, one line naming the hop) one
  the host was not given.
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
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from quanta.datadir import DataDir
from quanta.protocol.messages import credential as _derive

__all__ = ["HOPS", "ROLE_HOPS", "Credentials", "Hop", "InternalAuth", "MissingCredential", "bearer", "bearer_ok",
           "credential", "credentials_ok", "host_credentials", "http_client", "poke_key", "require_bearer",
           "tls_context"]


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
POKE = Hop("switch", "poke")                        # Core -> Switch wake-up (UDP/TCP poke port): its MAC key

HOPS: tuple[Hop, ...] = (SWITCH_TO_CORE, CONSUMER_TO_CORE, COORDINATOR_TO_CORE, CONSUMER_TO_COORDINATOR,
                         HUB_PEER, BACKGROUND_REPLICATION, INTEGRATE_CLIENT, POKE)

# What each receiver accepts (and nothing else): the Core's HTTP routes, its Switch link, ...
CORE_HTTP = (CONSUMER_TO_CORE, COORDINATOR_TO_CORE)
CORE_SWITCH = (SWITCH_TO_CORE,)

# What an exported remote host is given (quanta.cli.components: which components each role runs).
# A Response Stack: its Core (the Master's Consumer API and Coordinator call it, its Switches link
# to it, it pokes them), its Switches, its web tier's /Core relay (the same hops) and its hub
# client. A DMZ server: its Switches (their link to the Response Stack's /Core/Switch relay, the
# pokes they check), its web tier's Background Channel (replication from the Master) and its hub
# client. Neither is given the Master's own hops (Consumer API -> Coordinator, Integrate).
ROLE_HOPS: dict[str, tuple[Hop, ...]] = {
    "response": (*CORE_HTTP, *CORE_SWITCH, POKE, HUB_PEER),
    "dmz": (SWITCH_TO_CORE, POKE, BACKGROUND_REPLICATION, HUB_PEER),
}

CREDENTIALS_FILE = "internal.credentials"  # in DIR/pki, on an exported remote host


def hop_name(hop: Hop) -> str:
    """How a hop is written in the credentials file and in messages: ``service/purpose``."""
    return f"{hop.service}/{hop.purpose}"


class MissingCredential(LookupError):
    """A component needs a hop credential its host was not given (or has no credentials at all)."""


class Credentials:
    """The hop credentials one host holds: derived from the installation ``secret`` (the Master,
    a single server, and remote hosts exported before ``internal.credentials`` existed), or only
    the ones it was ``given`` (a remote host's ``pki/internal.credentials``). ``source`` says
    where they came from, for errors."""

    def __init__(self, secret: bytes | None = None, given: Mapping[Hop, str] | None = None, source: str = "") -> None:
        self.secret, self.given, self.source = secret, dict(given or {}), source

    @classmethod
    def of(cls, root: Path) -> Credentials:
        """The host's whose data directory is ``root``: from ``pki/internal.secret`` if it holds
        one, else ``pki/internal.credentials``."""
        dd = DataDir(Path(root))
        given_file = dd.pki / CREDENTIALS_FILE
        if dd.secret_file.exists():
            return cls(secret=dd.internal_secret(), source=str(dd.secret_file))
        if not given_file.exists():
            raise MissingCredential(f"neither {dd.secret_file} nor {given_file} exists: this host has no internal "
                                    "credentials (export it again from the Master: quanta host export)")
        text = given_file.read_bytes().decode("utf-8", errors="replace")  # a bad byte fails its line, below
        return cls(given=parse_credentials(text, str(given_file)), source=str(given_file))

    def __getitem__(self, hop: Hop) -> str:
        if self.secret is not None:
            return _derive(self.secret, hop.service, hop.purpose)
        try:
            return self.given[hop]
        except KeyError:
            raise MissingCredential(
                f"this host was not given the internal credential of hop {hop_name(hop)} ({self.source} holds "
                f"{', '.join(hop_name(h) for h in self.given) or 'none'}): a component runs here that its exported "
                "role does not; export the host again with the right --role") from None

    def require(self, *hops: Hop) -> Credentials:
        """These credentials, after checking each of ``hops`` is among them (a component's start)."""
        for hop in hops:
            self[hop]
        return self

    def file_text(self, hops: Iterable[Hop]) -> str:
        """The ``internal.credentials`` of a host given ``hops`` (:func:`parse_credentials` reads it)."""
        lines = ["# Quanta internal credentials of this host's hops (quanta host export); keep it 0600",
                 *(f"{hop_name(h)} = {self[h]}" for h in hops)]
        return "\n".join(lines) + "\n"


def parse_credentials(text: str, source: str) -> dict[Hop, str]:
    """``service/purpose = HEX`` lines (``#`` comments, blank lines); a malformed line, an unknown
    hop or one given twice is refused with its line number."""
    known = {hop_name(h): h for h in HOPS}
    given: dict[Hop, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = (part.strip() for part in line.partition("="))
        hop = known.get(name)
        if not sep or hop is None or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise MissingCredential(f"{source} line {number}: expected 'service/purpose = <64 hex digits>' with a "
                                    f"known hop ({', '.join(known)}); re-export this host")
        if hop in given:
            raise MissingCredential(f"{source} line {number}: hop {name} given twice; re-export this host")
        given[hop] = value
    return given


def host_credentials(root: Path, *needed: Hop) -> Credentials:
    """The credentials of the host whose data directory is ``root``, checked to hold ``needed``
    (what the calling component uses): :class:`MissingCredential` names the first missing one."""
    return Credentials.of(root).require(*needed)


def credential(source: bytes | Credentials, hop: Hop) -> str:
    """The bearer credential of ``hop``: from this host's :class:`Credentials` (refused if it was
    not given that hop), or derived from an installation secret."""
    if isinstance(source, Credentials):
        return source[hop]
    return _derive(source, hop.service, hop.purpose)


def poke_key(source: bytes | Credentials) -> bytes:
    """The key the Core MACs its pokes with and a Switch checks them with (quanta.protocol.make_poke):
    the :data:`POKE` hop's credential, not the installation secret."""
    return bytes.fromhex(credential(source, POKE))


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
