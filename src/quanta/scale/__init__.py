"""SCALE: the agent language of Quanta.

Compile a payload with :func:`compile_scale` (on the server, before sending it) and run it
with :func:`run_program` (on the agent). Errors are :class:`ScaleError` values carrying a
line and a column.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path

from .compiler import Program
from .errors import ScaleError
from .evaluator import RunResult, Table
from .spec import ColumnSpec, MethodSpec, ParamSpec

__all__ = [
    "AgentContext",
    "ColumnSpec",
    "Limits",
    "MethodSpec",
    "ParamSpec",
    "Program",
    "RunResult",
    "ScaleError",
    "compile_scale",
    "method_reference",
    "read_tags",
    "render_methods_markdown",
    "run_program",
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

    try:
        return Evaluator(program, context, limits, allow_actions).run()
    except Exception as e:  # last line of defence: the agent must survive any payload
        return RunResult("error", [], [], ScaleError(f"Internal error: {type(e).__name__}: {e}", 1, 1))


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
