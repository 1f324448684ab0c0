"""The Core's internal endpoint (port ``core``, 3900): HTTP for the Consumer API, WebSocket for
Switches. Every request must carry its hop's internal credential (quanta.internal): the
Consumer API's or the Coordinator's on HTTP, a Switch's on the Switch link. It is checked by
:class:`quanta.internal.InternalAuth` in front of the whole app, before routing: health, the
OpenAPI document and unknown paths answer nothing without it.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Query, WebSocket, WebSocketDisconnect

from quanta import protocol as p
from quanta.db import make_engine
from quanta.internal import (CORE_HTTP, CORE_SWITCH, POKE, Credentials, InternalAuth, credential, credentials_ok,
                             host_credentials)
from quanta.datadir import tighten
from quanta.metrics import serve_metrics
from quanta.runtime import bind_socket, configure_logging
from quanta.core.stacks import StackCore
from quanta.settings import DataDir, core_link_max_bytes, load_settings

from .service import BatchNotStored, Core

log = logging.getLogger("quanta.core")
WAIT_MAX = 30.0  # longest Wait the Core holds; the web tier's /Core relay allows 60 s


def create_app(core: Core, secret: bytes | Credentials) -> Any:
    """The Core's ASGI app: the FastAPI routes behind :class:`InternalAuth`."""
    http_tokens = [credential(secret, h) for h in CORE_HTTP]
    switch_tokens = [credential(secret, h) for h in CORE_SWITCH]

    def require_token(authorization: str | None = Header(default=None)) -> None:
        if not credentials_ok(authorization, http_tokens):
            raise HTTPException(401, "missing or wrong internal credential")

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        await core.start()
        yield
        await core.stop()

    app = FastAPI(title="Quanta Core (internal)", lifespan=lifespan, openapi_url="/Core/openapi.json",
                  docs_url=None, redoc_url=None)

    @app.get("/Core/health", dependencies=[Depends(require_token)])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "switches": sorted(core.switches), "active": sorted(core.active)}

    @app.post("/Core/Instructions/{instruction_id}/Issue", dependencies=[Depends(require_token)])
    async def issue(instruction_id: int) -> dict[str, Any]:
        try:
            return await core.issue(instruction_id)
        except KeyError:
            raise HTTPException(404, f"instruction {instruction_id} not found") from None
        except ValueError as e:
            raise HTTPException(409, str(e)) from None

    @app.post("/Core/Instructions/{instruction_id}/Cancel", dependencies=[Depends(require_token)])
    async def cancel(instruction_id: int) -> dict[str, Any]:
        if not await core.cancel(instruction_id):
            raise HTTPException(409, f"instruction {instruction_id} is not active")
        return {"id": instruction_id, "status": "cancelled"}

    @app.post("/Core/Instructions/{instruction_id}/Wait", dependencies=[Depends(require_token)])
    async def wait(instruction_id: int, timeout: float = Query(25.0, ge=0, le=WAIT_MAX)) -> dict[str, Any]:
        """Return when the instruction is no longer active here, or after ``timeout`` seconds:
        the Consumer API's long poll (its final status is in the database by then)."""
        return {"id": instruction_id, "ended": await core.wait(instruction_id, timeout)}

    @app.websocket("/Core/Switch")
    async def switch_link(ws: WebSocket) -> None:
        if not credentials_ok(ws.headers.get("authorization"), switch_tokens):
            log.warning("switch link from %s refused: missing or wrong internal credential", ws.client)
            await ws.close(code=1008)
            return
        await ws.accept()
        send_lock = asyncio.Lock()

        async def send(data: bytes) -> None:
            async with send_lock:
                await ws.send_bytes(data)

        link = None
        try:
            first = await ws.receive_bytes()
            hello = p.decode_from_switch(first)
            if not isinstance(hello, p.SwitchHello):
                raise p.ProtocolError("the first message must be a switch hello")
            link = await core.switch_connected(hello, send)
            while True:
                await core.handle(link, p.decode_from_switch(await ws.receive_bytes()))
        except WebSocketDisconnect:
            pass
        except (p.ProtocolError, KeyError) as e:
            log.error("closing switch link %s: %s", link.name if link else ws.client, e)
            await ws.close(code=1008)
        except BatchNotStored as e:
            log.error("closing switch link %s: %s", link.name if link else ws.client, e)
            await ws.close(code=1011)
        finally:
            if link is not None:
                await core.switch_disconnected(link)

    def accepted(scope: dict[str, Any]) -> list[str]:
        return switch_tokens if scope["type"] == "websocket" else http_tokens

    wrapped = InternalAuth(app, accepted, "core")
    wrapped.fastapi = app  # type: ignore[attr-defined]  # tests enumerate its routes
    return wrapped


async def serve(root: Path) -> None:
    settings = load_settings(root)
    dd = DataDir(root)
    configure_logging("core", settings)
    serve_metrics(settings, "core")
    loose = tighten(root)  # an installation made before the modes were enforced
    if loose:
        log.warning("made %d path(s) of %s private (they were open to other users): %s%s", len(loose), root,
                    ", ".join(str(p) for p in loose[:5]), " ..." if len(loose) > 5 else "")
    secret = host_credentials(root, *CORE_HTTP, *CORE_SWITCH, POKE)
    # several Response Stacks share one database: each follows what the others issue and end
    core_cls = StackCore if settings.role == "response" else Core
    core = core_cls(make_engine(dd.master_url(settings)), make_engine(dd.responses_url(settings)), secret)
    app = create_app(core, secret)
    sock = bind_socket(settings.internal_host, settings.port("core"), "core")
    log.info("core listening on ws/http %s:%d", settings.internal_host, settings.port("core"))
    config = uvicorn.Config(app, log_level="warning", loop="none", lifespan="on",
                            ws_max_size=core_link_max_bytes(settings.max_message_bytes), ws_ping_interval=20)
    await uvicorn.Server(config).serve(sockets=[sock])
