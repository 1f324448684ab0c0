"""Where the agent's journal lives: the storage behind :class:`quanta.protocol.agent_session.AgentSession`
(which makes the decisions: run, resend, refuse, ignore; ack; cancel; due resends; prune).

Two stores implement :class:`~quanta.protocol.agent_session.JournalStore`:

* :class:`FileStore`, the agent's: an append-only log. Every change appends one framed record
  (4-byte length, CRC-32, the msgpack ``Entry``; the last record of an instruction wins) with one
  ``write`` on a descriptor kept open. Rewriting a snapshot through a temporary file and a rename
  on each change cost ~1 ms of system time three times per question on ext4 (the rename over an
  existing file forces the new file's blocks out), most of an idle agent's cost of answering. The
  log is compacted (rewritten through a rename) when it is opened, when entries are pruned, and
  when it holds many superseded records. A torn record at the end (a crash mid-write) ends the
  log: only that one change is lost, as a crash before the write would have lost it. Like the
  snapshot before it, the log is not fsynced: it survives the agent process dying, not the
  machine losing power.
* :class:`MemoryStore`, the fleet simulator's: a dict, so thousands of devices per process stay
  cheap; a "crash" of a simulated device is a new session over the same store.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import msgspec

from quanta.protocol.agent_session import KEEP_AFTER_EXPIRY, RESEND_AFTER, Entry

__all__ = ["Entry", "FileStore", "MemoryStore", "RESEND_AFTER", "KEEP_AFTER_EXPIRY", "COMPACT_SLACK"]

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


class MemoryStore:
    """Entries in a dict (the simulator's journal)."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {}

    def get(self, instruction_id: int) -> Entry | None:
        return self.entries.get(instruction_id)

    def put(self, entry: Entry) -> None:
        self.entries[entry.instruction_id] = entry

    def values(self) -> Iterable[Entry]:
        return self.entries.values()

    def remove(self, instruction_ids: list[int]) -> None:
        for i in instruction_ids:
            self.entries.pop(i, None)


class FileStore(MemoryStore):
    """Entries in memory, every change appended to the log at ``path`` (see the module docstring)."""

    __slots__ = ("path", "_fd", "_records")

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._fd: int | None = None
        self._records = 0  # records in the log file
        if path.exists():
            data = path.read_bytes()
            entries = None
            if data[:1] not in (b"", b"\x00"):  # a record starts with a length below 16 MB
                try:
                    entries = _legacy_dec.decode(data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    entries = None
            self.entries = entries if entries is not None else _read_log(data)  # corrupt: discarded, not fatal
        self.compact()

    def put(self, entry: Entry) -> None:
        self.entries[entry.instruction_id] = entry
        if self._fd is None:
            return
        data = memoryview(_frame(entry))
        while data:
            data = data[os.write(self._fd, data):]
        self._records += 1
        if self._records > 2 * len(self.entries) + COMPACT_SLACK:
            self.compact()

    def remove(self, instruction_ids: list[int]) -> None:
        super().remove(instruction_ids)
        self.compact()

    def compact(self) -> None:
        """Rewrite the log with one record per entry (temporary file, then rename)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.parent.stat().st_mode & 0o077:
            os.chmod(self.path.parent, 0o700)  # the journal holds every answer: owner only
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(_frame(e) for e in self.entries.values()))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._records = len(self.entries)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
