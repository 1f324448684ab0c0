"""The web tier on the HTTPS port: Consumer API (/Consumer), portal (/Explorer) and Background Channel (/Background)."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from quanta import background, portal
from quanta.accounts import Policy
from quanta.background import ContentStore
from quanta.background.auth import DeviceVerifier, HostVerifier
from quanta.catalog.app import CatalogClient
from quanta.consumer_api import ConsumerApi, create_app
from quanta.db import make_engine
from quanta.internal import (BACKGROUND_REPLICATION, CONSUMER_TO_CORE, CONSUMER_TO_COORDINATOR, credential,
                            host_credentials, present_host_identity, with_tls)
from quanta.pki import Pki, Signer, tls_server_context
from quanta.datadir import tighten
from quanta.metrics import RequestMetrics, serve_metrics
from quanta.runtime import bind_socket, configure_logging
from quanta.settings import DataDir, Settings, core_link_max_bytes, load_settings

from . import core_proxy

log = logging.getLogger("quanta.web")


def _loopback_name(host: str) -> str:
    """The server certificate names localhost and 127.0.0.1; use a name it covers."""
    return "localhost" if host in ("127.0.0.1", "localhost", "0.0.0.0") else host


def build_app(root: Path, settings: Settings) -> FastAPI:
    """What this host's web tier serves depends on its role (DESIGN §2 topologies):
    the Master parts (/Consumer, /Explorer) on single and master hosts, /Core where a Core runs
    (single, response), and the Background Channel everywhere agents fetch content."""
    dd = DataDir(root)
    pki = Pki(dd.pki)
    content = ContentStore(dd.content)
    secret = host_credentials(root)
    # a Response Stack receives no content replication (the Master replicates to DMZ servers)
    replication = None if settings.role == "response" else credential(secret, BACKGROUND_REPLICATION)
    if settings.role in ("single", "master"):
        api = ConsumerApi(make_engine(dd.master_url(settings)), make_engine(dd.responses_url(settings)),
                          Signer.from_file(pki.signing_key), core_url=settings.core_http_url(),
                          core_token=credential(secret, CONSUMER_TO_CORE),
                          coordinator_token=credential(secret, CONSUMER_TO_COORDINATOR), replication_token=replication,
                          content=content, ca_file=str(pki.ca_crt),
                          coordinator_url=f"https://{_loopback_name(settings.internal_host)}:{settings.port('coordinator')}",
                          approval_ttl=settings.approval_ttl, replicate_to=settings.replicate_to,
                          catalog=lambda: CatalogClient.for_data_dir(root), policy=Policy.from_settings(settings))
        app = create_app(api)
        portal.mount(app)
    else:
        app = FastAPI(title=f"Quanta web tier ({settings.role})", docs_url=None, redoc_url=None, openapi_url=None)
    if settings.role in ("single", "response"):
        app.include_router(core_proxy.router(f"http://{settings.internal_host}:{settings.port('core')}",
                                             f"ws://{settings.internal_host}:{settings.port('core')}/Core/Switch",
                                             secret, core_link_max_bytes(settings.max_message_bytes),
                                             HostVerifier(pki.ca_crt, pki.crl)))
    app.include_router(background.router(content, DeviceVerifier(pki.ca_crt, pki.crl), replication_token=replication))
    return app


async def serve(root: Path) -> None:
    settings = load_settings(root)
    configure_logging("web", settings)
    serve_metrics(settings, "web")
    loose = tighten(root)  # an installation made before the modes were enforced
    if loose:
        log.warning("made %d path(s) of %s private (they were open to other users): %s%s", len(loose), root,
                    ", ".join(str(p) for p in loose[:5]), " ..." if len(loose) > 5 else "")
    pki = Pki(DataDir(root).pki)
    if pki.ensure_host_certificate(settings.server_name):
        log.info("issued this host's host certificate (%s)", pki.host_crt)
    present_host_identity(pki.root)  # its calls to remote hosts (relay, replication) carry its host certificate
    app = build_app(root, settings)
    sock = bind_socket(settings.bind_host, settings.port("https"), "https")
    served = (["/Consumer", "/Explorer"] if settings.role in ("single", "master") else []) + \
        (["/Core"] if settings.role in ("single", "response") else []) + ["/Background"]
    log.info("web tier listening on https %s:%d (%s)", settings.bind_host, settings.port("https"), ", ".join(served))
    config = with_tls(uvicorn.Config(RequestMetrics(app), log_level="warning", loop="none", ssl_certfile=str(pki.server_crt),
                                     ssl_keyfile=str(pki.server_key), proxy_headers=False),
                      tls_server_context(pki.server_crt, pki.server_key))
    await uvicorn.Server(config).serve(sockets=[sock])
