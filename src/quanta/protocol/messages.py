"""Wire messages between agents, Switches and the Core (sans-I/O).

Every message is a msgspec Struct, encoded as MessagePack in one binary WebSocket frame.
Decoding validates types at the boundary: anything that is not exactly one of the known
messages raises :class:`ProtocolError`, and the caller closes that one connection.

Flows:

* agent  -> Switch: :class:`Hello`, :class:`Response`
* Switch -> agent : :class:`Welcome`, :class:`Deliver`, :class:`ResponseAck`, :class:`Cancel`
* Switch -> Core  : :class:`SwitchHello`, :class:`DevicesOnline`, :class:`DevicesOffline`,
  :class:`FetchWork`, :class:`Delivered`, :class:`ResponseBatch`
* Core  -> Switch : :class:`Work`, :class:`BatchAck`, :class:`Cancel`
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from typing import Any, Literal

import msgspec

__all__ = [
    "ProtocolError",
    "Hello",
    "Welcome",
    "SignedInstruction",
    "InstructionBody",
    "Deliver",
    "Response",
    "ResponseAck",
    "Cancel",
    "DeviceInfo",
    "SwitchHello",
    "DevicesOnline",
    "DevicesOffline",
    "FetchWork",
    "WorkItem",
    "Work",
    "Delivered",
    "DeviceResponse",
    "ResponseBatch",
    "BatchAck",
    "decode_from_agent",
    "decode_from_switch_for_agent",
    "decode_from_switch",
    "decode_from_core",
    "encode_body",
    "decode_body",
    "make_poke",
    "check_poke",
    "internal_token",
    "PROTOCOL_VERSION",
    "Status",
    "AgentToSwitch",
    "SwitchToAgent",
    "SwitchToCore",
    "CoreToSwitch",
    "encode",
    "POKE_SIZE",
    "POKE_MAX_SKEW_MS",
    "ALL_STATES",
    "FINAL_STATES",
    "LIVE_STATES",
]

PROTOCOL_VERSION = 1

Status = Literal["success", "nocontent", "error", "notapplicable", "notimplemented"]
# Per-(instruction, device) states kept by the Core.
from quanta.states import ALL_STATES, FINAL_STATES, LIVE_STATES  # noqa: E402,F401


class ProtocolError(Exception):
    """A frame that is not a valid message; the connection that sent it is closed."""


# --------------------------------------------------------------------- agent <-> Switch
class Hello(msgspec.Struct, tag="hello", frozen=True):
    device_id: str
    fqdn: str
    os: str
    agent_version: str
    tags: dict[str, str] = {}
    protocol: int = PROTOCOL_VERSION


class Welcome(msgspec.Struct, tag="welcome", frozen=True):
    switch: str
    heartbeat_seconds: float
    # The largest message the Switch accepts from this agent: a response whose encoding is larger
    # is never sent as it is (the agent answers with an error instead; see the agent runtime).
    max_message_bytes: int = 1024 * 1024


class SignedInstruction(msgspec.Struct, frozen=True):
    """``body`` is the msgpack of :class:`InstructionBody`; ``signature`` is Ed25519 over it."""

    body: bytes
    signature: bytes


class InstructionBody(msgspec.Struct, frozen=True):
    id: int
    name: str
    kind: Literal["question", "action"]
    payload: str
    parameters: dict[str, Any]
    issued_at: float
    expires_at: float


class Deliver(msgspec.Struct, tag="deliver", frozen=True):
    instruction: SignedInstruction


class Response(msgspec.Struct, tag="response", frozen=True):
    instruction_id: int
    status: Status
    columns: list[str] = []
    rows: list[list[Any]] = []
    error: str | None = None
    error_line: int | None = None
    error_column: int | None = None
    elapsed_ms: float = 0.0


class ResponseAck(msgspec.Struct, tag="response_ack", frozen=True):
    instruction_ids: list[int]


class Cancel(msgspec.Struct, tag="cancel", frozen=True):
    instruction_ids: list[int]


AgentToSwitch = Hello | Response
SwitchToAgent = Welcome | Deliver | ResponseAck | Cancel


# --------------------------------------------------------------------- Switch <-> Core
class DeviceInfo(msgspec.Struct, frozen=True):
    device_id: str
    fqdn: str
    os: str
    agent_version: str
    tags: dict[str, str] = {}
    address: str = ""


class SwitchHello(msgspec.Struct, tag="switch_hello", frozen=True):
    name: str
    host: str
    port: int
    incarnation: str  # changes on every Switch start, so the Core can reset its view


class DevicesOnline(msgspec.Struct, tag="online", frozen=True):
    devices: list[DeviceInfo]


class DevicesOffline(msgspec.Struct, tag="offline", frozen=True):
    device_ids: list[str]


class FetchWork(msgspec.Struct, tag="fetch", frozen=True):
    known: list[int] = []  # instruction ids the Switch already holds


class WorkItem(msgspec.Struct, frozen=True):
    instruction: SignedInstruction
    id: int
    expires_at: float
    devices: list[str] | None  # None: every device


class Work(msgspec.Struct, tag="work", frozen=True):
    items: list[WorkItem]
    active: list[int]  # every instruction id still live; the Switch drops the rest


class Delivered(msgspec.Struct, tag="delivered", frozen=True):
    instruction_id: int
    device_ids: list[str]


class DeviceResponse(msgspec.Struct, frozen=True):
    device_id: str
    response: Response


class ResponseBatch(msgspec.Struct, tag="batch", frozen=True):
    batch_id: int
    responses: list[DeviceResponse]


class BatchAck(msgspec.Struct, tag="batch_ack", frozen=True):
    batch_id: int


SwitchToCore = SwitchHello | DevicesOnline | DevicesOffline | FetchWork | Delivered | ResponseBatch
CoreToSwitch = Work | BatchAck | Cancel

_enc = msgspec.msgpack.Encoder()
encode = _enc.encode

_dec_agent = msgspec.msgpack.Decoder(AgentToSwitch)
_dec_switch_from_agent_side = msgspec.msgpack.Decoder(SwitchToAgent)
_dec_core_side = msgspec.msgpack.Decoder(SwitchToCore)
_dec_switch_side = msgspec.msgpack.Decoder(CoreToSwitch)
_dec_body = msgspec.msgpack.Decoder(InstructionBody)


def _decode(decoder: msgspec.msgpack.Decoder, data: bytes | memoryview) -> Any:
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"malformed message: {e}") from None


def decode_from_agent(data: bytes | memoryview) -> Hello | Response:
    return _decode(_dec_agent, data)


def decode_from_switch_for_agent(data: bytes | memoryview) -> Welcome | Deliver | ResponseAck | Cancel:
    return _decode(_dec_switch_from_agent_side, data)


def decode_from_switch(data: bytes | memoryview) -> Any:
    return _decode(_dec_core_side, data)


def decode_from_core(data: bytes | memoryview) -> Work | BatchAck | Cancel:
    return _decode(_dec_switch_side, data)


def encode_body(body: InstructionBody) -> bytes:
    return _enc.encode(body)


def decode_body(data: bytes) -> InstructionBody:
    return _decode(_dec_body, data)


# --------------------------------------------------------------------- poke
# A poke is 40 bytes: an 8-byte big-endian unix time in milliseconds, then
# HMAC-SHA256(internal secret, those 8 bytes). It carries no work: it only tells the Switch
# to fetch from the Core over its authenticated connection.
POKE_SIZE = 40
POKE_MAX_SKEW_MS = 120_000


def make_poke(secret: bytes, now: float | None = None) -> bytes:
    stamp = struct.pack(">Q", int((time.time() if now is None else now) * 1000))
    return stamp + hmac.new(secret, stamp, hashlib.sha256).digest()


def check_poke(secret: bytes, data: bytes, now: float | None = None) -> bool:
    if len(data) != POKE_SIZE:
        return False
    stamp, mac = data[:8], data[8:]
    if not hmac.compare_digest(mac, hmac.new(secret, stamp, hashlib.sha256).digest()):
        return False
    (ms,) = struct.unpack(">Q", stamp)
    now_ms = (time.time() if now is None else now) * 1000
    return abs(now_ms - ms) <= POKE_MAX_SKEW_MS


def internal_token(secret: bytes) -> str:
    """Bearer token Switches present to the Core's internal endpoint (3900)."""
    return hmac.new(secret, b"quanta-core-internal", hashlib.sha256).hexdigest()
