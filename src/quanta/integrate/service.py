"""The Integrate Agent process: WebSocket endpoint on the integrate port (loopback only) and the scheduler.

Wire protocol (JSON text frames, msgspec-typed). The client must send ``Authorization: Bearer
<the Integrate Agent's internal credential, quanta.internal.INTEGRATE_CLIENT>`` with the WebSocket handshake; without it the handshake is refused with 401 and no
frame is ever read. Then, one request per frame::

    {"type": "run", "connector": "NAME"}   ->  {"type": "result", "connector": ..., "ok": ..., "created": ...,
                                                 "updated": ..., "unchanged": ..., "removed": ..., "skipped": ...,
                                                 "error": null | "..."}
    {"type": "list"}                       ->  {"type": "connectors", "connectors": [...], "error": null | "..."}
    anything else                          ->  {"type": "error", "message": "..."}
"""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal

import msgspec
import sqlalchemy as sa

from . import sync
from .config import ConfigError, IntegrateConfig, config_path, load_config
from .connectors import SourceError, read_source, to_records

log = logging.getLogger("quanta.integrate")

MAX_FRAME = 64 * 1024
LOOPBACK = "127.0.0.1"


# ----------------------------------------------------------------------------------- messages
class Run(msgspec.Struct, tag="run", forbid_unknown_fields=True):
    connector: str


class ListConnectors(msgspec.Struct, tag="list", forbid_unknown_fields=True):
    pass


Request = Run | ListConnectors


class Result(msgspec.Struct, tag="result"):
    connector: str
    ok: bool
    trigger: str = "demand"
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: int = 0
    error: str | None = None
    seconds: float = 0.0
    attributes_set: int = 0
    attributes_removed: int = 0
    problems: list[str] = []  # devices whose attributes were refused (the run went on), at most sync.MAX_PROBLEMS


class ConnectorInfo(msgspec.Struct):
    name: str
    type: str
    interval: int
    last_run: dict[str, Any] | None = None


class Connectors(msgspec.Struct, tag="connectors"):
    connectors: list[ConnectorInfo]
    error: str | None = None


class Error(msgspec.Struct, tag="error"):
    message: str


Reply = Result | Connectors | Error
_decoder = msgspec.json.Decoder(Request)
_reply_decoder = msgspec.json.Decoder(Reply)


def decode_request(data: str | bytes) -> Request:
    return _decoder.decode(data)


def decode_reply(data: str | bytes) -> Reply:
    return _reply_decoder.decode(data)


# ------------------------------------------------------------------------------------ service
class IntegrateAgent:
    """Runs connectors (one at a time per connector) and records every run."""

    def __init__(self, root: Path, master: sa.Engine) -> None:
        self.root = root
        self.master = master
        self._locks: dict[str, asyncio.Lock] = {}
        self._last: dict[str, float] = {}

    def config(self) -> IntegrateConfig:
        return load_config(self.root)

    def run_sync(self, name: str, trigger: str, config: IntegrateConfig | None = None) -> Result:
        """Read the whole source, then apply it in one transaction. Any failure changes no device."""
        started = time.time()
        try:
            cfg = (config or self.config()).get(name)
        except ConfigError as e:
            return Result(name, False, trigger, error=str(e))
        result: sync.SyncResult | None = None
        error: str | None = None
        try:
            rows = read_source(cfg)
            records = to_records(cfg, rows)
            result = sync.apply(self.master, cfg.name, records, cfg.allow_empty)
        except SourceError as e:
            error = f"connector {name!r} ({cfg.type}): {e}; nothing was changed"
        except sa.exc.SQLAlchemyError as e:
            error = f"connector {name!r}: master database error {type(e).__name__}; nothing was changed"
        try:
            sync.record_run(self.master, name, trigger, started, result if error is None else None, error)
        except sa.exc.SQLAlchemyError:
            log.exception("could not record the run of connector %s", name)
        r = result or sync.SyncResult()
        out = Result(name, error is None, trigger, r.created, r.updated, r.unchanged, r.removed, r.skipped, error,
                     round(time.time() - started, 3), r.attributes_set, r.attributes_removed, r.problems)
        if error:
            log.warning("%s", error)
        else:
            log.info("connector %s (%s): %d created, %d updated, %d unchanged, %d removed, %d skipped, "
                     "%d attributes set, %d removed in %.2fs", name, trigger, out.created, out.updated,
                     out.unchanged, out.removed, out.skipped, out.attributes_set, out.attributes_removed, out.seconds)
            for problem in out.problems[:10]:
                log.warning("connector %s: %s", name, problem)
            if len(out.problems) > 10:
                log.warning("connector %s: %d more devices with refused attributes (see the audit log)", name,
                            len(out.problems) - 10)
        return out

    async def run(self, name: str, trigger: str, config: IntegrateConfig | None = None) -> Result:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            self._last[name] = time.monotonic()
            return await asyncio.to_thread(self.run_sync, name, trigger, config)

    def connectors(self) -> Connectors:
        try:
            cfg = self.config()
        except ConfigError as e:
            return Connectors([], str(e))
        runs: dict[str, dict[str, Any]] = {}
        for r in reversed(sync.last_runs(self.master, 200)):
            runs[r["connector"]] = r
        return Connectors([ConnectorInfo(c.name, c.type, c.interval, runs.get(c.name)) for c in cfg.connector])

    async def handle(self, data: str | bytes) -> Reply:
        try:
            req = decode_request(data)
        except msgspec.ValidationError as e:
            return Error(f"bad request: {e}")
        except msgspec.DecodeError as e:
            return Error(f"malformed request: {e}")
        if isinstance(req, Run):
            return await self.run(req.connector, "demand")
        return await asyncio.to_thread(self.connectors)

    async def scheduler(self, tick: float = 1.0) -> None:
        """Run each connector with ``interval > 0`` at start and then every ``interval`` seconds.
        The configuration file is re-read when it changes; an invalid file is logged and retried."""
        mtime: float | None = None
        cfg = IntegrateConfig()
        while True:
            try:
                m = config_path(self.root).stat().st_mtime if config_path(self.root).exists() else 0.0
                if m != mtime:
                    mtime = m
                    cfg = self.config()
                    log.info("integrate configuration: %d connector(s): %s", len(cfg.connector),
                             ", ".join(f"{c.name} ({c.type}, every {c.interval}s)" if c.interval else
                                       f"{c.name} ({c.type}, on demand)" for c in cfg.connector) or "none")
            except ConfigError as e:
                log.error("%s (scheduled runs paused until it is fixed)", e)
                cfg = IntegrateConfig()
            now = time.monotonic()
            for c in cfg.connector:
                if c.interval and now - self._last.get(c.name, -1e18) >= c.interval:
                    self._last[c.name] = now
                    asyncio.create_task(self.run(c.name, "schedule", cfg))
            await asyncio.sleep(tick)


async def serve(root: Path) -> None:
    from websockets.asyncio.server import ServerConnection, serve as ws_serve
    from websockets.datastructures import Headers
    from websockets.http11 import Response

    from quanta.db import make_engine
    from quanta.internal import INTEGRATE_CLIENT, bearer_ok, credential
    from quanta.metrics import serve_metrics
    from quanta.runtime import bind_socket, configure_logging, wait_for_signal
    from quanta.settings import DataDir, load_settings

    settings = load_settings(root)
    configure_logging("integrate", settings)
    serve_metrics(settings, "integrate")
    dd = DataDir(Path(root))
    token = credential(dd.internal_secret(), INTEGRATE_CLIENT)
    master = make_engine(dd.master_url(settings))
    agent = IntegrateAgent(Path(root), master)
    port = settings.port("integrate")
    sock = bind_socket(LOOPBACK, port, "integrate")  # local only (seed: remote installation not supported)

    def authorise(conn: ServerConnection, request: Any) -> Response | None:
        if not bearer_ok(request.headers.get("Authorization"), token):
            log.warning("integrate connection from %s refused: missing or wrong internal credential",
                        conn.remote_address)
            return Response(HTTPStatus.UNAUTHORIZED.value, "Unauthorized",
                            Headers([("Content-Type", "text/plain")]), b"internal credential required\n")
        return None

    async def handler(conn: ServerConnection) -> None:
        async for message in conn:
            reply = await agent.handle(message)
            await conn.send(msgspec.json.encode(reply).decode())

    async with ws_serve(handler, sock=sock, process_request=authorise, max_size=MAX_FRAME, server_header=None):
        log.info("integrate agent listening on ws %s:%d (loopback only)", LOOPBACK, port)
        scheduler = asyncio.create_task(agent.scheduler())
        await wait_for_signal()
        scheduler.cancel()


def request(root: Path, req: Request, timeout: float = 600) -> Reply:
    """Send one request to the running Integrate Agent of ``root`` (the CLI's side)."""
    from websockets.exceptions import InvalidStatus, WebSocketException
    from websockets.sync.client import connect

    from quanta.internal import INTEGRATE_CLIENT, credential
    from quanta.settings import DataDir, load_settings

    settings = load_settings(root)
    port = settings.port("integrate")
    token = credential(DataDir(Path(root)).internal_secret(), INTEGRATE_CLIENT)
    url = f"ws://{LOOPBACK}:{port}/"
    try:
        with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10,
                     max_size=16 * 1024 * 1024, close_timeout=2) as ws:
            ws.send(msgspec.json.encode(req).decode())
            return decode_reply(ws.recv(timeout=timeout))
    except InvalidStatus as e:
        raise ConnectionError(f"the Integrate Agent at {url} refused the connection: HTTP "
                              f"{e.response.status_code}") from None
    except (OSError, WebSocketException, TimeoutError) as e:
        raise ConnectionError(f"cannot reach the Integrate Agent at {url} ({e}); is 'quanta integrate {root}' "
                              "or 'quanta server' running?") from None
