"""Method declarations: the single source of truth for checking, running and documenting."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

from .errors import ScaleError

if TYPE_CHECKING:  # pragma: no cover
    from . import AgentContext, Limits

ParamType = Literal["string", "integer", "number", "boolean", "table"]
ColumnType = Literal["string", "integer", "number", "boolean", "datetime"]
Platform = Literal["linux", "macos", "windows"]
ALL_PLATFORMS: tuple[Platform, ...] = ("linux", "macos", "windows")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: ParamType
    required: bool = False
    default: object = None
    description: str = ""
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    type: ColumnType
    description: str = ""


class MethodError(Exception):
    """Raised by a method implementation; becomes a ScaleError at the call's position."""


# Set by :func:`quanta.scale.stop_all` when the process shuts down: every running payload stops.
STOPPING = threading.Event()


def row_bytes(row: Sequence[object]) -> int:
    """Approximate memory of one row as Python holds it (CPython sizes: a list, a pointer and a
    24-byte object per cell, and a text or blob's length on top). On the path of every fetched row."""
    n = 56 + 32 * len(row)
    for v in row:
        t = type(v)
        if t is str or t is bytes:
            n += 25 + len(v)  # type: ignore[arg-type]
        elif t is not int and t is not float and isinstance(v, (str, bytes, bytearray)):
            n += 25 + len(v)
    return n


def stop_reason(deadline: float, cancel: threading.Event | None) -> str | None:
    """Why work must stop now: "time", "cancelled", "stopping", or None to go on."""
    if STOPPING.is_set():
        return "stopping"
    if cancel is not None and cancel.is_set():
        return "cancelled"
    if time.monotonic() > deadline:
        return "time"
    return None


def stop_message(reason: str, timeout_seconds: float) -> str:
    if reason == "time":
        return f"Time limit of {timeout_seconds:g} seconds exceeded"
    if reason == "cancelled":
        return "Instruction cancelled"
    return "Stopped: the agent is shutting down"


@dataclass
class MethodEnv:
    """What a method implementation receives besides its arguments.

    ``max_rows`` and ``max_bytes`` are what this call may still add to the payload's tables; a
    method that produces many rows calls :meth:`take` for each, so it stops at the limit while
    producing instead of after.
    """

    context: "AgentContext"
    limits: "Limits"
    deadline: float  # time.monotonic() value
    max_rows: int = -1  # -1: the payload's limits
    max_bytes: int = -1
    rows: int = 0
    bytes: int = 0

    def __post_init__(self) -> None:
        if self.max_rows < 0:
            self.max_rows = self.limits.max_rows
        if self.max_bytes < 0:
            self.max_bytes = self.limits.max_memory_bytes

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def stop_reason(self) -> str | None:
        return stop_reason(self.deadline, self.context.cancel)

    def check_time(self) -> None:
        """Raise when the time limit passed, the instruction was cancelled or the agent stops."""
        reason = self.stop_reason()
        if reason is not None:
            raise MethodError(stop_message(reason, self.limits.timeout_seconds))

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking early on cancellation; then :meth:`check_time`."""
        cancel = self.context.cancel
        step = max(0.0, min(seconds, self.remaining(), 0.1))
        if cancel is not None:
            cancel.wait(step)
        else:
            time.sleep(step)
        self.check_time()

    def take(self, row: list[object]) -> list[object]:
        """Count one produced row against the limits; raise MethodError past them."""
        self.rows += 1
        self.bytes += row_bytes(row)
        if self.rows > self.max_rows:
            raise MethodError(f"Result exceeds the row limit of {self.limits.max_rows} rows")
        if self.bytes > self.max_bytes:
            raise MethodError(f"Memory limit of {self.limits.max_memory_bytes} bytes exceeded")
        if self.rows % 1024 == 0:
            self.check_time()
        return row


Rows = list[list[object]]
Impl = Callable[[MethodEnv, dict[str, object]], "Rows | tuple[list[str], Rows]"]


@dataclass(frozen=True)
class MethodSpec:
    module: str
    name: str
    description: str
    params: tuple[ParamSpec, ...] = ()
    columns: tuple[ColumnSpec, ...] = ()
    platforms: tuple[Platform, ...] = ALL_PLATFORMS
    is_action: bool = False
    dynamic_columns: bool = False  # output columns depend on arguments (e.g. InterpretAsJson)
    # Answers from the agent's memory or one small local file and never blocks: the agent may run
    # a payload made only of such calls on its event loop instead of handing it to a worker thread.
    quick: bool = False
    impl: Impl | None = field(default=None, repr=False, compare=False)

    @property
    def full_name(self) -> str:
        return f"{self.module}.{self.name}"

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def param(self, name: str) -> ParamSpec | None:
        for p in self.params:
            if p.name == name or name in p.aliases:
                return p
        return None


def current_platform() -> Platform:
    if sys.platform.startswith("win"):
        return "windows"
    if sys.platform == "darwin":
        return "macos"
    return "linux"


_REGISTRY: dict[str, dict[str, MethodSpec]] = {}


def method(
    module: str,
    name: str,
    description: str,
    *,
    params: tuple[ParamSpec, ...] = (),
    columns: tuple[ColumnSpec, ...] = (),
    platforms: tuple[Platform, ...] = ALL_PLATFORMS,
    is_action: bool = False,
    dynamic_columns: bool = False,
    quick: bool = False,
) -> Callable[[Impl], Impl]:
    """Decorator declaring a SCALE method implemented by the decorated function."""

    def deco(fn: Impl) -> Impl:
        spec = MethodSpec(module, name, description, params, columns, platforms, is_action, dynamic_columns, quick,
                          fn)
        _REGISTRY.setdefault(module, {})[name] = spec
        return fn

    return deco


def registry() -> dict[str, dict[str, MethodSpec]]:
    from . import methods  # noqa: F401  (importing registers every method)

    return _REGISTRY


# The model reports a call of a module or method it does not have as "Not implemented - ...";
# Quanta keeps that wording and adds which name is unknown and where (line and column).
NOT_IMPLEMENTED = "Not implemented - "


def lookup(module: str, name: str, line: int, column: int, method_line: int, method_column: int) -> MethodSpec:
    reg = registry()
    mod = reg.get(module)
    if mod is None:
        raise ScaleError(f"{NOT_IMPLEMENTED}Unsupported module '{module}'", line, column)
    spec = mod.get(name)
    if spec is None:
        raise ScaleError(
            f"{NOT_IMPLEMENTED}Unsupported method '{name}' (in call to {module}.{name})", method_line, method_column
        )
    return spec


def path_arg(value: object) -> Path:
    return Path(str(value)).expanduser()
