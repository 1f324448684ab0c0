"""Prometheus metrics: every metric Quanta exports, declared once, and the endpoint that serves them.

Each component is its own process with its own registry (``prometheus_client``'s default one), and
serves ``/metrics`` on ``internal_host`` (loopback by default) at the port that ``metrics_ports`` in
quanta.toml gives it; a component without a port there exports nothing. The Switches of one Switch
Host share its setting: Switch *n* (1-based, in SwitchConfiguration order) listens on the
``switch`` port + *n* − 1.

Names are prefixed ``quanta_``; counters end in ``_total`` (the library adds it), durations are
seconds. Labels are bounded sets (a refusal reason, a route template, a state), never a device
name or an instruction id, so that a fleet of any size keeps the series count fixed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

__all__ = ["serve_metrics"]

log = logging.getLogger("quanta.metrics")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# ------------------------------------------------------------------ Switch
# connections, handshakes, frames and refusals are counted by the Switch in plain ints (its hot path)
# and read at scrape time by SwitchCollector
switch_batch_latency = Histogram("quanta_switch_batch_latency_seconds",
                                 "From sending a response batch to the Core to its acknowledgement",
                                 buckets=LATENCY_BUCKETS)

# -------------------------------------------------------------------- Core
core_instructions = Gauge("quanta_core_instructions", "Instructions the Core holds open, by state", ["state"])
core_instructions_ended = Counter("quanta_core_instructions_ended", "Instructions ended, by final status",
                                  ["status"])
core_answers = Counter("quanta_core_answers", "Answers committed to the Responses database")
core_commit_latency = Histogram("quanta_core_commit_latency_seconds", "Time to commit one response batch",
                                buckets=LATENCY_BUCKETS)
core_held = Counter("quanta_core_held_answers", "Answers held aside instead of counted (late or refused)", ["kind"])


# ------------------------------------------------- one question's milestones
class Milestones:
    """The wall-clock time (``time.time()``) at which each of a fixed set of events first happened for
    the *latest* instruction this process handles, so that a benchmark (or an operator) can see where a
    question's first answer spends its time: exported as ``quanta_<component>_milestone_seconds{event}``
    beside ``quanta_<component>_milestone_instruction`` (the instruction's id).

    Only :meth:`start` moves it to a newer instruction (the Core at issue, a Switch at the ``Work``
    carrying it); :meth:`mark` records an event once, and only for that instruction, so answers a
    device sends for any other instruction (a flood, duplicates, late ones) change nothing. Constant
    memory and a comparison per call: always on."""

    __slots__ = ("component", "events", "instruction_id", "times")

    def __init__(self, component: str, events: tuple[str, ...]) -> None:
        self.component = component
        self.events = events
        self.instruction_id = -1
        self.times: dict[str, float] = {}

    def start(self, instruction_id: int, event: str, now: float | None = None) -> None:
        """A newer instruction than the latest (an older one changes nothing), and its first event."""
        if instruction_id > self.instruction_id:
            self.instruction_id = instruction_id
            self.times = {}
        self.mark(instruction_id, event, now)

    def mark(self, instruction_id: int, event: str, now: float | None = None) -> None:
        if instruction_id == self.instruction_id and event not in self.times:
            self.times[event] = time.time() if now is None else now

    def again(self, instruction_id: int, event: str, now: float | None = None) -> None:
        """Record ``event`` every time (its last occurrence: the last answer, the last commit)."""
        if instruction_id == self.instruction_id:
            self.times[event] = time.time() if now is None else now

    def due(self, event: str) -> bool:
        """True while ``event`` is still to be recorded for the latest instruction (cheap guard for a
        mark whose test costs more than a comparison)."""
        return self.instruction_id >= 0 and event not in self.times

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        if self.instruction_id < 0:
            return
        yield GaugeMetricFamily(f"quanta_{self.component}_milestone_instruction",
                                "The instruction whose milestones are exported", value=self.instruction_id)
        g = GaugeMetricFamily(f"quanta_{self.component}_milestone_seconds",
                              "When each event first happened for that instruction (Unix time)", labels=["event"])
        for event in self.events:
            t = self.times.get(event)
            if t is not None:
                g.add_metric([event], t)
        yield g


CORE_MILESTONES = ("issue", "targets_read", "handed_out", "targets_written", "activated", "first_batch",
                   "first_commit", "last_commit", "finished")
"""issue: the Core's issue call began; targets_read: the target devices read; handed_out: the Work
pushed to every linked Switch; targets_written / activated: the target rows committed, then
created -> active; first_batch: the first ResponseBatch with an answer to it arrived; first_commit:
that batch committed (BatchAck follows); last_commit: the last batch with an answer to it committed
(so far); finished: the instruction ended."""
SWITCH_MILESTONES = ("work", "first_deliver", "last_deliver", "first_answer", "first_batch", "last_answer",
                     "last_batch")
"""work: the Work carrying it arrived; first_deliver / last_deliver: its Deliver frame written to the
first / last connected device of the fan-out; first_answer: the first answer to it read from a device;
first_batch: the first ResponseBatch carrying an answer to it written to the Core link; last_answer /
last_batch: the last of those (so far)."""
core_milestones = Milestones("core", CORE_MILESTONES)
switch_milestones = Milestones("switch", SWITCH_MILESTONES)


def _register_milestones() -> None:
    from prometheus_client import REGISTRY

    REGISTRY.register(core_milestones)
    REGISTRY.register(switch_milestones)


_register_milestones()

# --------------------------------------------------------------------- web
web_requests = Histogram("quanta_web_request_seconds", "Consumer API request latency by route template",
                         ["method", "route", "status"], buckets=LATENCY_BUCKETS)

# ------------------------------------------------------------- Coordinator
coordinator_approvals_pending = Gauge("quanta_coordinator_approvals_pending", "Actions awaiting approval")


class SwitchCollector:
    """The Switch's counters, read when /metrics is scraped (nothing on the per-frame path but an int)."""

    def __init__(self, switch: Any) -> None:
        self.switch = switch

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        sw = self.switch
        yield GaugeMetricFamily("quanta_switch_connections", "Agent connections open on this Switch (said hello)",
                                value=len(sw.conns))
        hs = CounterMetricFamily("quanta_switch_handshakes", "Agent connections by result", labels=["result"])
        hs.add_metric(["accepted"], sw.stats["connects"])
        hs.add_metric(["shed"], sw.refused.total)  # refused at once at the open-file limit
        yield hs
        yield CounterMetricFamily("quanta_switch_frames_in", "WebSocket messages received from agents",
                                  value=sw.frames_in)
        yield CounterMetricFamily("quanta_switch_frames_out", "WebSocket messages sent to agents", value=sw.frames_out)
        rf = CounterMetricFamily("quanta_switch_refusals", "Connections closed and messages refused by the Switch, "
                                 "by reason (a close code, a refused answer or poke)", labels=["reason"])
        for code, n in sorted(sw.closes.items()):
            rf.add_metric([code.lower()], n)
        rf.add_metric(["answer_out_of_bounds"], sw.stats["refused_responses"])
        rf.add_metric(["bad_poke"], sw.bad_pokes.total)
        yield rf


def watch_approvals(engine: Any) -> None:
    """quanta_coordinator_approvals_pending counts the actions awaiting approval when it is scraped
    (one indexed count in the scrape's own thread; a database outage reads as NaN, not an error)."""
    import sqlalchemy as sa

    from quanta.db.tables import instructions
    from quanta.states import PENDING_APPROVAL

    def pending() -> float:
        try:
            with engine.connect() as c:
                return float(c.execute(sa.select(sa.func.count()).select_from(instructions)
                                       .where(instructions.c.status == PENDING_APPROVAL)).scalar_one())
        except sa.exc.SQLAlchemyError:
            return float("nan")

    coordinator_approvals_pending.set_function(pending)


def register_switch(switch: Any) -> None:
    from prometheus_client import REGISTRY

    REGISTRY.register(SwitchCollector(switch))


class RequestMetrics:
    """ASGI middleware: each HTTP request's duration in ``quanta_web_request_seconds`` by method, route
    template (``/Consumer/Instructions/{instruction_id}``, never the raw path: ids would make a series
    each) and status. Requests no route matched count as route ``other``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an app that raises before answering is a server error
        t0 = time.perf_counter()

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            web_requests.labels(scope["method"], route, str(status)).observe(time.perf_counter() - t0)


def metrics_port(settings: Any, component: str, index: int = 0) -> int | None:
    """The port of ``component``'s metrics endpoint (``index``: the Switch's position), or None."""
    base = settings.metrics_ports.get(component)
    return None if not base else int(base) + index


def serve_metrics(settings: Any, component: str, index: int = 0) -> int | None:
    """Serve this process's metrics at http://<internal_host>:<port>/metrics in a daemon thread, when a
    port is set. Returns the port, or None when metrics are off for this component."""
    port = metrics_port(settings, component, index)
    if port is None:
        return None
    from quanta.runtime import PortError

    try:
        start_http_server(port, addr=settings.internal_host)
    except OSError as e:
        raise PortError(f"{component}: cannot serve metrics on {settings.internal_host}:{port}: {e.strerror}; "
                        f"set metrics_ports.{component} in quanta.toml",
                        in_use=e.errno == 98) from None
    log.info("%s metrics at http://%s:%d/metrics", component, settings.internal_host, port)
    return port
