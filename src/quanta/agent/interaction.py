"""The agent's interaction port (``Module.Interaction.Port``, 7766): end-user prompts and answers.

The agent listens on loopback only, with TLS (a certificate issued at enrolment whose only name
is ``quanta-interaction.<device>``, so it cannot pass for any real host), for the user session's
client (``quanta prompt AGENTDIR``). The client must present the session token from
``AGENTDIR/state/interaction.token`` in its first message; nothing else is read before that.
``Interaction.ShowQuestion`` and ``Interaction.ShowAnnouncement`` queue a prompt here and (unless
``Async``) wait for the answer or the timeout.

Messages are msgspec structs, one JSON text frame each:
agent -> user: :class:`Prompt`; user -> agent: :class:`Auth` then :class:`Answer`.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import secrets
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

from quanta import protocol as p

log = logging.getLogger("quanta.agent.interaction")


class Auth(msgspec.Struct, tag="auth"):
    token: str


class Answer(msgspec.Struct, tag="answer"):
    id: int
    response: str  # "Yes", "No", "Acknowledged"


class Prompt(msgspec.Struct, tag="prompt"):
    id: int
    kind: str  # "question" or "announcement"
    title: str
    description: str
    timeout: float


_dec = msgspec.json.Decoder(Auth | Answer)
_enc = msgspec.json.Encoder()
ANSWERS = ("Yes", "No", "Acknowledged")


def token_file(state: Path) -> Path:
    return state / "interaction.token"


def ensure_token(state: Path) -> str:
    f = token_file(state)
    if not f.exists():
        state.mkdir(parents=True, exist_ok=True)
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(24))
    return f.read_text().strip()


@dataclass
class _Pending:
    prompt: Prompt
    future: Future[str] = field(default_factory=Future)


class InteractionHub:
    """Thread-safe: SCALE methods call :meth:`ask` from the instruction worker thread."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sessions: set[_Session] = set()
        self.pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def ask(self, kind: str, title: str, description: str, timeout: float, wait: bool) -> str:
        """Queue a prompt for the user; return their answer, "TimedOut", or "Queued" (async)."""
        if self.loop is None:
            raise RuntimeError("no interaction port is running")
        with self._lock:
            p = _Pending(Prompt(id=next(self._ids), kind=kind, title=title, description=description, timeout=timeout))
            self.pending[p.prompt.id] = p
        self.loop.call_soon_threadsafe(self._broadcast, p.prompt)
        if not wait:
            return "Queued"
        try:
            return p.future.result(timeout)
        except TimeoutError:
            return "TimedOut"
        finally:
            with self._lock:
                self.pending.pop(p.prompt.id, None)

    def _broadcast(self, prompt: Prompt) -> None:
        for s in list(self.sessions):
            s.send(prompt)

    def answer(self, a: Answer) -> None:
        with self._lock:
            p = self.pending.get(a.id)
        if p is not None and not p.future.done():
            p.future.set_result(a.response)

    def outstanding(self) -> list[Prompt]:
        with self._lock:
            return [p.prompt for p in self.pending.values()]


class _Session(WSListener):
    def __init__(self, hub: InteractionHub) -> None:
        self.hub = hub
        self.t: WSTransport | None = None
        self.authed = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.t = transport

    def send(self, prompt: Prompt) -> None:
        if self.t is not None and self.authed:
            self.t.send(WSMsgType.TEXT, _enc.encode(prompt))

    def _close(self, reason: str) -> None:
        log.warning("interaction session closed: %s", reason)
        assert self.t is not None
        self.t.send_close(WSCloseCode.POLICY_VIOLATION, p.close_reason(reason))
        self.t.disconnect()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            transport.disconnect()
            return
        if frame.msg_type is not WSMsgType.TEXT:
            return
        try:
            msg = _dec.decode(frame.get_payload_as_bytes())
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self._close(f"malformed message: {e}")
            return
        if not self.authed:
            if not isinstance(msg, Auth) or not hmac.compare_digest(msg.token, self.hub.token):
                self._close("authenticate first with the session token")
                return
            self.authed = True
            self.hub.sessions.add(self)
            for p in self.hub.outstanding():
                self.send(p)
        elif isinstance(msg, Answer):
            if msg.response not in ANSWERS:
                self._close(f"answer must be one of {ANSWERS}")
                return
            self.hub.answer(msg)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.hub.sessions.discard(self)


async def serve_interaction(hub: InteractionHub, port: int, cert: Path, key: Path) -> asyncio.Server:
    from quanta.pki import tls_server_context  # TLS 1.2/1.3, AEAD suites only, like every listener

    ctx = tls_server_context(cert, key)
    hub.loop = asyncio.get_running_loop()
    return await ws_create_server(lambda _r: _Session(hub), "127.0.0.1", port, ssl=ctx, use_aiofastnet=False,
                                  max_frame_size=64 * 1024, read_buffer_init_size=1024)


async def prompt_client(state: Path, ca: Path, device: str, port: int, decide, once: bool = False) -> int:  # type: ignore[no-untyped-def]
    """The user session's side: show each prompt and send back ``decide(prompt)``'s answer.

    Returns the number of prompts answered (``once``: stop after the first)."""
    import ssl

    from picows import ws_connect

    ctx = ssl.create_default_context(cafile=str(ca))
    done = asyncio.get_running_loop().create_future()
    answered = 0

    class Client(WSListener):
        def on_ws_frame(self, t: WSTransport, frame: WSFrame) -> None:
            nonlocal answered
            if frame.msg_type is WSMsgType.CLOSE:
                t.disconnect()
                return
            if frame.msg_type is not WSMsgType.TEXT:
                return
            prompt = msgspec.json.decode(frame.get_payload_as_bytes(), type=Prompt)
            t.send(WSMsgType.TEXT, _enc.encode(Answer(id=prompt.id, response=decide(prompt))))
            answered += 1
            if once and not done.done():
                done.set_result(None)

        def on_ws_disconnected(self, t: WSTransport) -> None:
            if not done.done():
                done.set_result(None)

    from .config import interaction_name

    transport, _ = await ws_connect(Client, f"wss://127.0.0.1:{port}/", ssl_context=ctx,
                                    server_hostname=interaction_name(device), use_aiofastnet=False)
    transport.send(WSMsgType.TEXT, _enc.encode(Auth(token=token_file(state).read_text().strip())))
    try:
        await done
    finally:
        transport.disconnect()
    return answered
