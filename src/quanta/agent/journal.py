"""The agent's journal of instructions (sans-I/O apart from its snapshot file).

It makes delivery at-least-once and execution at-most-once per instruction:

* an instruction already run is never run again; its stored response is sent again instead;
* a response stays in the journal, unacknowledged, until the Switch confirms that the Core
  committed it; unacknowledged responses are re-sent after a reconnect or a timeout;
* entries are forgotten once the instruction's gather window is long past.

On disk it is an append-only log: every change appends one framed record (4-byte length,
CRC-32, the msgpack ``Entry``; the last record of an instruction wins) with one ``write`` on a
descriptor kept open. Rewriting a snapshot through a temporary file and a rename on each change
cost ~1 ms of system time three times per question on ext4 (the rename over an existing file
forces the new file's blocks out), most of an idle agent's cost of answering. The log is compacted
(rewritten through a rename) when it is opened, when entries are pruned, and when it holds many
superseded records. A torn record at the end (a crash mid-write) ends the log: only that one
change is lost, as a crash before the write would have lost it. Like the snapshot before it, the
log is not fsynced: it survives the agent process dying, not the machine losing power.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
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


_legacy_dec = msgspec.msgpack.Decoder(dict[int, Entry])  # the former snapshot format
_entry_dec = msgspec.msgpack.Decoder(Entry)
_enc = msgspec.msgpack.Encoder()
_HEADER = struct.Struct(">II")  # record length, CRC-32 of the record
COMPACT_SLACK = 256  # superseded records tolerated beyond 2 per live entry before a rewrite


def _frame(e: Entry) -> bytes:
    data = _enc.encode(e)
    return _HEADER.pack(len(data), zlib.crc32(data)) + data


def _read_log(data: bytes) -> dict[int, Entry]:
    """Entries of a log; stops at the first torn or corrupt record."""
    entries: dict[int, Entry] = {}
    pos, end = 0, len(data)
    while pos + _HEADER.size <= end:
        n, crc = _HEADER.unpack_from(data, pos)
        body = data[pos + _HEADER.size:pos + _HEADER.size + n]
        if len(body) != n or zlib.crc32(body) != crc:
            break
        try:
            e = _entry_dec.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            break
        entries[e.instruction_id] = e
        pos += _HEADER.size + n
    return entries


class Journal:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[int, Entry] = {}
        self._fd: int | None = None
        self._records = 0  # records in the log file
        if path is not None and path.exists():
            data = path.read_bytes()
            entries = None
            if data[:1] not in (b"", b"\x00"):  # a record starts with a length below 16 MB
                try:
                    entries = _legacy_dec.decode(data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    entries = None
            self.entries = entries if entries is not None else _read_log(data)  # corrupt: discarded, not fatal
        if path is not None:
            self.compact()

    def compact(self) -> None:
        """Rewrite the log with one record per entry (temporary file, then rename)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(b"".join(_frame(e) for e in self.entries.values()))
        os.replace(tmp, self.path)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._records = len(self.entries)

    def _write(self, e: Entry) -> None:
        if self._fd is None:
            return
        data = memoryview(_frame(e))
        while data:
            data = data[os.write(self._fd, data):]
        self._records += 1
        if self._records > 2 * len(self.entries) + COMPACT_SLACK:
            self.compact()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

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
        e = self.entries[body.id] = Entry(instruction_id=body.id, expires_at=body.expires_at)
        self._write(e)
        return Verdict("run", body=body)

    def record(self, response: p.Response, now: float | None = None) -> None:
        e = self.entries.get(response.instruction_id)
        if e is None:
            e = self.entries[response.instruction_id] = Entry(response.instruction_id, time.time() + 60)
        e.response = response
        e.sent_at = time.time() if now is None else now
        self._write(e)

    def ack(self, ids: list[int]) -> None:
        for i in ids:
            e = self.entries.get(i)
            if e is not None and not e.acked:
                e.acked = True
                self._write(e)

    def cancel(self, ids: list[int]) -> None:
        """A cancelled instruction that has not run yet will not run."""
        for i in ids:
            if i not in self.entries:
                e = self.entries[i] = Entry(i, time.time() + 60, acked=True)
                self._write(e)

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
            self.compact()


def _unverified_id(body: bytes) -> int | None:
    try:
        return p.decode_body(body).id
    except p.ProtocolError:
        return None
