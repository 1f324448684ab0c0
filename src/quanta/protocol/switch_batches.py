"""What a Switch owes the Core and its devices, without I/O: answers gathered into batches, the
batches the Core has not acknowledged yet, the ``ResponseAck`` each device is owed once the Core
committed its answer, devices on- and offline, and deliveries to report.

The Switch (``quanta.switch.service``) is the shell: it owns the sockets, the timers and the
clock. It feeds :class:`SwitchBatches` events (with the time as an argument) and carries out the
effects it returns; it asks :meth:`SwitchBatches.flush_at` and :meth:`SwitchBatches.acks_at`
when to call again. The rules:

* **At least once towards the Core.** An answer goes into exactly one :class:`SendBatch`; the
  batch is kept until the Core's ``BatchAck`` for it, and every batch not acknowledged is sent
  again after a new link (:meth:`link_up`), in the order first sent. The Core stores answers
  idempotently (per instruction and device), so a batch sent twice, or an answer in two batches
  (a device resends it), is harmless; an acknowledgement of an unknown or already acknowledged
  batch changes nothing.
* **A device is acknowledged only what the Core committed.** :class:`AckDevice` names an
  instruction only after the Core acknowledged the batch that carried that device's answer to it;
  until then the device's journal keeps the answer and sends it again on its next connection. A
  Switch that dies loses nothing the devices do not still hold.
* **Batching.** While no batch awaits the Core's acknowledgement, answers go at once (an idle
  link: the first answers of a question, or its last ones, wait for nothing); while one does, they
  gather until that acknowledgement, or until they fill a batch (MAX_BATCH answers or
  ``max_message_bytes``), whichever comes first. So a link carries at most one batch that is not
  full, and under load the batches grow with the Core's commit time: a Core that commits slowly
  (a busy machine, a large transaction, the target rows of a new question) is sent fewer, larger
  batches, each of which it commits more cheaply per answer, instead of a queue of small ones.
* **Answers first.** Acknowledgements to devices wait while answers keep arriving (one in the
  last ACK_IDLE seconds), for at most ACK_MAX_DELAY, and go out ``limit`` at a time
  (:meth:`take_acks`), so waking every device never competes with reading answers. Draining N
  acknowledgements costs O(N): the queue is swapped out whole and walked once.
* **Deliveries.** A delivery is reported to the Core (pending -> sent) only once it is
  DELIVERED_HOLD (5 s) old and its device has not answered meanwhile: an answer supersedes it, so
  most devices never cost a 'sent' write, even when a large fleet's answers take seconds to come
  in, and the Core commits answers first.
* **Devices on- and offline** gather for FLUSH_INTERVAL into one announcement each way, the
  announcement first (a device that came and went is announced, then reported offline), and
  both before the answers of the same flush; a new link announces everyone anyway (the shell
  sends that full ``DevicesOnline``), so what was gathered before is dropped then.
* **Tags.** A device's TagReport (its tags changed on a live connection) is coalesced: only its
  latest tags go, gathered for FLUSH_INTERVAL into one ``DeviceTags``, and at most once per
  TAGS_MIN_INTERVAL per device, so a device that floods reports costs the Core one entry a
  second and nothing more. A device whose hello is still to be announced has its announcement
  carry the new tags instead; a new link's full announcement carries everyone's latest, so what
  was gathered is dropped then.
* Nothing is sent while the link is down (:meth:`link_lost` .. :meth:`link_up`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

from quanta.protocol.messages import DeviceInfo, DeviceResponse, Response, ResponseBatch

FLUSH_INTERVAL = 0.02
MAX_BATCH = 2000  # answers per batch
# How long a delivery waits for its device's answer before it is reported as 'sent'. An answer
# supersedes it, and each report is a write of the device's row as costly as the answer's: at 1 s,
# a question to 50,000 devices on 3 Switches on 2 cores (3.5 s of answers, each device answering
# up to 3 s after its Deliver) wrote most rows twice: the Core spent 3.6 s of CPU a question and
# the question took 6.6-7.5 s; at 5 s, 2.0 s and 4.7-4.9 s (docs/benchmarks.md). 'sent' is a progress
# state only (an unanswered delivery expires as a pending one does), shown 5 s after the delivery.
DELIVERED_HOLD = 5.0
# A device's ResponseAck waits until the Switch read no answer for ACK_IDLE, for at most
# ACK_MAX_DELAY after the Core's commit. Each one wakes its device and costs the Switch a write as
# dear as reading an answer: at 50,000 devices on 3 Switches on 2 cores, sent at most 1 s after the
# commit they went out in the middle of the question: 3.27x the floors, 10.3-12.5 CPU-s a round;
# at most 10 s, after its last answers: 3.07x, 8.0-9.3 CPU-s, the acknowledgements' own CPU then
# following the round (docs/benchmarks.md). 10 s keeps well inside the agent's RESEND_AFTER (30 s),
# after which it would send an unacknowledged answer again.
ACK_IDLE = 0.25
ACK_MAX_DELAY = 10.0
TAGS_MIN_INTERVAL = 1.0  # a device's tags go to the Core at most this often (its latest, when due)


# ------------------------------------------------------------------ effects
@dataclass(frozen=True, slots=True)
class Announce:
    """Send the Core a ``DevicesOnline`` for these devices (numbered by ``SwitchState.announce``)."""

    devices: list[DeviceInfo]


@dataclass(frozen=True, slots=True)
class ReportOffline:
    device_ids: list[str]


@dataclass(frozen=True, slots=True)
class ReportTags:
    """Send the Core a ``DeviceTags``: these devices' latest tags."""

    devices: dict[str, dict[str, str]]


@dataclass(frozen=True, slots=True)
class SendBatch:
    batch: ResponseBatch


@dataclass(frozen=True, slots=True)
class ReportDelivered:
    instruction_id: int
    device_ids: list[str]


@dataclass(frozen=True, slots=True)
class AckDevice:
    """Send this device a ``ResponseAck`` for these instructions (if it is connected; if not, its
    next connection sends the answers again and they are acknowledged then)."""

    device_id: str
    instruction_ids: list[int]


Effect = Announce | ReportOffline | ReportTags | SendBatch | ReportDelivered | AckDevice


class SwitchBatches:
    __slots__ = ("max_message_bytes", "_linked", "_online", "_offline", "_report_due", "_responses", "_sizes",
                 "_bytes", "_unacked", "_seq", "_acks", "_draining", "_ack_since", "_last_answer",
                 "_delivered", "_tags", "_tags_next", "_tags_told", "_told_prune_at")

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._linked = False
        self._online: dict[str, DeviceInfo] = {}
        self._offline: set[str] = set()
        self._report_due: float | None = None  # when the gathered on/offline devices are due
        self._responses: list[DeviceResponse] = []
        self._sizes: list[int] = []
        self._bytes = 0
        self._unacked: dict[int, ResponseBatch] = {}  # in the order sent
        self._seq = 0
        self._acks: dict[str, list[int]] = {}  # device -> committed instructions, to acknowledge
        self._draining: Iterator[tuple[str, list[int]]] | None = None  # the queue swapped out, being sent
        self._ack_since: float | None = None  # when the acknowledgements now queued began to wait
        self._last_answer = float("-inf")
        self._delivered: dict[int, dict[str, float]] = {}  # instruction -> device -> when (in time order)
        self._tags: dict[str, tuple[dict[str, str], int, float]] = {}  # device -> (latest tags, size, when due)
        self._tags_next: float | None = None  # the earliest of those dues
        self._tags_told: dict[str, float] = {}  # device -> when its tags last went (the last TAGS_MIN_INTERVAL)
        self._told_prune_at = float("-inf")

    # ------------------------------------------------------------- queries
    @property
    def linked(self) -> bool:
        return self._linked

    def unacked(self) -> list[int]:
        """Ids of the batches sent and not acknowledged, in the order sent."""
        return list(self._unacked)

    def pending_answers(self) -> int:
        return len(self._responses)

    def acks_pending(self) -> bool:
        return bool(self._acks) or self._draining is not None

    def flush_at(self) -> float | None:
        """When :meth:`flush` has something to send (a time at or before now: at once), or None."""
        if not self._linked:
            return None
        due = self._report_due
        if self._responses and self._answers_due():
            return float("-inf")
        if self._tags_next is not None:
            due = self._tags_next if due is None else min(due, self._tags_next)
        for pending in self._delivered.values():  # one entry per instruction with deliveries to report
            first = next(iter(pending.values()), None)
            if first is not None:
                t = first + DELIVERED_HOLD
                due = t if due is None else min(due, t)
        return due

    def acks_at(self) -> float | None:
        """When :meth:`take_acks` will give acknowledgements, or None while none are queued."""
        if self._ack_since is None:
            return None
        return min(self._last_answer + ACK_IDLE, self._ack_since + ACK_MAX_DELAY)

    # ------------------------------------------------------- device events
    def device_online(self, info: DeviceInfo, now: float) -> bool:
        """A device said hello. True if the flush is now due sooner (the shell re-arms its timer)."""
        self._offline.discard(info.device_id)
        self._online[info.device_id] = info
        self._tags.pop(info.device_id, None)  # an older connection's report: the hello's tags are newer
        return self._report_soon(now)

    def device_offline(self, device_id: str, now: float) -> bool:
        """A device's connection ended. If its hello has not been announced yet, it still is (then
        reported offline, in that order): answers it sent meanwhile must reach the Core from a
        device the Core knows came through this Switch, or they would be held as a stranger's."""
        self._offline.add(device_id)
        return self._report_soon(now)

    def tags_changed(self, info: DeviceInfo, size: int, now: float) -> bool:
        """A device's TagReport: ``info`` is its DeviceInfo with the new tags, ``size`` the report's
        encoded size. Only the latest tags of a device go: with the reports gathering (FLUSH_INTERVAL
        after the first), or TAGS_MIN_INTERVAL after its last ones, whichever is later. True if the
        flush is now due sooner."""
        dev = info.device_id
        if dev in self._online:  # its announcement is still to go: it carries them
            self._online[dev] = info
            return False
        pending = self._tags.get(dev)
        if pending is not None:  # a report already waits: the newer tags take its place and its time
            self._tags[dev] = (info.tags, size, pending[2])
            return False
        gather = now + FLUSH_INTERVAL
        if self._tags_next is not None and self._tags_next < gather:  # joins the reports gathering
            gather = self._tags_next
        due = max(gather, self._tags_told.get(dev, float("-inf")) + TAGS_MIN_INTERVAL)
        self._tags[dev] = (info.tags, size, due)
        if self._tags_next is not None and self._tags_next <= due:
            return False
        self._tags_next = due
        return self._linked

    def _report_soon(self, now: float) -> bool:
        if self._report_due is not None:
            return False
        self._report_due = now + FLUSH_INTERVAL
        return self._linked

    def delivered(self, instruction_id: int, devices: Iterable[str], now: float) -> bool:
        """The instruction was sent to these devices now (reported after DELIVERED_HOLD, unless they
        answer first). True if the flush is now due sooner."""
        pending = self._delivered.get(instruction_id)
        if pending is None:
            pending = self._delivered[instruction_id] = {}
        sooner = not pending and self._linked
        for d in devices:
            pending.pop(d, None)  # keep the dict in time order
            pending[d] = now
        return sooner

    def _answers_due(self) -> bool:
        """Whether the gathered answers go now: no batch awaits its acknowledgement, or they fill one."""
        return not self._unacked or self._bytes >= self.max_message_bytes or len(self._responses) >= MAX_BATCH

    def answered(self, device_id: str, response: Response, size: int, now: float) -> bool:
        """A device's answer (``size``: its encoded size), to go to the Core. True if the flush is
        now due (at once: the link is idle, or the gathered answers fill a batch); False while
        they wait for the acknowledgement of the batch in flight."""
        self._last_answer = now
        pending = self._delivered.get(response.instruction_id)
        if pending is not None:
            pending.pop(device_id, None)  # answered: its 'sent' need not be reported
        self._responses.append(DeviceResponse(device_id=device_id, response=response))
        self._sizes.append(size)
        self._bytes += size
        return self._linked and self._answers_due()

    # --------------------------------------------------------- core events
    def batch_acked(self, batch_id: int, now: float) -> bool:
        """The Core committed batch ``batch_id``: its devices are owed their acknowledgements. An
        unknown or repeated id changes nothing. True if the flush is now due at once (answers
        gathered while the batch awaited its acknowledgement)."""
        batch = self._unacked.pop(batch_id, None)
        if batch is None:
            return False
        acks = self._acks
        for r in batch.responses:
            ids = acks.get(r.device_id)
            if ids is None:
                acks[r.device_id] = [r.response.instruction_id]
            else:
                ids.append(r.response.instruction_id)
        if batch.responses and self._ack_since is None:
            self._ack_since = now
        return self._linked and bool(self._responses) and not self._unacked

    def ended(self, instruction_ids: Iterable[int]) -> None:
        """These instructions ended (the Core's Cancel, or no longer active in its Work): their
        deliveries are not reported any more (an ended instruction's counts are final)."""
        for iid in instruction_ids:
            self._delivered.pop(iid, None)

    def link_lost(self) -> None:
        """The link to the Core is down: nothing is sent until :meth:`link_up`. Unacknowledged
        batches are kept; their acknowledgements died with the link."""
        self._linked = False

    def link_up(self) -> list[Effect]:
        """A new link (the shell has sent its hello and the full ``DevicesOnline``): every batch
        not acknowledged goes again, in the order first sent."""
        self._linked = True
        self._online.clear()
        self._offline.clear()
        self._report_due = None
        self._tags.clear()
        self._tags_next = None
        return [SendBatch(b) for b in self._unacked.values()]

    # ---------------------------------------------------------- the clock
    def flush(self, now: float) -> list[Effect]:
        """Everything due at ``now``: devices on- and offline, the gathered answers in batches (each
        at most MAX_BATCH answers and ``max_message_bytes``, but at least one answer), then the
        deliveries DELIVERED_HOLD old. Call it when :meth:`flush_at` is due; nothing while the link
        is down."""
        if not self._linked:
            return []
        out: list[Effect] = []
        if self._report_due is not None and (self._report_due <= now or self._responses):
            self._report_due = None
            if self._online:  # before the answers: the Core learns who is here, then their answers
                out.append(Announce(list(self._online.values())))
                self._online = {}
            if self._offline:
                out.append(ReportOffline(sorted(self._offline)))
                self._offline = set()
        if self._tags_next is not None and self._tags_next <= now:
            out += self._cut_tags(now)
        if self._responses and self._answers_due():
            out += self._cut()
        if self._delivered:  # after the answers: see DELIVERED_HOLD
            for iid in list(self._delivered):
                pending = self._delivered[iid]
                due = []
                for d, t in pending.items():  # in time order
                    if t + DELIVERED_HOLD > now:  # (the very expression of flush_at: no busy loop)
                        break
                    due.append(d)
                for d in due:
                    del pending[d]
                if not pending:
                    del self._delivered[iid]
                if due:
                    out.append(ReportDelivered(iid, due))
        return out

    def _cut_tags(self, now: float) -> list[Effect]:
        """The tag reports due at ``now``, in DeviceTags of at most ``max_message_bytes`` each (at
        least one device); the others wait for their time."""
        if now >= self._told_prune_at:  # forget who reported over TAGS_MIN_INTERVAL ago, once a while
            self._tags_told = {d: t for d, t in self._tags_told.items() if t + TAGS_MIN_INTERVAL > now}
            self._told_prune_at = now + TAGS_MIN_INTERVAL
        out: list[Effect] = []
        chunk: dict[str, dict[str, str]] = {}
        size = 0
        waiting: dict[str, tuple[dict[str, str], int, float]] = {}
        for dev, (tags, n, due) in self._tags.items():
            if due > now:
                waiting[dev] = (tags, n, due)
                continue
            n += len(dev) + 8
            if chunk and size + n > self.max_message_bytes:
                out.append(ReportTags(chunk))
                chunk, size = {}, 0
            chunk[dev] = tags
            size += n
            self._tags_told[dev] = now
        if chunk:
            out.append(ReportTags(chunk))
        self._tags = waiting
        self._tags_next = min((w[2] for w in waiting.values()), default=None)
        return out

    def _cut(self) -> list[Effect]:
        responses, sizes, limit = self._responses, self._sizes, self.max_message_bytes
        out: list[Effect] = []
        i, end = 0, len(responses)
        while i < end:
            j, size = i, 0
            while j < end and j - i < MAX_BATCH and (j == i or size + sizes[j] <= limit):
                size += sizes[j]
                j += 1
            self._seq += 1
            batch = ResponseBatch(batch_id=self._seq, responses=responses[i:j])
            self._unacked[batch.batch_id] = batch
            out.append(SendBatch(batch))
            i = j
        self._responses, self._sizes, self._bytes = [], [], 0
        return out

    def take_acks(self, now: float, limit: int) -> list[AckDevice]:
        """Up to ``limit`` acknowledgements, if they are due at ``now`` (see :meth:`acks_at`); the
        shell sends them and calls again (on a later loop turn) until this returns nothing."""
        due = self.acks_at()
        if due is None or due > now:
            return []
        out: list[AckDevice] = []
        while len(out) < limit:
            if self._draining is None:
                if not self._acks:
                    break
                self._draining, self._acks = iter(self._acks.items()), {}
            before = len(out)
            out.extend(AckDevice(d, ids) for d, ids in islice(self._draining, limit - before))
            if len(out) - before < limit - before:  # the swapped-out queue is walked through
                self._draining = None
        if self._draining is None and not self._acks:
            self._ack_since = None
        return out


__all__ = ["SwitchBatches", "Announce", "ReportOffline", "ReportTags", "SendBatch", "ReportDelivered", "AckDevice",
           "Effect", "FLUSH_INTERVAL", "MAX_BATCH", "DELIVERED_HOLD", "ACK_IDLE", "ACK_MAX_DELAY", "TAGS_MIN_INTERVAL"]
