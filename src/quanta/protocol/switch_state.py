"""A Switch's delivery bookkeeping, without I/O: which devices are connected and ready, which
instructions are active, and who must be given, or told to cancel, which instruction.

The Switch (``quanta.switch.service``) is the shell: it owns the sockets, encodes each
instruction's ``Deliver`` frame once, and turns the effects below into frames. The rules:

* A connected device is UNREADY from its hello until the Core's ``OnlineAck`` for the
  ``DevicesOnline`` that announced it: only the Core knows what the device has already answered
  (its journal may be lost, and this Switch may have restarted). An UNREADY device is given
  nothing. After a relink to the Core every connected device is UNREADY again: the
  acknowledgements of earlier announcements died with the old link.
* After a relink nothing is given until the new link's first Work: while the link was down the
  Core may have ended instructions this Switch still holds (their Cancel died with the link), and
  the Core's OnlineAck names only the answers to instructions it holds active. The Work's
  ``active`` drops the ended ones; then every ready device is given what is due. (The shell asks
  for Work before it announces its devices, so this costs no round trip.)
* A READY device is given each active instruction in its scope that it has neither answered nor
  been given on its current connection; a new connection (a new hello) starts with nothing given.
* A Cancel goes only to devices that were given the instruction and have not answered it.
* Answers for an instruction this Switch does not hold yet, whether the Core reports them or a
  device sends them (a restarted Switch hears the devices' journalled answers before the Core's
  Work), are remembered until that instruction's Work arrives, or it stops being active: the
  device is not given it again. A device can make the Switch remember answers for at most
  EARLY_IDS instructions it does not hold (each Work forgets those that are not active).

:class:`FanOut` paces the shell's writing of :class:`DeliverTo` effects: a Deliver to each of
10,000 devices is 10,000 TLS records and writes (a quarter of a second of one core), and the shell
reads no answer while it writes. It writes at most ``FANOUT_SLICE`` per turn of its event loop, so
the first devices' answers are read, batched and on their way to the Core while the last devices
are still being given the instruction, and a large fan-out does not hold up every other
connection's frames (pings, hellos, answers to other instructions) until it ends.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from quanta.protocol.messages import WorkItem


EARLY_IDS = 4096
# Deliver frames written per turn of the Switch's event loop (see FanOut): at ~25 µs each, about
# 13 ms of writing before the loop reads what has arrived meanwhile.
FANOUT_SLICE = 512


class Readiness(enum.Enum):
    UNREADY = "unready"  # connected, waiting for the Core's OnlineAck
    READY = "ready"


@dataclass(frozen=True, slots=True)
class DeliverTo:
    """Send instruction ``instruction_id``'s Deliver frame to these connected devices."""

    instruction_id: int
    devices: list[str]


@dataclass(frozen=True, slots=True)
class CancelTo:
    instruction_id: int
    devices: list[str]


@dataclass(frozen=True, slots=True)
class Refuse:
    """Close these devices' connections: the Core refused them (not enrolled, or revoked)."""

    devices: list[str]


Effect = DeliverTo | CancelTo | Refuse


@dataclass(slots=True)
class _Instruction:
    item: WorkItem
    scope: frozenset[str] | None
    delivered: set[str] = field(default_factory=set)  # on the devices' current connections
    answered: set[str] = field(default_factory=set)

    def wants(self, device: str) -> bool:
        return (self.scope is None or device in self.scope) and device not in self.answered \
            and device not in self.delivered


class SwitchState:
    def __init__(self) -> None:
        self._ready: set[str] = set()
        self._unready: dict[str, int] = {}  # device -> the announcement it waits for (0: not yet announced)
        self._seq = 0
        self._active: dict[int, _Instruction] = {}
        self._answered_early: dict[int, set[str]] = {}
        self._stale = False  # relinked, and the new link's first Work has not arrived

    # ------------------------------------------------------------- queries
    def readiness(self, device: str) -> Readiness | None:
        if device in self._ready:
            return Readiness.READY
        return Readiness.UNREADY if device in self._unready else None

    def __contains__(self, instruction_id: object) -> bool:
        return instruction_id in self._active

    def active_ids(self) -> list[int]:
        return list(self._active)

    def item(self, instruction_id: int) -> WorkItem:
        return self._active[instruction_id].item

    # ----------------------------------------------------- device events
    def hello(self, device: str) -> None:
        """A device said hello on a new connection (replacing any older one of it)."""
        self._ready.discard(device)
        self._unready[device] = 0
        for ins in self._active.values():
            ins.delivered.discard(device)

    def gone(self, device: str) -> None:
        self._ready.discard(device)
        self._unready.pop(device, None)

    def answered(self, device: str, instruction_id: int) -> None:
        ins = self._active.get(instruction_id)
        if ins is not None:
            ins.answered.add(device)
            return
        early = self._answered_early.get(instruction_id)
        if early is not None:
            early.add(device)
        elif len(self._answered_early) < EARLY_IDS:  # its Work may not have arrived yet
            self._answered_early[instruction_id] = {device}

    def announce(self, devices: Iterable[str]) -> int:
        """Number the DevicesOnline that announces these devices; the unready among them wait for
        its OnlineAck."""
        self._seq += 1
        for d in devices:
            if d in self._unready:
                self._unready[d] = self._seq
        return self._seq

    def relinked(self) -> int:
        """A new link to the Core: every connected device is announced again, and waits again;
        nothing is given until the new link's first Work."""
        self._stale = True
        self._seq += 1
        for d in self._ready:
            self._unready[d] = self._seq
        self._ready.clear()
        for d in self._unready:
            self._unready[d] = self._seq
        return self._seq

    # ------------------------------------------------------- core events
    def online_ack(self, seq: int, answered: Mapping[str, Sequence[int]], refused: Sequence[str]) -> list[Effect]:
        for dev, iids in answered.items():
            for iid in iids:
                ins = self._active.get(iid)
                if ins is not None:
                    ins.answered.add(dev)
                else:  # its Work has not arrived yet (e.g. after a Switch restart)
                    self._answered_early.setdefault(iid, set()).add(dev)
        effects: list[Effect] = []
        gone = set(refused)
        if gone:
            effects.append(Refuse([d for d in refused if self.readiness(d) is not None]))
            for d in gone:
                self.gone(d)
        ready = [d for d, s in self._unready.items() if s == seq]
        for d in ready:
            del self._unready[d]
            self._ready.add(d)
        if self._stale:  # given at the Work (see relinked)
            return effects
        for iid, ins in self._active.items():
            due = [d for d in ready if ins.wants(d)]
            if due:
                ins.delivered.update(due)
                effects.append(DeliverTo(iid, due))
        return effects

    def work(self, items: Iterable[WorkItem], active: Iterable[int], now: float) -> list[Effect]:
        """The Core's Work: drop what is no longer active, take the new items, and give each to the
        ready devices in its scope."""
        live = set(active)
        for iid in [i for i in self._active if i not in live]:
            del self._active[iid]
        for iid in [i for i in self._answered_early if i not in live]:
            del self._answered_early[iid]
        effects: list[Effect] = []
        if self._stale:  # the first Work since a relink: what the ready devices were not given
            self._stale = False
            for iid, ins in self._active.items():
                due = [d for d in self._ready if ins.wants(d)]
                if due:
                    ins.delivered.update(due)
                    effects.append(DeliverTo(iid, due))
        for item in items:
            if item.id in self._active or item.expires_at <= now:
                continue
            scope = frozenset(item.devices) if item.devices is not None else None
            ins = _Instruction(item, scope, answered=self._answered_early.pop(item.id, set()))
            self._active[item.id] = ins
            ready, answered = self._ready, ins.answered
            targets = ready if scope is None else (d for d in scope if d in ready)
            due = [d for d in targets if d not in answered]
            ins.delivered.update(due)
            effects.append(DeliverTo(item.id, due))
        return effects

    def cancel(self, instruction_ids: Iterable[int]) -> list[Effect]:
        effects: list[Effect] = []
        for iid in instruction_ids:
            ins = self._active.pop(iid, None)
            if ins is not None:
                effects.append(CancelTo(iid, sorted(ins.delivered - ins.answered)))
        return effects


@dataclass(slots=True)
class _Job:
    instruction_id: int
    devices: list[str]
    pos: int = 0


class FanOut:
    """The DeliverTo effects not yet written, in the order they were made, handed out in slices.

    ``take(budget, active)`` returns the next ``(instruction_id, devices, first, last)`` slices
    (``first``: the slice starts that effect; ``last``: it ends it), at most ``budget`` devices in
    all. An instruction that is no longer in ``active`` (cancelled, ended) is dropped with what was
    left of it: its devices are not given it. A device that went away meanwhile is the shell's to
    skip, as for any Deliver."""

    __slots__ = ("_jobs",)

    def __init__(self) -> None:
        self._jobs: deque[_Job] = deque()

    def __bool__(self) -> bool:
        return bool(self._jobs)

    def __len__(self) -> int:
        """Devices still to be given an instruction (over all pending effects)."""
        return sum(len(j.devices) - j.pos for j in self._jobs)

    def add(self, effect: DeliverTo) -> None:
        if effect.devices:
            self._jobs.append(_Job(effect.instruction_id, effect.devices))

    def take(self, budget: int, active: Container[int]) -> list[tuple[int, list[str], bool, bool]]:
        out: list[tuple[int, list[str], bool, bool]] = []
        jobs = self._jobs
        while jobs and budget > 0:
            job = jobs[0]
            if job.instruction_id not in active:
                jobs.popleft()
                continue
            start = job.pos
            end = min(len(job.devices), start + budget)
            part = job.devices if start == 0 and end == len(job.devices) else job.devices[start:end]
            budget -= end - start
            job.pos = end
            done = end == len(job.devices)
            if done:
                jobs.popleft()
            out.append((job.instruction_id, part, start == 0, done))
        return out
