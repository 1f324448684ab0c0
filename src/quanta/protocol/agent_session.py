"""The agent's side of the protocol as pure classes (sans-I/O, after ``h11``).

Nothing here touches a socket, a file or a clock: the time comes in as an argument, messages come
in as bytes or messages, and what the caller must do goes out as effects (:class:`Send`,
:class:`Run`, :class:`Close`, ...). The real agent (:mod:`quanta.agent.runtime`) and the fleet
simulator (:mod:`quanta.simulate.fleet`) are thin shells over these classes, so the scale tests
exercise the agent's own rules.

* :class:`AgentSession`: one device's protocol state (connecting, awaiting the Welcome, ready,
  closed; one transition function over an explicit table) and the journal's decisions, which
  make delivery at-least-once and execution at-most-once per instruction: an instruction already
  run is never run again (its stored response is sent again instead); a response is kept and
  re-sent (after a reconnect, or RESEND_AFTER seconds) until the Switch acknowledges it; entries
  are forgotten KEEP_AFTER_EXPIRY seconds after their gather window.
* The journal's *storage* is a :class:`JournalStore`: the agent's append-only file log or the
  simulator's in-memory store (:mod:`quanta.agent.journal`).
* :class:`Backoff`: when to dial again after a failed or lost connection.
* Tags: the hello carries the device's tags; when they change on a welcomed connection
  (:meth:`AgentSession.tags`) a :class:`~quanta.protocol.messages.TagReport` with all of them goes
  at once, so the server need not wait for a reconnect. A change before the Welcome is reported at
  the Welcome; without a connection the next hello carries it.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import msgspec

from quanta.protocol.messages import (Cancel, Deliver, Hello, InstructionBody, ProtocolError, Response, ResponseAck,
                                      SignedInstruction, TagReport, Welcome, decode_body, decode_from_switch_for_agent,
                                      encode)

# The limit until a Switch's Welcome tells its own (the Welcome's default: what Switches without
# the field accept).
DEFAULT_MAX_MESSAGE = Welcome(switch="", heartbeat_seconds=0).max_message_bytes

# A connection that was welcomed counts as a success (the attempt counter starts again) only once
# it stayed up this long: a Switch that closes right after its Welcome is backed off like a refusal.
STABLE_AFTER = 30.0
# Once the Switch says this device's certificate is revoked, retrying soon cannot help: the device
# waits at least this long (or ConnectionRetryTimeInSecondsMax, if longer) between attempts.
REVOKED_RETRY = 600.0
MIN_RETRY = 0.05  # the shortest delay whatever the settings say: never a busy loop of dials
REVOKED_MARK = "certificate revoked"  # in the TLS alert's text and in the Switch's close reason


def is_revocation(reason: str) -> bool:
    """Whether a failure reason (a TLS alert, a close reason) says the certificate is revoked."""
    return REVOKED_MARK in reason.lower()


def retry_delay(attempt: int, lo: float, hi: float, rnd: random.Random) -> float:
    """Jittered exponential back-off for attempt ``attempt`` (0 first): a random delay in
    [max(lo, cap/2), cap], cap = min(hi, lo * 2**attempt). The lower half is cut off so that the
    delays really grow and a fleet spreads over the second half of each window."""
    lo = max(lo, MIN_RETRY)
    cap = max(lo, min(hi, lo * (2 ** min(attempt, 30))))
    floor = min(cap, max(lo, cap / 2))
    return floor + rnd.random() * (cap - floor)


@dataclass(frozen=True, slots=True)
class Retry:
    """The decision after one failed or lost connection."""

    delay: float
    attempt: int  # the failed attempts in a row, this one included
    revoked: bool
    reason: str
    fail_over: bool  # try the next Switch of the list (not after a stable connection was lost)


class Backoff:
    """When to dial again. ``failed`` after a connection that never reached its Welcome (refused
    port, TLS refusal, handshake alert, timeout, close before the Welcome); ``lost`` after one
    that was welcomed, with how long it was up."""

    __slots__ = ("lo", "hi", "rnd", "attempt")

    def __init__(self, lo: float, hi: float, rnd: random.Random | None = None) -> None:
        self.lo = max(MIN_RETRY, lo)
        self.hi = max(self.lo, hi)
        self.rnd = rnd or random.Random()
        self.attempt = 0

    def failed(self, reason: str, *, fail_over: bool = True) -> Retry:
        revoked = is_revocation(reason)
        delay = max(self.hi, REVOKED_RETRY) if revoked else retry_delay(self.attempt, self.lo, self.hi, self.rnd)
        self.attempt += 1
        return Retry(delay, self.attempt, revoked, reason, fail_over or revoked)

    def lost(self, reason: str, up_for: float) -> Retry:
        stable = up_for >= STABLE_AFTER
        if stable:
            self.attempt = 0
        return self.failed(reason, fail_over=not stable)


def bounded(response: Response, limit: int) -> Response:
    """``response``, or, when its encoding is over the Switch's ``limit`` (Welcome.max_message_bytes),
    the error that ends the instruction instead: the Switch would close the connection on that
    frame (1009), on every reconnect, so it is never sent."""
    size = len(encode(response))
    if size <= limit:
        return response
    return Response(instruction_id=response.instruction_id, status="error",
                    error=f"result too large: {size} bytes, limit {limit}", elapsed_ms=response.elapsed_ms)


# ============================================================================ the journal's entries
RESEND_AFTER = 30.0
KEEP_AFTER_EXPIRY = 3600.0
CANCELLED_KEEP = 60.0  # how long a cancel of an instruction never seen is remembered
# A Switch that announces a smaller limit than this is not believed: even an error response must fit.
MIN_MESSAGE_LIMIT = 4096
_NO_TAGS: dict[str, str] = {}  # shared by every session until it knows its tags; never mutated
PROTOCOL_ERROR = 1002  # WebSocket close codes
GOING_AWAY = 1001


class Entry(msgspec.Struct):
    """One instruction the device has seen: running (no response yet), answered, acknowledged."""

    instruction_id: int
    expires_at: float
    response: Response | None = None
    acked: bool = False
    sent_at: float = 0.0


class JournalStore(Protocol):
    """Where the entries live. ``put`` after every change of an entry (new or mutated)."""

    def get(self, instruction_id: int) -> Entry | None: ...

    def put(self, entry: Entry) -> None: ...

    def values(self) -> Iterable[Entry]: ...

    def remove(self, instruction_ids: list[int]) -> None: ...


class SignatureCheck(Protocol):
    def verify(self, body: bytes, signature: bytes) -> bool: ...


# ============================================================================ effects
class Send(NamedTuple):
    """Send this message to the Switch (``resend``: a journalled response sent again). Without a
    connection the shell drops it: the response is journalled and goes again after the next Welcome."""

    message: Hello | Response | TagReport
    resend: bool = False


class Run(NamedTuple):
    """Execute this verified instruction, then report its response with :meth:`AgentSession.completed`."""

    body: InstructionBody


class Close(NamedTuple):
    """Close the connection with this WebSocket code and reason (then report :meth:`AgentSession.lost`)."""

    code: int
    reason: str


class Judged(NamedTuple):
    """What became of an instruction: delivered, it is ``run``, ``resend``, ``ignore`` or ``refuse``;
    answered, its response may be ``too large`` (then replaced by that error)."""

    action: str
    instruction_id: int | None
    reason: str = ""


class Acked(NamedTuple):
    """These responses were acknowledged (newly) by the Switch."""

    instruction_ids: list[int]


class Stop(NamedTuple):
    """Stop the payloads of these instructions if they are running (the Switch cancelled them)."""

    instruction_ids: list[int]


Effect = Send | Run | Close | Judged | Acked | Stop


# ============================================================================ the session
class State(enum.Enum):
    CONNECTING = "connecting"  # no connection (between attempts, or dialling)
    AWAITING_WELCOME = "awaiting welcome"  # the WebSocket is open and the hello sent
    READY = "ready"  # welcomed: instructions flow
    CLOSED = "closed"  # the agent stopped; nothing more happens


class LocalProtocolError(RuntimeError):
    """The shell drove the session through a transition the protocol forbids (a bug of the shell,
    never caused by what a Switch sends)."""


TRANSITIONS: dict[tuple[State, str], State] = {
    (State.CONNECTING, "connected"): State.AWAITING_WELCOME,
    (State.AWAITING_WELCOME, "welcome"): State.READY,
    (State.AWAITING_WELCOME, "lost"): State.CONNECTING,
    (State.READY, "lost"): State.CONNECTING,
    (State.CONNECTING, "close"): State.CLOSED,
    (State.AWAITING_WELCOME, "close"): State.CLOSED,
    (State.READY, "close"): State.CLOSED,
}


class AgentSession:
    """One device's side of the agent protocol. Drive it with :meth:`connected`, :meth:`receive`
    (or :meth:`handle`), :meth:`completed`, :meth:`tick`, :meth:`lost`/:meth:`failed` and
    :meth:`close`; each returns the effects to carry out, in order. Nothing a Switch sends makes
    it raise: a bad frame or a message out of order is a :class:`Close` effect, a bad instruction a
    refusal."""

    __slots__ = ("store", "verifier", "backoff", "state", "max_message_bytes", "welcomed_at", "switch", "_tags",
                 "_tags_told")

    def __init__(self, store: JournalStore, verifier: SignatureCheck, backoff: Backoff) -> None:
        self.store = store
        self.verifier = verifier
        self.backoff = backoff
        self.state = State.CONNECTING
        self.max_message_bytes = DEFAULT_MAX_MESSAGE  # the last Welcome's
        self.welcomed_at: float | None = None
        self.switch = ""  # the welcoming Switch's name
        self._tags: dict[str, str] = _NO_TAGS  # the device's tags, as the shell last read them
        self._tags_told: dict[str, str] = _NO_TAGS  # what this connection's Switch was last told (hello or TagReport)

    # ------------------------------------------------------------------ state
    def _transition(self, event: str) -> None:
        to = TRANSITIONS.get((self.state, event))
        if to is None:
            raise LocalProtocolError(f"{event!r} is not allowed in state {self.state.value!r}")
        self.state = to

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    def connected(self, hello: Hello, now: float) -> list[Effect]:
        """The WebSocket opened: say hello."""
        self._transition("connected")
        self.welcomed_at = None
        self._tags = self._tags_told = hello.tags  # never mutated here: no copy per connection
        return [Send(hello)]

    def lost(self, reason: str, now: float) -> Retry:
        """The open connection ended (closed by either side, or dropped); when to dial again."""
        self._transition("lost")
        welcomed, self.welcomed_at = self.welcomed_at, None
        if welcomed is None:
            return self.backoff.failed(f"{reason} before the welcome")
        return self.backoff.lost(reason, now - welcomed)

    def failed(self, reason: str) -> Retry:
        """A connection attempt failed before the WebSocket opened; when to dial again."""
        if self.state is not State.CONNECTING:
            raise LocalProtocolError(f"'failed' is not allowed in state {self.state.value!r}")
        return self.backoff.failed(reason)

    def close(self) -> list[Effect]:
        was = self.state
        self._transition("close")
        return [Close(GOING_AWAY, "agent stopping")] if was is not State.CONNECTING else []

    # ------------------------------------------------------------------ from the Switch
    def receive(self, data: bytes | memoryview, now: float) -> list[Effect]:
        """One binary frame from the Switch."""
        if self.state not in (State.AWAITING_WELCOME, State.READY):
            return []  # a frame that raced the close: nothing to act on
        try:
            msg = decode_from_switch_for_agent(data)
        except ProtocolError as e:
            return [Close(PROTOCOL_ERROR, f"malformed message from the switch: {e}")]
        return self.handle(msg, now)

    def handle(self, msg: Any, now: float) -> list[Effect]:
        if self.state not in (State.AWAITING_WELCOME, State.READY):
            return []
        if isinstance(msg, Welcome):
            if self.state is State.READY:
                return [Close(PROTOCOL_ERROR, "a second welcome on one connection")]
            self._transition("welcome")
            self.welcomed_at = now
            self.switch = msg.switch
            self.max_message_bytes = max(MIN_MESSAGE_LIMIT, msg.max_message_bytes)
            return self._due(now, all_unacked=True) + self._tell_tags()
        if self.state is not State.READY:
            return [Close(PROTOCOL_ERROR, f"{type(msg).__name__} before the welcome")]
        if isinstance(msg, Deliver):
            return self.deliver(msg.instruction, now)
        if isinstance(msg, ResponseAck):
            return self.ack(msg.instruction_ids)
        if isinstance(msg, Cancel):
            self.cancel(msg.instruction_ids, now)
            return [Stop(list(msg.instruction_ids))]
        return [Close(PROTOCOL_ERROR, f"unexpected {type(msg).__name__}")]

    # ------------------------------------------------------------------ tags
    def tags(self, tags: dict[str, str], now: float) -> list[Effect]:
        """The device's tags as they are now (the shell reads them after an action ran, and at
        housekeeping; it bounds them as for the hello). A change goes to the Switch at once on a
        welcomed connection; before the Welcome, at the Welcome; without a connection, in the next
        hello. Reading the same tags again sends nothing."""
        self._tags = dict(tags)
        return self._tell_tags() if self.state is State.READY else []

    def _tell_tags(self) -> list[Effect]:
        if self._tags == self._tags_told:
            return []
        self._tags_told = self._tags
        return [Send(TagReport(tags=self._tags))]

    # ------------------------------------------------------------------ the journal's decisions
    def deliver(self, signed: SignedInstruction, now: float) -> list[Effect]:
        """Judge a delivered instruction: run it, send its journalled response again, ignore it
        (running, or its window closed), or refuse it (the signature does not verify)."""
        if not self.verifier.verify(signed.body, signed.signature):
            reason = "instruction signature verification failed: refused"
            iid = _unverified_id(signed.body)
            out: list[Effect] = [Judged("refuse", iid, reason)]
            if iid is None:
                return out
            known = self.store.get(iid)
            if known is None:  # the refusal is this instruction's answer, journalled like any other
                out += self.completed(Response(instruction_id=iid, status="error", error=reason), now)
            elif known.response is not None and not known.acked:  # never displaces the journal's answer
                out += self._send(known, now, resend=True)
            return out
        try:
            body = decode_body(signed.body)
        except ProtocolError as e:  # signed, yet not a body: refused, never raised
            return [Judged("refuse", None, f"signed instruction is not a valid body: {e}")]
        entry = self.store.get(body.id)
        if entry is not None:
            if entry.acked:  # committed by the Core (or cancelled): nothing to run or send
                return [Judged("ignore", body.id, "already answered" if entry.response else "cancelled")]
            if entry.response is not None:
                return [Judged("resend", body.id), *self._send(entry, now, resend=True)]
            return [Judged("ignore", body.id, "already running")]
        if body.expires_at <= now:
            return [Judged("ignore", body.id, "gather window already closed")]
        self.store.put(Entry(instruction_id=body.id, expires_at=body.expires_at))
        return [Judged("run", body.id), Run(body)]

    def completed(self, response: Response, now: float) -> list[Effect]:
        """An instruction's response: journalled (fitted to the Switch's limit) and sent."""
        entry = self.store.get(response.instruction_id)
        if entry is None:
            entry = Entry(response.instruction_id, now + CANCELLED_KEEP)
        entry.response = response
        entry.acked = False
        return self._send(entry, now, resend=False)

    def ack(self, ids: Iterable[int]) -> list[Effect]:
        acked = []
        for i in ids:
            e = self.store.get(i)
            if e is not None and e.response is not None and not e.acked:
                e.acked = True
                self.store.put(e)
                acked.append(i)
        return [Acked(acked)] if acked else []

    def cancel(self, ids: Iterable[int], now: float) -> None:
        """A cancelled instruction that has not run yet will not run."""
        for i in ids:
            if self.store.get(i) is None:
                self.store.put(Entry(i, now + CANCELLED_KEEP, acked=True))

    def tick(self, now: float) -> list[Effect]:
        """Housekeeping: responses unacknowledged for RESEND_AFTER seconds go again; entries long
        past their window are forgotten."""
        out = self._due(now, all_unacked=False) if self.state is State.READY else []
        self.prune(now)
        return out

    def prune(self, now: float) -> None:
        old = [e.instruction_id for e in self.store.values() if e.expires_at + KEEP_AFTER_EXPIRY < now]
        if old:
            self.store.remove(old)

    def unacked(self) -> bool:
        return any(e.response is not None and not e.acked for e in self.store.values())

    def _due(self, now: float, *, all_unacked: bool) -> list[Effect]:
        out: list[Effect] = []
        for e in list(self.store.values()):
            if e.response is not None and not e.acked and (all_unacked or now - e.sent_at >= RESEND_AFTER):
                out += self._send(e, now, resend=True)
        return out

    def _send(self, entry: Entry, now: float, *, resend: bool) -> list[Effect]:
        assert entry.response is not None
        out: list[Effect] = []
        fitted = bounded(entry.response, self.max_message_bytes)
        changed = not resend or fitted is not entry.response
        if fitted is not entry.response:
            out.append(Judged("too large", entry.instruction_id, fitted.error or ""))
            entry.response = fitted
        entry.sent_at = now
        if changed:  # a resend changes only sent_at, which need not survive a restart (all go again then)
            self.store.put(entry)
        out.append(Send(fitted, resend))
        return out


def _unverified_id(body: bytes) -> int | None:
    try:
        return decode_body(body).id
    except ProtocolError:
        return None


__all__ = ["AgentSession", "State", "TRANSITIONS", "LocalProtocolError", "Entry", "JournalStore", "Send", "Run",
           "Close", "Judged", "Acked", "Effect", "Backoff", "Retry", "retry_delay", "is_revocation", "bounded",
           "RESEND_AFTER", "KEEP_AFTER_EXPIRY", "STABLE_AFTER", "REVOKED_RETRY", "DEFAULT_MAX_MESSAGE"]
