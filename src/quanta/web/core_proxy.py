"""``/Core`` on the web tier: the seed's 443 flows to the Core.

A remote Consumer API (Master → Response Stack) and a DMZ Switch (DMZ → Response Stack) reach
the Core through the Response Stack's HTTPS port. This router checks the internal token first,
then relays to the local Core's internal endpoint (HTTP requests, and the Switch WebSocket).
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import websockets
from fastapi import APIRouter, HTTPException, Request, Response, WebSocket, WebSocketDisconnect

from quanta.internal import bearer, bearer_ok, http_client

log = logging.getLogger("quanta.web.core")


def router(core_http: str, core_ws: str, token: str, max_frame: int) -> APIRouter:
    r = APIRouter()

    def ok(value: str | None) -> bool:
        return bearer_ok(value, token)

    @r.api_route("/Core/{path:path}", methods=["GET", "POST"], include_in_schema=False)
    async def relay(path: str, request: Request) -> Response:
        if path != "health" and not ok(request.headers.get("authorization")):  # health needs no token
            raise HTTPException(401, "missing or wrong internal token")
        body = await request.body()
        try:
            upstream = await http_client().request(
                request.method, f"{core_http}/Core/{path}", content=body, params=request.query_params, timeout=60,
                headers={**bearer(token), "content-type": request.headers.get("content-type", "")})
        except httpx.HTTPError as e:
            raise HTTPException(502, f"the Core behind this web tier is unreachable: {e}") from None
        return Response(upstream.content, upstream.status_code,
                        media_type=upstream.headers.get("content-type"))

    @r.websocket("/Core/Switch")
    async def switch_link(ws: WebSocket) -> None:
        if not ok(ws.headers.get("authorization")):
            log.warning("switch link via /Core from %s refused: missing or wrong internal token", ws.client)
            await ws.close(code=1008)
            return
        try:
            upstream = await websockets.connect(core_ws, additional_headers=bearer(token),
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
