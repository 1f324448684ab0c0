"""Checker: parameter substitution, name resolution, parameter typing and action detection."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from . import ast as A
from .errors import ScaleError
from .parser import parse
from .spec import MethodSpec, ParamSpec, lookup
from .tables import lookup_table

_WHOLE_PARAM = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%\Z")

BUILTIN_TABLES = ("SoftwarePerformance_Live",)  # computed when a SELECT reads them


def builtin_table(name: str) -> str | None:
    """The canonical name of a ``$name`` table (an on-demand table, or an Activity Record table
    of :mod:`quanta.scale.tables`, whose names are case-insensitive), or None."""
    if name in BUILTIN_TABLES:
        return name
    found = lookup_table(name)
    return found[0].table(found[1]) if found is not None else None


class _AnyValue:
    """Value of an instruction parameter that is not known yet (``quanta scale check``)."""

    def __repr__(self) -> str:
        return "ANY_VALUE"


ANY_VALUE = _AnyValue()


class AnyParameters(dict):
    """A parameters mapping in which every %name% has an unknown value: for checking only."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> object:
        return ANY_VALUE


@dataclass
class ActionUse:
    method: str
    line: int
    column: int


@dataclass
class Program:
    """A checked payload, ready to run."""

    source: str
    script: A.Script
    is_action: bool
    actions: list[ActionUse] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)  # every Module.Method called, in order
    predefined: frozenset[str] = frozenset()
    # Only quick method calls (see MethodSpec.quick), assignments, IF and exits: no SELECT, no
    # FOREACH. Such a payload runs in well under a millisecond and never blocks.
    quick: bool = False

    def __repr__(self) -> str:
        return f"Program(is_action={self.is_action}, methods={self.methods!r})"


def type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (bytes, bytearray)):
        return "blob"
    return type(value).__name__


def sql_literal(value: object, name: str, pos: A.Pos) -> str:
    """Render a typed instruction-parameter value as an SQL literal that cannot escape itself."""
    if value is ANY_VALUE:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ScaleError(f"Instruction parameter %{name}% is not a finite number", pos.line, pos.column)
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if value is None:
        return "NULL"
    raise ScaleError(
        f"Instruction parameter %{name}% has unsupported type {type_name(value)}", pos.line, pos.column
    )


def _param_value(parameters: dict[str, object], name: str, pos: A.Pos) -> object:
    if name not in parameters:
        raise ScaleError(f"Missing value for instruction parameter %{name}%", pos.line, pos.column)
    value = parameters[name]
    if value is ANY_VALUE:
        return value
    if isinstance(value, str) and "\x00" in value:
        raise ScaleError(f"Instruction parameter %{name}% contains a NUL character", pos.line, pos.column)
    if value is None or not isinstance(value, (str, int, float, bool)):
        raise ScaleError(
            f"Instruction parameter %{name}% has unsupported type {type_name(value)}", pos.line, pos.column
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ScaleError(f"Instruction parameter %{name}% is not a finite number", pos.line, pos.column)
    return value


def param_type_ok(spec: ParamSpec, value: object) -> bool:
    if spec.type == "string":
        return isinstance(value, str)
    if spec.type == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if spec.type == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec.type == "boolean":
        return isinstance(value, bool)
    return False  # pragma: no cover


class Checker:
    def __init__(self, parameters: dict[str, object], predefined: frozenset[str]) -> None:
        self.parameters = parameters
        self.known: set[str] = set(predefined)
        self.actions: list[ActionUse] = []
        self.methods: list[str] = []
        self.slow_calls = 0  # calls of methods not declared quick

    # substitution ------------------------------------------------------------------------
    def subst_value(self, v: A.Value) -> A.Value:
        if isinstance(v, A.ParamRef):
            return A.Literal(_param_value(self.parameters, v.name, v.pos), v.pos)
        if isinstance(v, A.Literal) and isinstance(v.value, str):
            m = _WHOLE_PARAM.match(v.value)
            if m and m.group(1) in self.parameters:
                return A.Literal(_param_value(self.parameters, m.group(1), v.pos), v.pos)
        return v

    def subst_sql(self, sel: A.Select) -> None:
        out: list[A.SqlPart] = []
        for part in sel.parts:
            if isinstance(part, A.SqlParam):
                value = _param_value(self.parameters, part.name, part.pos)
                out.append(A.SqlLiteral(sql_literal(value, part.name, part.pos)))
            elif isinstance(part, A.SqlString) and (m := _WHOLE_PARAM.match(part.value)) and m.group(1) in self.parameters:
                value = _param_value(self.parameters, m.group(1), sel.pos)
                out.append(A.SqlLiteral(sql_literal(value, m.group(1), sel.pos)))
            else:
                out.append(part)
        sel.parts = out

    # checks ------------------------------------------------------------------------------
    def use_var(self, name: str, pos: A.Pos) -> None:
        if name not in self.known:
            raise ScaleError(f"Unknown variable @{name}", pos.line, pos.column)

    def check_call(self, call: A.Call) -> MethodSpec:
        spec = lookup(call.module, call.method, call.pos.line, call.pos.column, call.method_pos.line, call.method_pos.column)
        where = f"(in call to {spec.full_name})"
        call.args = [A.Arg(a.name, self.subst_value(a.value), a.pos) for a in call.args]
        given: dict[str, A.Arg] = {}
        for arg in call.args:
            p = spec.param(arg.name)
            if p is not None:
                if p.name in given:
                    raise ScaleError(f"Duplicate parameter '{arg.name}' {where}", arg.pos.line, arg.pos.column)
                given[p.name] = arg
        for p in spec.params:
            if p.required and p.name not in given:
                raise ScaleError(f"Missing parameter '{p.name}' {where}", call.pos.line, call.pos.column)
        for arg in call.args:
            p = spec.param(arg.name)
            if p is None:
                raise ScaleError(f"Unknown parameter '{arg.name}' {where}", arg.pos.line, arg.pos.column)
            v = arg.value
            if isinstance(v, A.ColumnRef):
                self.use_var(v.var, v.pos)
            elif isinstance(v, A.Literal) and v.value is not ANY_VALUE and not param_type_ok(p, v.value):
                raise ScaleError(
                    f"Parameter '{p.name}' expects {p.type}, got {type_name(v.value)} {where}",
                    v.pos.line,
                    v.pos.column,
                )
        self.methods.append(spec.full_name)
        if not spec.quick:
            self.slow_calls += 1
        if spec.is_action:
            self.actions.append(ActionUse(spec.full_name, call.pos.line, call.pos.column))
        return spec

    def check_select(self, sel: A.Select) -> None:
        self.subst_sql(sel)
        for part in sel.parts:
            if isinstance(part, A.SqlVar):
                self.use_var(part.name, part.pos)
            elif isinstance(part, A.SqlBuiltin):
                canonical = builtin_table(part.name)
                if canonical is None:
                    raise ScaleError(f"Unknown built-in table ${part.name}", part.pos.line, part.pos.column)
                part.name = canonical

    def check_block(self, stmts: list[A.Statement]) -> None:
        for s in stmts:
            self.check_stmt(s)

    def check_stmt(self, s: A.Statement) -> None:
        if isinstance(s, A.Assign):
            v = s.value
            if isinstance(v, (A.Literal, A.ParamRef)):
                s.value = self.subst_value(v)  # type: ignore[assignment]
            else:
                self.check_stmt(v)  # type: ignore[arg-type]
            self.known.add(s.target)
        elif isinstance(s, A.Call):
            self.check_call(s)
        elif isinstance(s, A.Select):
            self.check_select(s)
        elif isinstance(s, A.Foreach):
            self.use_var(s.table_var, s.table_pos)
            self.known.add(s.row_var)
            self.check_block(s.body)
        elif isinstance(s, A.If):
            self.use_var(s.var, s.var_pos)
            self.check_block(s.then)
            if s.otherwise is not None:
                self.check_block(s.otherwise)
        elif isinstance(s, A.Exit):
            if s.var is not None and s.var_pos is not None:
                self.use_var(s.var, s.var_pos)
        elif isinstance(s, A.Evaluate):
            pass
        else:  # pragma: no cover
            raise TypeError(s)


def compile_program(
    text: str, parameters: dict[str, object] | None = None, predefined: frozenset[str] = frozenset()
) -> Program:
    if not isinstance(text, str):
        raise ScaleError("Payload must be text", 0, 0)
    script = parse(text)
    checker = Checker(parameters if parameters is not None else {}, predefined)
    checker.check_block(script.statements)
    return Program(
        source=text,
        script=script,
        is_action=bool(checker.actions),
        actions=checker.actions,
        methods=checker.methods,
        predefined=predefined,
        quick=checker.slow_calls == 0 and _straight(script.statements),
    )


def _straight(statements: list[A.Statement]) -> bool:
    """No SELECT and no FOREACH anywhere: what runs is a bounded sequence of method calls."""
    for st in statements:
        if isinstance(st, (A.Select, A.Foreach)):
            return False
        if isinstance(st, A.Assign) and isinstance(st.value, (A.Select, A.Foreach)):
            return False
        if isinstance(st, A.If) and not (_straight(st.then) and _straight(st.otherwise or [])):
            return False
    return True
