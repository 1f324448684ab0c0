"""The Coordinator's internal API (port ``coordinator``, 8081, HTTPS), called by the Consumer API
with its own internal credential (quanta.internal.CONSUMER_TO_COORDINATOR). The Consumer API has
already authenticated the user; it passes who they are, and the Coordinator enforces the
workflow rules."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from quanta import instructions as ins
from quanta.db import make_engine
from quanta.internal import (COORDINATOR_TO_CORE, CONSUMER_TO_COORDINATOR, Credentials, InternalAuth, credential,
                            host_credentials, present_host_identity, require_bearer, with_tls)
from quanta.pki import Pki, Signer, tls_server_context
from quanta import metrics
from quanta.runtime import bind_socket, configure_logging
from quanta.settings import DataDir, load_settings

from .service import Coordinator, WorkflowError

log = logging.getLogger("quanta.coordinator")


# an instruction id is a database integer: larger ones are a 422, never a 500
Iid = Annotated[int, PathParam(ge=1, le=2**63 - 1)]


class Actor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(min_length=1, max_length=128)
    role: str = Field(min_length=1, max_length=64)


class Decision(Actor):
    code: str | None = Field(default=None, max_length=16)
    reason: str | None = Field(default=None, max_length=2000)
    source: str = Field(default="", max_length=64)  # the approver's address, for the audit row


def create_app(coord: Coordinator, secret: bytes | Credentials) -> Any:
    """The Coordinator's ASGI app: only the Consumer API's credential for the Coordinator opens
    it, every route (health and the OpenAPI document included) behind :class:`InternalAuth`."""
    token = credential(secret, CONSUMER_TO_COORDINATOR)
    require_token = require_bearer(token)

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coord.run())
        yield
        task.cancel()
        await coord.stop()

    app = FastAPI(title="Quanta Coordinator (internal)", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/Coordinator/openapi.json", dependencies=[Depends(require_token)])

    @app.exception_handler(WorkflowError)
    async def refused(_request: Any, exc: WorkflowError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/Coordinator/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/Coordinator/Instructions/{iid}/Submitted")
    async def submitted(iid: Iid) -> dict[str, Any]:
        await coord.submitted(iid)
        return {"id": iid}

    @app.post("/Coordinator/Instructions/{iid}/Code")
    async def code(iid: Iid, actor: Actor) -> dict[str, Any]:
        return await coord.request_code(iid, actor.username, actor.role)

    @app.post("/Coordinator/Instructions/{iid}/Approve")
    async def approve(iid: Iid, d: Decision, response: Response) -> dict[str, Any]:
        """200: the approval completed it (issued or scheduled). 202: the approval counted, but the
        instruction is not running yet: more approvers are needed (status pending_approval), or the
        Core is unavailable and the Coordinator issues it when it is back (status created,
        issued false)."""
        answer = await coord.approve(iid, d.username, d.role, d.code, d.reason, source=d.source)
        if answer["status"] in (ins.PENDING_APPROVAL, ins.READY):
            response.status_code = 202
        return answer

    @app.get("/Coordinator/Instructions/{iid}/Approvals")
    async def approvals(iid: Iid) -> dict[str, Any]:
        return await coord.approval_state(iid)

    @app.post("/Coordinator/Instructions/{iid}/Reject")
    async def reject(iid: Iid, d: Decision) -> dict[str, Any]:
        if not d.reason:
            raise HTTPException(422, "a rejection needs a reason")
        return await coord.reject(iid, d.username, d.role, d.reason, source=d.source)

    wrapped = InternalAuth(app, lambda _scope: (token,), "coordinator")
    wrapped.fastapi = app  # type: ignore[attr-defined]  # tests enumerate its routes
    return wrapped


async def serve(root: Path) -> None:
    settings = load_settings(root)
    dd = DataDir(root)
    configure_logging("coordinator", settings)
    pki = Pki(dd.pki)
    present_host_identity(pki.root)  # its Issue calls to a remote Response Stack carry its host certificate
    secret = host_credentials(root)
    coord = Coordinator(make_engine(dd.master_url(settings)), Signer.from_file(pki.signing_key),
                        core_url=settings.core_http_url(), core_token=credential(secret, COORDINATOR_TO_CORE),
                        approval_ttl=settings.approval_ttl, ca_file=str(pki.ca_crt),
                        portal_url=f"https://{settings.server_name}:{settings.port('https')}/Explorer/")
    metrics.watch_approvals(coord.master)
    metrics.serve_metrics(settings, "coordinator")
    sock = bind_socket(settings.internal_host, settings.port("coordinator"), "coordinator")
    log.info("coordinator listening on https %s:%d", settings.internal_host, settings.port("coordinator"))
    config = with_tls(uvicorn.Config(create_app(coord, secret), log_level="warning", loop="none",
                                     ssl_certfile=str(pki.server_crt), ssl_keyfile=str(pki.server_key)),
                      tls_server_context(pki.server_crt, pki.server_key))
    await uvicorn.Server(config).serve(sockets=[sock])
