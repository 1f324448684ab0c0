"""Method declarations: the single source of truth for checking, running and documenting."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

from .errors import ScaleError

if TYPE_CHECKING:  # pragma: no cover
    from . import AgentContext, Limits

ParamType = Literal["string", "integer", "number", "boolean"]
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


@dataclass
class MethodEnv:
    """What a method implementation receives besides its arguments."""

    context: "AgentContext"
    limits: "Limits"
    deadline: float  # time.monotonic() value

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise MethodError(f"Time limit of {self.limits.timeout_seconds:g} seconds exceeded")


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


def lookup(module: str, name: str, line: int, column: int, method_line: int, method_column: int) -> MethodSpec:
    reg = registry()
    mod = reg.get(module)
    if mod is None:
        raise ScaleError(f"Unsupported module '{module}'", line, column)
    spec = mod.get(name)
    if spec is None:
        raise ScaleError(
            f"Unsupported method '{name}' (in call to {module}.{name})", method_line, method_column
        )
    return spec


def path_arg(value: object) -> Path:
    return Path(str(value)).expanduser()
