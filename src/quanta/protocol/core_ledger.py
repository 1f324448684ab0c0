"""The Core's instruction ledger, without I/O: which instructions are active, how many of their
targets are still open, which answers may be counted, and when an instruction ends.

The Core (``quanta.core.service``) is the shell: it reads and writes the databases and talks to
the Switches, and feeds the ledger events with the time as an argument; the ledger answers with
effects. The rules it keeps:

* An instruction is ACTIVE from ``open`` until ``close``; an ended one never becomes active again
  in this ledger (closing twice is a no-op that says so; re-opening raises :class:`LedgerError`).
* Only answers for ACTIVE instructions are counted (``sort``): an answer for an ended one is held
  as *late*, for an unknown one as *refused*, so final counts stay final. The shell must queue the
  counted answers' write with no ``await`` between ``sort`` and the write, and must ``close`` an
  instruction before it queues its expiry: then every counted answer was written before its end.
* A Switch link answers only for devices whose hello came through it (``strangers``).
* The in-memory count of open targets is a hint, lowered by each committed write; when it reaches
  zero, or cannot be trusted, the ledger asks the database to recount (:class:`Recount`) before it
  finishes anything (:class:`Finish`). A wrong hint can delay an end, never cause an early one.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from quanta.protocol.messages import DeviceResponse, WorkItem

LATE, REFUSED = "late", "refused"
ALL_ANSWERED = "every targeted device answered"
WINDOW_CLOSED = "gather window closed"


class LedgerError(Exception):
    """An event the ledger's rules forbid (names the instruction and the transition)."""


class Phase(enum.Enum):
    ACTIVE = "active"
    ENDED = "ended"


@dataclass(slots=True)
class _Open:
    item: WorkItem
    unanswered: int | None  # None: unknown, the database decides


# ------------------------------------------------------------------ effects
@dataclass(frozen=True, slots=True)
class Finish:
    """End this instruction (its open targets expire) for ``why``."""

    instruction_id: int
    why: str


@dataclass(frozen=True, slots=True)
class Recount:
    """Count this instruction's open targets in the database, then call ``recounted``."""

    instruction_id: int


Effect = Finish | Recount


@dataclass(frozen=True, slots=True)
class Held:
    kind: str  # LATE or REFUSED
    answer: DeviceResponse
    reason: str


@dataclass(frozen=True, slots=True)
class Sorted:
    count: list[DeviceResponse]
    held: list[Held]


ENDED_REMEMBERED = 100_000  # ended ids kept to refuse re-opening them (the oldest are forgotten)


class CoreLedger:
    def __init__(self) -> None:
        self._open: dict[int, _Open] = {}
        self._ended: dict[int, None] = {}  # an ordered set, bounded by ENDED_REMEMBERED

    # ------------------------------------------------------------- queries
    def phase(self, instruction_id: int) -> Phase | None:
        if instruction_id in self._open:
            return Phase.ACTIVE
        return Phase.ENDED if instruction_id in self._ended else None

    def __contains__(self, instruction_id: object) -> bool:
        return instruction_id in self._open

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[int]:
        return iter(self._open)

    def items(self) -> Iterator[tuple[int, WorkItem]]:
        return ((i, o.item) for i, o in self._open.items())

    def unanswered(self, instruction_id: int) -> int | None:
        o = self._open.get(instruction_id)
        return None if o is None else o.unanswered

    # -------------------------------------------------------------- events
    def open(self, item: WorkItem, unanswered: int | None) -> None:
        """An instruction becomes (or, after a restart, is again) active. Opening an active one
        refreshes it; opening one this ledger ended is forbidden."""
        if item.id in self._ended:
            raise LedgerError(f"instruction {item.id}: ended -> active is not allowed")
        o = self._open.get(item.id)
        if o is None:
            self._open[item.id] = _Open(item, unanswered)
        else:
            o.item = item
            if o.unanswered is None:
                o.unanswered = unanswered

    def close(self, instruction_id: int) -> bool:
        """active -> ended. False if it was not active here (already ended, or unknown)."""
        if self._open.pop(instruction_id, None) is None:
            return False
        self._ended[instruction_id] = None
        if len(self._ended) > ENDED_REMEMBERED:
            del self._ended[next(iter(self._ended))]
        return True

    def strangers(self, answers: Iterable[DeviceResponse], link_devices: Mapping[str, object] | set[str]) -> set[str]:
        """Devices answering through a link that never announced them (the shell then asks the
        database which Switch each last said hello through)."""
        return {a.device_id for a in answers if a.device_id not in link_devices}

    def not_active(self, answers: Iterable[DeviceResponse]) -> set[int]:
        """Instructions answered that are not active here (the shell looks up their status)."""
        return {a.response.instruction_id for a in answers} - self._open.keys()

    def sort(self, answers: Iterable[DeviceResponse], *, link: str, refused_devices: set[str],
             statuses: Mapping[int, str]) -> Sorted:
        """Which answers to count and which to hold. ``refused_devices``: strangers whose last hello
        was not through this link; ``statuses``: status of each answered instruction that is not
        active here (absent: unknown)."""
        count: list[DeviceResponse] = []
        held: list[Held] = []
        for a in answers:
            iid = a.response.instruction_id
            if a.device_id in refused_devices:
                held.append(Held(REFUSED, a, f"device {a.device_id!r} is not connected through switch {link!r}"))
            elif iid in self._open:
                count.append(a)
            elif iid in statuses:
                held.append(Held(LATE, a, f"instruction {iid} had already ended ({statuses[iid]})"))
            else:
                held.append(Held(REFUSED, a, f"instruction {iid} is unknown"))
        return Sorted(count, held)

    def committed(self, moved: Mapping[int, int]) -> list[Effect]:
        """A write committed: per instruction, how many targets it moved to an answered state (-1:
        the driver could not tell)."""
        effects: list[Effect] = []
        for iid, n in moved.items():
            o = self._open.get(iid)
            if o is None:
                continue
            left = None if o.unanswered is None or n < 0 else o.unanswered - n
            if left is None or left <= 0:  # unknown, or apparently done: the database decides
                o.unanswered = None
                effects.append(Recount(iid))
            else:
                o.unanswered = left
        return effects

    def recounted(self, instruction_id: int, left: int) -> list[Effect]:
        o = self._open.get(instruction_id)
        if o is None:
            return []
        o.unanswered = left
        return [Finish(instruction_id, ALL_ANSWERED)] if left == 0 else []

    def due(self, now: float) -> list[Finish]:
        """Instructions whose gather window has closed at ``now``."""
        return [Finish(i, WINDOW_CLOSED) for i, o in self._open.items() if o.item.expires_at <= now]
