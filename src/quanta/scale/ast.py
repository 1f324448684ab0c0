"""Syntax tree of a SCALE payload. Every node carries its 1-based line and column."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True, slots=True)
class Pos:
    line: int
    column: int


@dataclass(slots=True)
class Literal:
    value: object  # str, int, float or bool
    pos: Pos


@dataclass(slots=True)
class ParamRef:
    """An instruction parameter ``%name%`` not yet substituted."""

    name: str
    pos: Pos


@dataclass(slots=True)
class ColumnRef:
    """``@table.Column`` used as a method argument."""

    var: str
    column: str
    pos: Pos


@dataclass
class TableRef:
    """``@table`` (a whole table) used as the argument of a ``table`` parameter (``Storage.Set(Value: @t)``)."""

    var: str
    pos: Pos


Value = Union[Literal, ParamRef, ColumnRef, TableRef]


@dataclass(slots=True)
class Arg:
    name: str
    value: Value
    pos: Pos


@dataclass(slots=True)
class Call:
    module: str
    method: str
    args: list[Arg]
    pos: Pos  # position of the module name
    method_pos: Pos


# Pieces of the text of a SELECT, after comments are removed.
@dataclass(slots=True)
class SqlCode:
    text: str


@dataclass(slots=True)
class SqlString:
    value: str  # decoded string value, emitted as a single-quoted SQL literal


@dataclass(slots=True)
class SqlVar:
    name: str
    pos: Pos


@dataclass(slots=True)
class SqlBuiltin:
    name: str  # without the "$"
    pos: Pos


@dataclass(slots=True)
class SqlParam:
    name: str
    pos: Pos


@dataclass(slots=True)
class SqlLiteral:
    """A substituted instruction parameter, already rendered as an SQL literal."""

    sql: str


SqlPart = Union[SqlCode, SqlString, SqlVar, SqlBuiltin, SqlParam, SqlLiteral]


@dataclass(slots=True)
class Select:
    parts: list[SqlPart]
    pos: Pos


@dataclass(slots=True)
class Assign:
    target: str
    value: "Statement | Literal | ParamRef"
    pos: Pos


@dataclass(slots=True)
class Foreach:
    row_var: str
    table_var: str
    body: list["Statement"]
    pos: Pos
    table_pos: Pos


@dataclass(slots=True)
class If:
    negate: bool
    var: str
    then: list["Statement"]
    otherwise: list["Statement"] | None
    pos: Pos
    var_pos: Pos


@dataclass(slots=True)
class Evaluate:
    pos: Pos


@dataclass(slots=True)
class Exit:
    """NOCONTENT, ERROR "m", NOTIMPLEMENTED "m" or RETURN [@table]."""

    kind: str  # "NOCONTENT" | "ERROR" | "NOTIMPLEMENTED" | "RETURN"
    message: str | None
    var: str | None
    pos: Pos
    var_pos: Pos | None = None


Statement = Union[Assign, Call, Select, Foreach, If, Evaluate, Exit]


@dataclass(slots=True)
class Script:
    statements: list[Statement] = field(default_factory=list)
