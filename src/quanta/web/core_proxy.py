"""``/Core`` on the web tier: the seed's 443 flows to the Core.

A remote Consumer API (Master → Response Stack) and a DMZ Switch (DMZ → Response Stack) reach
the Core through the Response Stack's HTTPS port. This router checks the caller's internal
credential first (the Consumer API's or the Coordinator's for HTTP, a Switch's for the Switch
WebSocket: the same hops the Core itself accepts) and that it is a host of this installation
(its host certificate: ``quanta.background.auth.HostVerifier``), and relays the request with that same
credential, so the relay adds no credential of its own that could open more than the caller's.
Only the Core's instruction verbs and the Switch link are relayed: the Core's health and OpenAPI
document never answer on the public port (its only health is ``/Consumer/health``).
"""

from __future__ import annotations

import asyncio
import logging
import re

import httpx
import websockets
from fastapi import APIRouter, HTTPException, Request, Response, WebSocket, WebSocketDisconnect

from quanta.background.auth import AuthError, HostVerifier
from quanta.internal import CORE_HTTP, CORE_SWITCH, Credentials, credential, credentials_ok, http_client

log = logging.getLogger("quanta.web.core")
RELAYED = re.compile(r"Instructions/[0-9]{1,18}/(Issue|Cancel|Wait)")


def router(core_http: str, core_ws: str, secret: bytes | Credentials, max_frame: int, hosts: HostVerifier) -> APIRouter:
    """``hosts``: the caller must also prove it is a host of this installation (its host
    certificate, ``X-Quanta-Host-*`` headers signed over the method and path)."""
    r = APIRouter()

    def host(method: str, path: str, headers: dict[str, str]) -> str | None:
        try:
            hosts.verify(method, path, headers)
            return None
        except AuthError as e:
            return str(e)

    http_tokens = [credential(secret, h) for h in CORE_HTTP]
    switch_tokens = [credential(secret, h) for h in CORE_SWITCH]

    @r.api_route("/Core/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    async def relay(path: str, request: Request) -> Response:
        auth = request.headers.get("authorization")
        if not credentials_ok(auth, http_tokens):  # first, before the path is even looked at
            raise HTTPException(401, "missing or wrong internal credential")
        why = host(request.method, request.url.path, dict(request.headers))
        if why is not None:
            raise HTTPException(403, f"host authentication failed: {why}")
        if request.method != "POST" or not RELAYED.fullmatch(path):
            raise HTTPException(404, "not relayed to the Core")
        body = await request.body()
        try:
            upstream = await http_client().request(
                request.method, f"{core_http}/Core/{path}", content=body, params=request.query_params, timeout=60,
                headers={"Authorization": auth or "", "content-type": request.headers.get("content-type", "")})
        except httpx.HTTPError as e:
            raise HTTPException(502, f"the Core behind this web tier is unreachable: {e}") from None
        return Response(upstream.content, upstream.status_code,
                        media_type=upstream.headers.get("content-type"))

    @r.websocket("/Core/Switch")
    async def switch_link(ws: WebSocket) -> None:
        auth = ws.headers.get("authorization")
        if not credentials_ok(auth, switch_tokens):
            log.warning("switch link via /Core from %s refused: missing or wrong internal credential", ws.client)
            await ws.close(code=1008)
            return
        why = host("GET", ws.url.path, dict(ws.headers))
        if why is not None:
            log.warning("switch link via /Core from %s refused: host authentication failed: %s", ws.client, why)
            await ws.close(code=1008)
            return
        try:
            upstream = await websockets.connect(core_ws, additional_headers={"Authorization": auth or ""},
                                                max_size=max_frame, open_timeout=10)
        except (OSError, websockets.WebSocketException) as e:
            log.error("cannot reach the Core for a relayed switch link: %s", e)
            await ws.close(code=1011)
            return
        await ws.accept()

        async def down() -> None:
            async for data in upstream:
                await ws.send_bytes(data if isinstance(data, bytes) else data.encode())

        async def up() -> None:
            while True:
                await upstream.send(await ws.receive_bytes())

        tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except (WebSocketDisconnect, websockets.ConnectionClosed):
            pass
        finally:
            for t in tasks:
                t.cancel()
            await upstream.close()
            try:
                await ws.close()
            except RuntimeError:
                pass

    return r
