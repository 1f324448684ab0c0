"""SCALE: the agent language of Quanta.

Compile a payload with :func:`compile_scale` (on the server, before sending it) and run it
with :func:`run_program` (on the agent). Errors are :class:`ScaleError` values carrying a
line and a column.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .compiler import Program
from .errors import ScaleError
from .evaluator import RunResult, Table
from .spec import ColumnSpec, MethodSpec, ParamSpec

__all__ = [
    "AgentContext",
    "cancel",
    "ColumnSpec",
    "Limits",
    "MethodSpec",
    "ParamSpec",
    "Program",
    "RunResult",
    "ScaleError",
    "compile_scale",
    "limit_process_memory",
    "method_reference",
    "read_tags",
    "render_methods_markdown",
    "run_program",
    "stop_all",
]


@dataclass
class Limits:
    """Per-instruction limits: wall time, rows of any table, and memory."""

    timeout_seconds: float = 60.0
    max_rows: int = 100_000
    max_memory_bytes: int = 64 * 1024 * 1024


@dataclass
class AgentContext:
    """What methods need from the running agent."""

    data_dir: Path
    config_path: Path | None = None
    log_path: Path | None = None
    executable: str | None = None
    agent_version: str = "0.1.0"
    # Downloads a Background Channel resource by SHA-256, verifies it, returns its local path.
    fetch_resource: Callable[[str], Path] | None = None
    # Shows a prompt to the logged-on user through the agent's interaction port:
    # interact(kind, title, description, timeout_seconds, wait) -> "Yes" | "No" | "Acknowledged" | "TimedOut" | "Queued"
    interact: Callable[[str, str, str, float, bool], str] | None = None
    # Set it (from any thread) to stop this payload: SQL stops at its next progress check, method
    # loops and child-process waits at their next check; the result is an "Instruction cancelled" error.
    cancel: threading.Event = field(default_factory=threading.Event)
    # The instruction this payload answers: quanta.scale.cancel([id]) then sets ``cancel``.
    instruction_id: int | None = None
    # The instruction's (signed) name.
    instruction_name: str | None = None
    # Who owns the Storage.* tables this payload makes and reads: the signed body's ``owner``
    # (its pack and publisher key, or the issuing server's key for raw SCALE; see
    # methods/storage.py). None outside an agent: the owner is then "local".
    storage_owner: str | None = None


def compile_scale(text: str, parameters: dict[str, object] | None = None) -> Program:
    """Parse and check a payload, substituting ``%name%`` instruction parameters.

    Raises :class:`ScaleError` (with line and column) for any problem.
    """
    from .compiler import compile_program

    try:
        return compile_program(text, parameters)
    except RecursionError:
        raise ScaleError("Payload nested too deeply", 1, 1) from None


def run_program(
    program: Program,
    *,
    context: AgentContext,
    limits: Limits = Limits(),
    allow_actions: bool = False,
) -> RunResult:
    """Run a compiled payload. Never raises for payload problems: see ``RunResult.status``."""
    from .evaluator import Evaluator

    with _running(context):
        try:
            return Evaluator(program, context, limits, allow_actions).run()
        except Exception as e:  # last line of defence: the agent must survive any payload
            return RunResult("error", [], [], ScaleError(f"Internal error: {type(e).__name__}: {e}", 1, 1))


# Payloads running now, by instruction id, for cancel().
_RUNNING: dict[int, list[AgentContext]] = {}
_RUNNING_LOCK = threading.Lock()


@contextmanager
def _running(context: AgentContext) -> Iterator[None]:
    iid = context.instruction_id
    if iid is None:
        yield
        return
    with _RUNNING_LOCK:
        _RUNNING.setdefault(iid, []).append(context)
    try:
        yield
    finally:
        with _RUNNING_LOCK:
            ctxs = _RUNNING[iid]
            ctxs.remove(context)
            if not ctxs:
                del _RUNNING[iid]


def cancel(instruction_ids: Iterable[int]) -> int:
    """Stop the running payloads of these instructions (their ``AgentContext.instruction_id``);
    each ends with the error "Instruction cancelled" at its next check. Returns how many were told.
    Thread-safe: call it from the event loop while the payloads run on worker threads."""
    with _RUNNING_LOCK:
        told = [c for i in instruction_ids for c in _RUNNING.get(i, ())]
    for c in told:
        c.cancel.set()
    return len(told)


def stop_all() -> None:
    """Stop every payload running in this process, now and later (the process is shutting down).

    Each ends with the error "Stopped: the agent is shutting down" at its next check.
    """
    from .spec import STOPPING

    STOPPING.set()


# SQLite's heap beyond the payloads' own limits: the statements, caches and schema around them.
SQLITE_HEAP_SLACK = 32 * 1024 * 1024


def limit_process_memory(concurrent_payloads: int, limits: Limits = Limits()) -> int:
    """Cap the memory SQLite may allocate in this whole process (``PRAGMA hard_heap_limit``) to
    what ``concurrent_payloads`` payloads at ``limits.max_memory_bytes`` need, plus slack.

    For a process that runs payloads and nothing else (the agent, ``quanta scale run``): a
    statement past the cap (a sort of huge rows, a value built in SQLite) fails with a
    memory-limit error instead of growing the process. The cap can only be lowered, never raised,
    and holds for every SQLite connection of the process. Returns the limit in force.
    """
    from .evaluator import set_hard_heap_limit

    return set_hard_heap_limit(concurrent_payloads * limits.max_memory_bytes + SQLITE_HEAP_SLACK)


def method_reference() -> list[MethodSpec]:
    """Every declared method, sorted by module and name."""
    from .spec import registry

    return sorted(
        (spec for mod in registry().values() for spec in mod.values()), key=lambda s: (s.module, s.name)
    )


def render_methods_markdown() -> str:
    """The method reference as Markdown (``docs/scale.md``)."""
    from .docs import render_markdown

    return render_markdown()


def read_tags(data_dir: Path) -> dict[str, str]:
    """The device's tags, as persisted by ``Tagging.Set`` (empty when none or unreadable)."""
    from .methods.tagging import load_tags

    return {name: entry["value"] for name, entry in load_tags(Path(data_dir)).items()}
