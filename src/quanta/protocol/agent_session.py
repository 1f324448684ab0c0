"""The agent's side of the protocol as a pure class (sans-I/O, after ``h11``).

Nothing here touches a socket, a file or a clock: the time comes in as an argument, messages come
in as messages (or bytes), and what the caller must do goes out as effects. The real agent
(:mod:`quanta.agent.runtime`) and the fleet simulator (:mod:`quanta.simulate.fleet`) are thin
shells over these classes.

:class:`Backoff` decides when a device dials again after a failed or lost connection.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from quanta.protocol.messages import Response, Welcome, encode

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
