"""The agent process: holds one ``wss`` connection to a Switch (mutual TLS), runs verified
instructions, and returns their responses until they are acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import random
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import msgspec
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

import quanta
from quanta import protocol as p
from quanta.protocol.agent_session import (AgentSession, Backoff, Close, Effect, Judged, Retry, Run, Send, State, Stop,
                                          retry_delay)
from quanta.signing import ResumingContext, Verifier, client_context

from .activity import ActivityRecord
from .background import BackgroundFetcher
from .config import AgentConfig, SwitchAddress
from .interaction import InteractionHub, ensure_token, serve_interaction
from .journal import FileStore

log = logging.getLogger("quanta.agent")

MAX_PARALLEL = 2
# A payload up to this size is compiled on the event loop (well under a millisecond); if it is
# quick (only quick method calls: Program.quick) it also runs there. Anything else runs on a
# worker thread, so a slow method never stalls the connection. Handing a question to a thread
# and back costs about 0.35 ms of CPU per question, more than a quick payload takes to run.
QUICK_PAYLOAD = 4096


def os_name() -> str:
    return f"{platform.system()} {platform.release()}".strip()


def backoff(attempt: int, lo: float, hi: float, rnd: random.Random | None = None) -> float:
    """Jittered exponential back-off (see :func:`quanta.protocol.agent_session.retry_delay`)."""
    return retry_delay(attempt, lo, hi, rnd or random.Random())


def _refusal(host: str, port: int, ctx: ssl.SSLContext, timeout: float = 5.0, tries: int = 2) -> str | None:
    """Why the Switch refuses this client's TLS, learnt with one plain handshake by the standard
    ``ssl`` module: a TLS 1.3 client hears that its certificate was refused (an alert: unknown CA,
    certificate revoked, ...) only on its first read, which picows makes inside the WebSocket
    upgrade and does not report. None if the handshake and the first read raise no TLS alert."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.settimeout(timeout)
            tls.sendall(b"GET /agent HTTP/1.1\r\nHost: quanta\r\n\r\n")  # anything, to draw an answer
            tls.recv(1)
    except ssl.SSLError as e:
        reason = (e.reason or "").lower()
        for prefix in ("sslv3_alert_", "tlsv1_alert_", "tlsv13_alert_"):
            if reason.startswith(prefix):
                return reason.removeprefix(prefix).replace("_", " ")
        return reason.replace("_", " ") or None
    except (ConnectionResetError, BrokenPipeError):  # closed before its alert was read: ask once more
        return _refusal(host, port, ctx, timeout, tries - 1) if tries > 1 else None
    except OSError:
        return None
    return None


async def open_ws(factory: Callable[[], WSListener], url: str, ctx: ssl.SSLContext, *, explain: bool = True,
                  **kw: Any) -> tuple[WSTransport, WSListener]:
    """``picows.ws_connect`` that tells why a refused connection failed: when the upgrade fails
    without a reason (see :func:`_refusal`), and ``explain`` is set, one plain TLS handshake asks
    the Switch why, and the failure is raised with the alert's name."""
    try:
        transport, listener = await ws_connect(factory, url, ssl_context=ctx, **kw)
    except (ConnectionRefusedError, asyncio.TimeoutError):
        raise
    except Exception as e:
        alert = await _why(url, ctx) if explain else None
        if alert:
            raise ConnectionError(f"TLS alert from the switch: {alert} ({e or type(e).__name__})") from e
        raise
    if listener is None:
        alert = await _why(url, ctx) if explain else None
        raise ConnectionError(f"TLS alert from the switch: {alert}" if alert
                              else "connection closed during the WebSocket upgrade")
    return transport, listener


async def _why(url: str, ctx: ssl.SSLContext) -> str | None:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    return await asyncio.to_thread(_refusal, u.hostname or "localhost", u.port or 443, ctx)


class _Link(WSListener):
    """One connection's picows listener: frames go to the agent's session, the close reason is kept."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.closed = asyncio.get_running_loop().create_future()
        self.close_reason = ""  # the Switch's close code and reason, if it sent a close frame

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.BINARY:
            self.agent.on_frame(frame.get_payload_as_bytes())
        elif frame.msg_type is WSMsgType.CLOSE:
            reason = (frame.get_close_message() or b"").decode(errors="replace")
            log.warning("switch closed the connection: %s %s", frame.get_close_code(), reason)
            self.close_reason = f"closed by the switch: {frame.get_close_code()} {reason}".rstrip()
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class Agent:
    """The shell over :class:`AgentSession`: sockets, the clock, the journal file, execution."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.verifier = Verifier.from_file(cfg.signing_pub)
        self.store = FileStore(cfg.state / "journal.msgpack")
        self.session = AgentSession(self.store, self.verifier, Backoff(cfg.retry_min, cfg.retry_max))
        self.transport: WSTransport | None = None
        self._sem = asyncio.Semaphore(MAX_PARALLEL)
        self._tasks: set[asyncio.Task[None]] = set()
        self.fqdn = socket.getfqdn()
        self.interaction = InteractionHub(ensure_token(cfg.state))
        self._tls: ResumingContext | None = None
        self._tls_stamp: tuple[int, ...] = ()
        self.inventory: ActivityRecord | None = None  # the Activity Record's switch (capture when agent.conf enables it)

    # ------------------------------------------------------------------ messages
    def send(self, msg: Any) -> bool:
        t = self.transport
        if t is None or t.is_disconnected:
            return False
        t.send(WSMsgType.BINARY, p.encode(msg))
        return True

    def on_frame(self, data: bytes) -> None:
        welcomed = self.session.ready
        effects = self.session.receive(data, time.time())
        if not welcomed and self.session.ready:
            self._welcomed()
        self.apply(effects)

    def _welcomed(self) -> None:
        t = self.transport
        ssl_obj = t.underlying_transport.get_extra_info("ssl_object") if t is not None else None
        resumed = ssl_obj is not None and ssl_obj.session_reused
        if ssl_obj is not None and self._tls is not None:
            self._tls.session = ssl_obj.session  # TLS 1.3: its ticket came right after the handshake
        log.info("connected to switch %s (messages up to %d bytes)%s", self.session.switch,
                 self.session.max_message_bytes,
                 " (TLS session resumed)" if resumed else "")

    def apply(self, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Send):
                self.send(e.message)
            elif isinstance(e, Run):
                task = asyncio.create_task(self._execute(e.body))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif isinstance(e, Close):
                log.log(logging.INFO if e.code == WSCloseCode.GOING_AWAY else logging.ERROR,
                        "closing the connection: %s", e.reason)
                t = self.transport
                if t is not None and not t.is_disconnected:
                    t.send_close(WSCloseCode(e.code), p.close_reason(e.reason))
                    t.disconnect()
            elif isinstance(e, Stop):
                from quanta.scale import cancel

                cancel(e.instruction_ids)  # a running payload stops at its next check
            elif isinstance(e, Judged):
                if e.action in ("refuse", "too large"):
                    log.error("instruction %s: %s", e.instruction_id, e.reason)
                elif e.action == "ignore":
                    log.debug("instruction %s ignored: %s", e.instruction_id, e.reason)

    async def _execute(self, body: p.InstructionBody) -> None:
        async with self._sem:
            started = time.perf_counter()
            interact = self.interaction.ask if self.interaction.loop is not None else None
            program = compile_instruction(body) if len(body.payload) <= QUICK_PAYLOAD else None
            if isinstance(program, p.Response):  # did not compile
                response = program
            elif program is not None and program.quick:
                response = run_instruction(body, self.cfg, interact, program)
            else:
                response = await asyncio.to_thread(run_instruction, body, self.cfg, interact, program)
            response = msgspec.structs.replace(response, elapsed_ms=(time.perf_counter() - started) * 1000)
        log.info("instruction %d (%s): %s", body.id, body.name, response.status)
        self.apply(self.session.completed(response, time.time()))
        if body.kind == "action":  # only an action may change the tags (Tagging.Set, Clear, Delete)
            self.tags_changed()

    # ------------------------------------------------------------------ connection
    def hello(self) -> p.Hello:
        """This device's hello, inside the protocol's bounds whatever the host reports: a Switch
        closes a connection whose hello does not fit, so an over-long name or too many tags would
        otherwise keep the device off the network."""
        return p.Hello(device_id=self.cfg.device_name, fqdn=_clip(self.fqdn, 255), os=_clip(os_name(), 255),
                       agent_version=_clip(quanta.__version__, 64), tags=self.tags())

    def tags(self) -> dict[str, str]:
        """This device's tags (``Tagging.Set``'s file) within the protocol's bounds, as the hello and a
        TagReport carry them."""
        from quanta.scale import read_tags

        tags = read_tags(self.cfg.state)
        if len(tags) > p.MAX_TAGS:
            log.warning("this device has %d tags; only the first %d are reported", len(tags), p.MAX_TAGS)
        return {_clip(k, 128): _clip(v, 1024) for k, v in list(tags.items())[:p.MAX_TAGS] if _clip(k, 128)}

    def tags_changed(self) -> None:
        """Tell the Switch the tags now if they changed since it was last told (see AgentSession.tags)."""
        self.apply(self.session.tags(self.tags(), time.time()))

    def tls(self) -> ResumingContext:
        """One client context across reconnects, so the next connection offers this one's TLS
        session (a Switch, restarted or not, then skips the certificate exchange); a new one when
        the certificate or key files change."""
        stamp = tuple(f.stat().st_mtime_ns for f in (self.cfg.ca, self.cfg.cert, self.cfg.key))
        if self._tls is None or stamp != self._tls_stamp:
            ctx = client_context(self.cfg.ca, self.cfg.cert, self.cfg.key, resuming=True)
            assert isinstance(ctx, ResumingContext)
            self._tls, self._tls_stamp = ctx, stamp
        return self._tls

    async def connect_once(self, host: str, port: int) -> _Link:
        ctx = self.tls()
        transport, link = await open_ws(lambda: _Link(self), f"wss://{host}:{port}/agent", ctx,
                                        websocket_handshake_timeout=10, enable_auto_ping=True,
                                        auto_ping_idle_timeout=60, auto_ping_reply_timeout=30,
                                        use_aiofastnet=False, max_frame_size=16 * 1024 * 1024,
                                        read_buffer_init_size=4096)
        self.transport = transport
        self.apply(self.session.connected(self.hello(), time.time()))
        return link  # type: ignore[return-value]

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        index = random.randrange(len(self.cfg.switches))  # spread agents over the Switch list
        housekeeping = asyncio.create_task(self._housekeeping())
        self.inventory = ActivityRecord(self.cfg.conf_path, self.cfg.state)  # Module.Inventory.*, applied live
        self.inventory.start()
        try:
            await serve_interaction(self.interaction, self.cfg.interaction_port, self.cfg.interaction_cert,
                                    self.cfg.interaction_key)
            log.info("interaction port listening on https 127.0.0.1:%d", self.cfg.interaction_port)
        except OSError as e:  # e.g. another agent on this host holds it: prompts are unavailable, nothing else
            log.warning("interaction port %d unavailable (%s); Interaction methods will fail until it is free",
                        self.cfg.interaction_port, e.strerror or e)
            self.interaction.loop = None
        try:
            while not stop.is_set():
                sw = self.cfg.switches[index % len(self.cfg.switches)]
                retry = await self._session(sw, stop)
                if retry is None:
                    break
                if retry.fail_over:
                    index += 1  # try the next Switch in the list
                if retry.revoked:
                    log.error("switch %s refused this device's certificate as revoked (%s); attempt %d, "
                              "next attempt in %.0f s", sw, retry.reason, retry.attempt, retry.delay)
                else:
                    log.warning("no connection to switch %s (%s); attempt %d, next attempt in %.2f s", sw,
                                retry.reason, retry.attempt, retry.delay)
                try:
                    await asyncio.wait_for(stop.wait(), retry.delay)
                except asyncio.TimeoutError:
                    pass
        finally:
            housekeeping.cancel()
            if self.session.state is not State.CLOSED:
                self.session.close()
            self.store.close()
            if self.inventory is not None:
                await asyncio.to_thread(self.inventory.stop)  # writes the rows still queued

    async def _session(self, sw: SwitchAddress, stop: asyncio.Event) -> Retry | None:
        """One connection to ``sw``, until it fails, is lost, or ``stop`` is set (then None)."""
        try:
            link = await asyncio.wait_for(self.connect_once(sw.host, sw.port), 20)
        except Exception as e:  # noqa: BLE001 - TLS refusal, handshake alert, timeout, refused port
            self.transport = None
            return self.session.failed(f"cannot connect: {e or type(e).__name__}")
        waiter = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([link.closed, waiter], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if stop.is_set():
            self.apply(self.session.close())
            self.transport = None
            return None
        self.transport = None
        return self.session.lost(link.close_reason or "connection lost", time.time())

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(5)
            self.apply(self.session.tick(time.time()))
            self.tags_changed()  # tags.json changed some other way (restored, edited by hand)


def _clip(text: str, limit: int) -> str:
    """``text`` without control characters, at most ``limit`` characters (see p.Hello's bounds)."""
    return "".join(ch for ch in text if ch >= " " and ch != "\x7f")[:limit]


def _cell(v: Any) -> Any:
    """A result value as the wire carries it: a blob as its hex text (as ``quanta scale run`` shows it)."""
    return v.hex() if isinstance(v, (bytes, bytearray, memoryview)) else v


def _error_text(err: object) -> str | None:
    """An error as the wire carries it: no NUL (PostgreSQL's text refuses it), at most 8 KiB."""
    return None if not err else str(err).replace("\x00", "\\0")[:8000]


def compile_instruction(body: p.InstructionBody) -> Any:
    """The verified body's payload compiled (a ``Program``), or the error Response to send."""
    from quanta.scale import ScaleError, compile_scale

    try:
        program = compile_scale(body.payload, body.parameters)
    except ScaleError as e:
        return p.Response(instruction_id=body.id, status="error", error=str(e), error_line=e.line,
                          error_column=e.column)
    if program.is_action and body.kind != "action":
        return p.Response(instruction_id=body.id, status="error",
                          error="payload calls an action method but the instruction is a question: refused")
    return program


def run_instruction(body: p.InstructionBody, cfg: AgentConfig, interact: Any = None,
                    program: Any = None) -> p.Response:
    """Compile (unless ``program`` is given) and run a verified instruction body; never raises."""
    from quanta.scale import AgentContext, Limits, run_program

    if program is None:
        program = compile_instruction(body)
        if isinstance(program, p.Response):
            return program
    ctx = AgentContext(data_dir=cfg.state, config_path=cfg.conf_path, log_path=cfg.log_path,
                       agent_version=quanta.__version__, fetch_resource=BackgroundFetcher(cfg), interact=interact,
                       instruction_id=body.id, instruction_name=body.name, storage_owner=body.owner or "adhoc")
    # the payload may run until the instruction's gather window closes (an answer after it is late),
    # between 1 s and the evaluator's default of 60 s
    limits = Limits(timeout_seconds=max(1.0, min(Limits().timeout_seconds, body.expires_at - time.time())))
    try:
        result = run_program(program, context=ctx, limits=limits, allow_actions=body.kind == "action")
    except Exception as e:  # the language promises not to raise; an agent must never die of a payload
        log.exception("instruction %d crashed the evaluator", body.id)
        return p.Response(instruction_id=body.id, status="error", error=f"internal error: {e}")
    err = result.error
    return p.Response(instruction_id=body.id, status=result.status, columns=list(result.columns),
                      rows=[[_cell(v) for v in r] for r in result.rows], error=_error_text(err),
                      error_line=getattr(err, "line", None), error_column=getattr(err, "column", None))
