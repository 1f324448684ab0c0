"""Instruction definitions: typed, validated, checksummed (sans-I/O).

A definition is a TOML file::

    name = "Quanta-RunningProcesses"
    type = "question"                    # or "action"
    instruction_set = "Processes"
    description = "Which devices run a process matching %Pattern%?"
    payload = '''
    @p = OperatingSystem.GetProcesses();
    SELECT Executable, COUNT(*) AS Count FROM @p WHERE Executable LIKE %Pattern% GROUP BY Executable;
    '''
    [[parameters]]
    name = "Pattern"
    type = "string"
    default = "%"
    max_length = 200

    [[schema]]
    name = "Executable"
    type = "string"

    [aggregation]
    group_by = ["Executable"]

    [ttl]
    instruction_default = 60
"""

from __future__ import annotations

import functools
import hashlib
import json
import tomllib
from typing import Any, Literal

import re2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"


class DefinitionError(ValueError):
    pass


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamDef(Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    type: Literal["string", "integer", "float", "boolean"]
    description: str = ""
    default: str | int | float | bool | None = None
    required: bool = False
    min: float | None = None
    max: float | None = None
    max_length: int | None = Field(default=None, ge=1, le=65536)
    pattern: str | None = None
    allowed: list[str | int | float] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamDef:
        if self.pattern is not None:
            try:
                _pattern(self.pattern)
            except re2.error as e:
                raise ValueError(f"parameter {self.name}: bad pattern (RE2 syntax: no backreferences or "
                                 f"lookaround): {e}") from None
        if self.default is not None:
            validate_value(self, self.default)
        return self


class ColumnDef(Strict):
    name: str
    type: Literal["string", "integer", "float", "boolean", "any"] = "any"


class Aggregation(Strict):
    group_by: list[str] = Field(min_length=1)
    count_as: str = "Count"


class Ttls(Strict):
    instruction_default: int = Field(default=60, ge=1)
    instruction_min: int = Field(default=10, ge=1)
    instruction_max: int = Field(default=86400, ge=1)
    response_default: int = Field(default=7 * 86400, ge=60)
    response_min: int = Field(default=60, ge=60)
    response_max: int = Field(default=365 * 86400, ge=60)

    @model_validator(mode="after")
    def _order(self) -> Ttls:
        if not self.instruction_min <= self.instruction_default <= self.instruction_max:
            raise ValueError("ttl: instruction_min <= instruction_default <= instruction_max must hold")
        if not self.response_min <= self.response_default <= self.response_max:
            raise ValueError("ttl: response_min <= response_default <= response_max must hold")
        return self


class Definition(Strict):
    name: str = Field(pattern=NAME_RE)
    type: Literal["question", "action"]
    instruction_set: str = Field(default="Default", pattern=NAME_RE)
    description: str = Field(min_length=1, max_length=2000)
    payload: str = Field(min_length=1, max_length=64 * 1024)
    parameters: list[ParamDef] = []
    schema_: list[ColumnDef] = Field(default=[], alias="schema")
    aggregation: Aggregation | None = None
    ttl: Ttls = Ttls()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _unique_params(self) -> Definition:
        names = [p.name for p in self.parameters]
        if len(names) != len(set(names)):
            raise ValueError("parameter names must be unique")
        return self

    def canonical(self) -> bytes:
        return json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":")).encode()

    def checksum(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    def readable(self, values: dict[str, Any]) -> str:
        text = self.description
        for k, v in values.items():
            text = text.replace(f"%{k}%", str(v))
        return text


def validate_value(p: ParamDef, value: Any) -> Any:
    """Check one parameter value against its declaration; return it typed."""
    t = p.type
    if t == "boolean":
        if not isinstance(value, bool):
            raise DefinitionError(f"parameter {p.name} expects a boolean, got {type(value).__name__}")
    elif t == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise DefinitionError(f"parameter {p.name} expects an integer, got {type(value).__name__}")
    elif t == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DefinitionError(f"parameter {p.name} expects a number, got {type(value).__name__}")
        value = float(value)
    elif not isinstance(value, str):
        raise DefinitionError(f"parameter {p.name} expects a string, got {type(value).__name__}")
    if t in ("integer", "float"):
        if p.min is not None and value < p.min:
            raise DefinitionError(f"parameter {p.name} must be >= {p.min:g}")
        if p.max is not None and value > p.max:
            raise DefinitionError(f"parameter {p.name} must be <= {p.max:g}")
    if t == "string":
        if p.max_length is not None and len(value) > p.max_length:
            raise DefinitionError(f"parameter {p.name} is longer than {p.max_length} characters")
        if p.pattern is not None and not _pattern(p.pattern).fullmatch(value):
            raise DefinitionError(f"parameter {p.name} does not match {p.pattern!r}")
    if p.allowed is not None and value not in p.allowed:
        raise DefinitionError(f"parameter {p.name} must be one of {p.allowed}")
    return value


@functools.lru_cache(maxsize=256)
def _pattern(pattern: str) -> Any:
    """A definition parameter's pattern, compiled by RE2: matching takes time linear in the value,
    so no value a user submits can make the Consumer API backtrack (``(a+)+$``)."""
    from quanta.scale.sqlfuncs import re2_options

    return re2.compile(pattern, re2_options())


def bind_parameters(d: Definition, supplied: dict[str, Any]) -> dict[str, Any]:
    """Typed values for every declared parameter: supplied, else default; unknown names refused."""
    declared = {p.name: p for p in d.parameters}
    unknown = sorted(set(supplied) - set(declared))
    if unknown:
        raise DefinitionError(f"unknown parameter(s) for {d.name}: {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for name, p in declared.items():
        if name in supplied:
            out[name] = validate_value(p, supplied[name])
        elif p.default is not None and not p.required:
            out[name] = p.default
        else:
            raise DefinitionError(f"parameter {name} of {d.name} is required")
    return out


def parse_definition(text: str, source: str = "<definition>") -> Definition:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DefinitionError(f"{source}: not valid TOML: {e}") from None
    try:
        return Definition.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise DefinitionError(f"{source}: {where}: {first['msg']}") from None


def check_payload(d: Definition) -> None:
    """Compile the payload the way the server will at issue time; a question must not call actions."""
    from quanta.scale import ScaleError, compile_scale
    from quanta.scale.compiler import AnyParameters

    try:
        program = compile_scale(d.payload, AnyParameters())
    except ScaleError as e:
        raise DefinitionError(f"{d.name}: payload: {e}") from None
    if program.is_action and d.type == "question":
        raise DefinitionError(f"{d.name}: declared a question but its payload calls action methods")
