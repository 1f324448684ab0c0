"""Wire messages between agents, Switches and the Core (sans-I/O).

Every message is a msgspec Struct, encoded as MessagePack in one binary WebSocket frame.
Decoding validates types at the boundary: anything that is not exactly one of the known
messages raises :class:`ProtocolError`, and the caller closes that one connection.

Flows:

* agent  -> Switch: :class:`Hello`, :class:`Response`, :class:`TagReport`
* Switch -> agent : :class:`Welcome`, :class:`Deliver`, :class:`ResponseAck`, :class:`Cancel`
* Switch -> Core  : :class:`SwitchHello`, :class:`DevicesOnline`, :class:`DevicesOffline`,
  :class:`FetchWork`, :class:`Delivered`, :class:`ResponseBatch`, :class:`DeviceTags`
* Core  -> Switch : :class:`Work`, :class:`BatchAck`, :class:`Cancel`, :class:`OnlineAck`
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "ProtocolError",
    "ResponseRefused",
    "MAX_ID",
    "MAX_ROWS",
    "MAX_COLUMNS",
    "MAX_TAGS",
    "Hello",
    "TagReport",
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
    "OnlineAck",
    "DevicesOffline",
    "DeviceTags",
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
    "poke_problem",
    "credential",
    "close_reason",
    "CLOSE_REASON_MAX",
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


# ------------------------------------------------------------------------ bounds
# Every field a device can fill is typed and bounded here, at decode: a message that does not fit
# is refused where it arrives (see ``decode_from_agent``), so nothing a device sends can raise
# further in (in the Core's ingest, in the database, in the JSON encoder).
MAX_ID = 2**31 - 1  # instruction ids are the Master database's INTEGER keys
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"  # no NUL, no control characters (names, versions, headers)
_NO_NUL = r"^[^\x00]*$"  # no NUL (PostgreSQL text refuses it): error texts, column names
MAX_ROWS = 100_000
MAX_COLUMNS = 256
MAX_TAGS = 64

InstructionId = Annotated[int, Meta(ge=0, le=MAX_ID)]
DeviceId = Annotated[str, Meta(min_length=1, max_length=255, pattern=_NO_CONTROL)]
Name255 = Annotated[str, Meta(max_length=255, pattern=_NO_CONTROL)]
Version = Annotated[str, Meta(max_length=64, pattern=_NO_CONTROL)]
TagKey = Annotated[str, Meta(min_length=1, max_length=128, pattern=_NO_CONTROL)]
TagValue = Annotated[str, Meta(max_length=1024, pattern=_NO_CONTROL)]
Tags = Annotated[dict[TagKey, TagValue], Meta(max_length=MAX_TAGS)]
ColumnName = Annotated[str, Meta(max_length=255, pattern=_NO_NUL)]
ErrorText = Annotated[str, Meta(max_length=8192, pattern=_NO_NUL)]
Position = Annotated[int, Meta(ge=0, le=MAX_ID)]
# A result cell is a scalar: no maps (so no non-string keys), no nested arrays, no extension types,
# no binary (a blob travels as its hex string, as ``quanta scale run --json`` shows it). Cell strings
# may hold any Unicode (rows are stored as JSON, where NUL is an escape).
Cell = None | bool | Annotated[int, Meta(ge=INT64_MIN, le=INT64_MAX)] | float | str
Row = Annotated[list[Cell], Meta(max_length=MAX_COLUMNS)]


class ProtocolError(Exception):
    """A frame that is not a valid message; the connection that sent it is closed."""


# --------------------------------------------------------------------- agent <-> Switch
class Hello(msgspec.Struct, tag="hello", frozen=True):
    device_id: DeviceId
    fqdn: Name255
    os: Name255
    agent_version: Version
    tags: Tags = {}
    protocol: Annotated[int, Meta(ge=0, le=2**16)] = PROTOCOL_VERSION


class TagReport(msgspec.Struct, tag="tags", frozen=True):
    """The device's tags changed (``Tagging.Set`` and the like) on a live connection: all of them,
    bounded as the hello's. Sent only after the Welcome; the Switch coalesces a device's reports."""

    tags: Tags = {}


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
    # who owns the Storage.* tables this instruction makes and reads, set by the server that signs
    # the body: "pack:<pack name>@<fingerprint of its publisher's key>" for an instruction of a pack's
    # definition, "adhoc@<fingerprint of the server's signing key>" for raw SCALE (see
    # quanta.instructions.storage_owner). Empty from a server that predates it.
    owner: str = ""


class Deliver(msgspec.Struct, tag="deliver", frozen=True):
    instruction: SignedInstruction


class Response(msgspec.Struct, tag="response", frozen=True):
    instruction_id: InstructionId
    status: Status
    columns: Annotated[list[ColumnName], Meta(max_length=MAX_COLUMNS)] = []
    rows: Annotated[list[Row], Meta(max_length=MAX_ROWS)] = []
    error: ErrorText | None = None
    error_line: Position | None = None
    error_column: Position | None = None
    elapsed_ms: Annotated[float, Meta(ge=0, le=1e12)] = 0.0


class ResponseAck(msgspec.Struct, tag="response_ack", frozen=True):
    instruction_ids: list[InstructionId]


class Cancel(msgspec.Struct, tag="cancel", frozen=True):
    instruction_ids: list[InstructionId]


AgentToSwitch = Hello | Response | TagReport
SwitchToAgent = Welcome | Deliver | ResponseAck | Cancel


# --------------------------------------------------------------------- Switch <-> Core
class DeviceInfo(msgspec.Struct, frozen=True):
    device_id: DeviceId
    fqdn: Name255
    os: Name255
    agent_version: Version
    tags: Tags = {}
    address: Annotated[str, Meta(max_length=128, pattern=_NO_CONTROL)] = ""


class SwitchHello(msgspec.Struct, tag="switch_hello", frozen=True):
    name: Annotated[str, Meta(min_length=1, max_length=128, pattern=_NO_CONTROL)]
    host: Name255
    port: Annotated[int, Meta(ge=1, le=65535)]
    incarnation: Annotated[str, Meta(max_length=64, pattern=_NO_CONTROL)]  # changes on every Switch start, so the Core can reset its view


class DevicesOnline(msgspec.Struct, tag="online", frozen=True):
    devices: list[DeviceInfo]
    # Non-zero: the Core answers with an OnlineAck of this number. The Switch delivers nothing to
    # these devices until then (see OnlineAck).
    seq: Annotated[int, Meta(ge=0, le=INT64_MAX)] = 0


class OnlineAck(msgspec.Struct, tag="online_ack", frozen=True):
    """The Core's answer to a DevicesOnline: which of the Core's active instructions each of those
    devices has already answered (committed), so a device that lost its journal is never given an
    action again; and which devices it refused (not enrolled, or revoked), whose connections the
    Switch closes."""

    seq: Annotated[int, Meta(ge=0, le=INT64_MAX)]
    answered: dict[DeviceId, list[InstructionId]] = {}
    refused: list[DeviceId] = []


class DevicesOffline(msgspec.Struct, tag="offline", frozen=True):
    device_ids: list[DeviceId]


class DeviceTags(msgspec.Struct, tag="device_tags", frozen=True):
    """Devices on this Switch whose tags changed since their hello: each one's latest tags, in full."""

    devices: dict[DeviceId, Tags]


class FetchWork(msgspec.Struct, tag="fetch", frozen=True):
    known: list[InstructionId] = []  # instruction ids the Switch already holds


class WorkItem(msgspec.Struct, frozen=True):
    instruction: SignedInstruction
    id: int
    expires_at: float
    devices: list[str] | None  # None: every device


class Work(msgspec.Struct, tag="work", frozen=True):
    items: list[WorkItem]
    active: list[int]  # every instruction id still live; the Switch drops the rest


class Delivered(msgspec.Struct, tag="delivered", frozen=True):
    instruction_id: InstructionId
    device_ids: list[DeviceId]


class DeviceResponse(msgspec.Struct, frozen=True):
    device_id: DeviceId
    response: Response


class ResponseBatch(msgspec.Struct, tag="batch", frozen=True):
    batch_id: int
    responses: list[DeviceResponse]


class BatchAck(msgspec.Struct, tag="batch_ack", frozen=True):
    batch_id: int


SwitchToCore = SwitchHello | DevicesOnline | DevicesOffline | FetchWork | Delivered | ResponseBatch | DeviceTags
CoreToSwitch = Work | BatchAck | Cancel | OnlineAck

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


class ResponseRefused(ProtocolError):
    """A ``Response`` that does not fit its bounds (a value out of range, an extension type, a
    map for a cell, a NUL in its error text, ...) but whose instruction id does.

    It is refused as one message, not as a connection: the Switch records :attr:`response` in its
    place (an ``error`` naming the reason), so the device's state for that instruction becomes
    final, the Core acknowledges it, the agent's journal forgets the bad answer, and nothing is
    re-sent in a loop.
    """

    def __init__(self, instruction_id: int, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = Response(instruction_id=instruction_id, status="error",
                                 error=f"response refused by the switch: {reason}")


class _ResponseHead(msgspec.Struct, tag="response"):
    instruction_id: InstructionId  # every other field is skipped, undecoded


_dec_response_head = msgspec.msgpack.Decoder(_ResponseHead)


def decode_from_agent(data: bytes | memoryview) -> Hello | Response | TagReport:
    """One agent message. Raises :class:`ResponseRefused` for a response whose content is out of
    bounds but whose instruction id is valid, :class:`ProtocolError` for anything else malformed."""
    try:
        return _dec_agent.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        reason = str(e)[:300]
        try:
            head = _dec_response_head.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise ProtocolError(f"malformed message: {reason}") from None
        raise ResponseRefused(head.instruction_id, reason) from None


def decode_from_switch_for_agent(data: bytes | memoryview) -> Welcome | Deliver | ResponseAck | Cancel:
    return _decode(_dec_switch_from_agent_side, data)


def decode_from_switch(data: bytes | memoryview) -> Any:
    return _decode(_dec_core_side, data)


def decode_from_core(data: bytes | memoryview) -> Work | BatchAck | Cancel | OnlineAck:
    return _decode(_dec_switch_side, data)


def encode_body(body: InstructionBody) -> bytes:
    return _enc.encode(body)


def decode_body(data: bytes) -> InstructionBody:
    return _decode(_dec_body, data)


# --------------------------------------------------------------------- poke
# A poke is 40 bytes: an 8-byte big-endian unix time in milliseconds, then
# HMAC-SHA256(poke key, those 8 bytes). The key is the poke hop's credential
# (quanta.internal.poke_key), never the installation secret itself. It carries no work: it only
# tells the Switch to fetch from the Core over its authenticated connection.
POKE_SIZE = 40
POKE_MAX_SKEW_MS = 120_000


def make_poke(key: bytes, now: float | None = None) -> bytes:
    stamp = struct.pack(">Q", int((time.time() if now is None else now) * 1000))
    return stamp + hmac.new(key, stamp, hashlib.sha256).digest()


def poke_problem(key: bytes, data: bytes, now: float | None = None) -> str | None:
    """None for a good poke, else why it is refused: its size, its MAC, or its age (an authentic
    poke from a clock too far from this one's)."""
    if len(data) != POKE_SIZE:
        return f"wrong size ({len(data)} bytes)"
    stamp, mac = data[:8], data[8:]
    if not hmac.compare_digest(mac, hmac.new(key, stamp, hashlib.sha256).digest()):
        return "bad MAC"
    (ms,) = struct.unpack(">Q", stamp)
    skew_ms = ms - (time.time() if now is None else now) * 1000
    if abs(skew_ms) > POKE_MAX_SKEW_MS:
        return f"stale ({skew_ms / 1000:+.0f}s from this Switch's clock)"
    return None


def check_poke(key: bytes, data: bytes, now: float | None = None) -> bool:
    return poke_problem(key, data, now) is None


CLOSE_REASON_MAX = 120  # bytes; RFC 6455 allows 123 after the two-byte code


def close_reason(text: str) -> bytes:
    """A close frame's reason: at most CLOSE_REASON_MAX bytes of UTF-8, never cut inside a character.

    Every end of every WebSocket link (agent, simulator, Switch, CoreLink) builds its close reason here,
    so that a long or non-ASCII error text can never make a frame the peer must reject."""
    return text.encode()[:CLOSE_REASON_MAX].decode("utf-8", "ignore").encode()


def credential(secret: bytes, service: str, purpose: str) -> str:
    """The bearer credential of one internal hop: HMAC-SHA256(installation secret,
    ``quanta/<service>/<purpose>``), hex. Each receiver accepts only the purposes it serves
    (``quanta.internal.HOPS``), so a credential seen on one hop opens no other."""
    if not service or not purpose or "/" in service or "/" in purpose:
        raise ValueError("a credential needs a service and a purpose, neither containing '/'")
    return hmac.new(secret, f"quanta/{service}/{purpose}".encode(), hashlib.sha256).hexdigest()
