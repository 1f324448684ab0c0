"""The agent's journal of instructions (sans-I/O apart from its snapshot file).

It makes delivery at-least-once and execution at-most-once per instruction:

* an instruction already run is never run again; its stored response is sent again instead;
* a response stays in the journal, unacknowledged, until the Switch confirms that the Core
  committed it; unacknowledged responses are re-sent after a reconnect or a timeout;
* entries are forgotten once the instruction's gather window is long past.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from quanta import protocol as p
from quanta.signing import Verifier

RESEND_AFTER = 30.0
KEEP_AFTER_EXPIRY = 3600.0


class Entry(msgspec.Struct):
    instruction_id: int
    expires_at: float
    response: p.Response | None = None
    acked: bool = False
    sent_at: float = 0.0


@dataclass
class Verdict:
    """What to do with a delivered instruction."""

    action: str  # "run", "resend", "ignore", "refuse"
    body: p.InstructionBody | None = None
    response: p.Response | None = None
    reason: str = ""


_dec = msgspec.msgpack.Decoder(dict[int, Entry])
_enc = msgspec.msgpack.Encoder()


class Journal:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[int, Entry] = {}
        if path is not None and path.exists():
            try:
                self.entries = _dec.decode(path.read_bytes())
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.entries = {}  # a corrupt journal is discarded, not fatal

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(_enc.encode(self.entries))
        os.replace(tmp, self.path)

    def judge(self, signed: p.SignedInstruction, verifier: Verifier, now: float | None = None) -> Verdict:
        now = time.time() if now is None else now
        if not verifier.verify(signed.body, signed.signature):
            iid = _unverified_id(signed.body)
            reason = "instruction signature verification failed: refused"
            resp = p.Response(instruction_id=iid, status="error", error=reason) if iid is not None else None
            return Verdict("refuse", response=resp, reason=reason)
        body = p.decode_body(signed.body)
        entry = self.entries.get(body.id)
        if entry is not None:
            if entry.response is not None:
                return Verdict("resend", body=body, response=entry.response)
            return Verdict("ignore", body=body, reason="already running")
        if body.expires_at <= now:
            return Verdict("ignore", body=body, reason="gather window already closed")
        self.entries[body.id] = Entry(instruction_id=body.id, expires_at=body.expires_at)
        self.save()
        return Verdict("run", body=body)

    def record(self, response: p.Response, now: float | None = None) -> None:
        e = self.entries.get(response.instruction_id)
        if e is None:
            e = self.entries[response.instruction_id] = Entry(response.instruction_id, time.time() + 60)
        e.response = response
        e.sent_at = time.time() if now is None else now
        self.save()

    def ack(self, ids: list[int]) -> None:
        changed = False
        for i in ids:
            e = self.entries.get(i)
            if e is not None and not e.acked:
                e.acked = True
                changed = True
        if changed:
            self.save()

    def cancel(self, ids: list[int]) -> None:
        """A cancelled instruction that has not run yet will not run."""
        for i in ids:
            if i not in self.entries:
                self.entries[i] = Entry(i, time.time() + 60, acked=True)
        self.save()

    def due(self, now: float | None = None, *, all_unacked: bool = False) -> list[p.Response]:
        now = time.time() if now is None else now
        out = []
        for e in self.entries.values():
            if e.response is not None and not e.acked and (all_unacked or now - e.sent_at >= RESEND_AFTER):
                e.sent_at = now
                out.append(e.response)
        return out

    def prune(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        old = [i for i, e in self.entries.items() if e.expires_at + KEEP_AFTER_EXPIRY < now]
        for i in old:
            del self.entries[i]
        if old:
            self.save()


def _unverified_id(body: bytes) -> int | None:
    try:
        return p.decode_body(body).id
    except p.ProtocolError:
        return None
