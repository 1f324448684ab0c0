"""Local authoring commands: ``quanta scale run|check`` and ``quanta methods``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table as RichTable

from .compiler import AnyParameters
from . import AgentContext, Limits, Program, ScaleError, compile_scale, method_reference, run_program

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Author and run SCALE payloads locally.")

DEFAULT_DATA_DIR = Path("~/.quanta-agent")


def parse_param(text: str) -> tuple[str, object]:
    """``NAME=VALUE``: VALUE becomes an int, a float, a boolean (true/false) or else a string."""
    if "=" not in text:
        raise typer.BadParameter(f"expected NAME=VALUE, got {text!r}")
    name, raw = text.split("=", 1)
    name = name.strip()
    if not name:
        raise typer.BadParameter(f"expected NAME=VALUE, got {text!r}")
    value: object = raw
    low = raw.lower()
    if low in ("true", "false"):
        value = low == "true"
    else:
        try:
            value = int(raw)
        except ValueError:
            try:
                f = float(raw)
                if f == f and f not in (float("inf"), float("-inf")):
                    value = f
            except ValueError:
                pass
    return name, value


def _read_source(file: str) -> str:
    if file == "-":
        return sys.stdin.read()
    try:
        return Path(file).read_text(encoding="utf-8")
    except OSError as e:
        raise typer.BadParameter(f"cannot read {file}: {e}") from None


def _print_error(console: Console, err: ScaleError) -> None:
    console.print(f"[bold red]error:[/] {err}", highlight=False, markup=True)


@app.command("run")
def run_command(
    file: str = typer.Argument(..., help="payload file, or - for standard input"),
    param: list[str] = typer.Option([], "--param", "-p", help="instruction parameter NAME=VALUE (repeatable)"),
    allow_actions: bool = typer.Option(False, "--allow-actions", help="allow action methods (they change this device)"),
    json_output: bool = typer.Option(False, "--json", help="print the result as JSON"),
    data_dir: Path = typer.Option(DEFAULT_DATA_DIR, "--data-dir", help="agent data directory (tags live here)"),
    timeout: float = typer.Option(60.0, "--timeout", help="time limit in seconds"),
    max_rows: int = typer.Option(100_000, "--max-rows", help="row limit"),
) -> None:
    """Run a payload on this machine, with no server. Exit code 0 only for success."""
    source = _read_source(file)
    params = dict(parse_param(p) for p in param)
    console = Console(stderr=False)
    try:
        program = compile_scale(source, params)
    except ScaleError as e:
        from .evaluator import RunResult

        result = RunResult("error", [], [], e)
    else:
        ctx = AgentContext(data_dir=data_dir.expanduser(), executable=sys.executable)
        result = run_program(program, context=ctx, limits=Limits(timeout_seconds=timeout, max_rows=max_rows), allow_actions=allow_actions)
    if json_output:
        typer.echo(json.dumps(result.to_json(), ensure_ascii=False, default=str))
    else:
        if result.error is not None:
            _print_error(console, result.error)
        if result.columns:
            table = RichTable(*result.columns, title=f"{result.status} - {len(result.rows)} row(s)")
            for row in result.rows:
                table.add_row(*("" if v is None else str(v) for v in row))
            console.print(table)
        else:
            console.print(f"{result.status} - {len(result.rows)} row(s)")
    raise typer.Exit(0 if result.status == "success" else 1)


def check_source(source: str) -> Program:
    """Compile a payload as ``quanta scale check`` and ``POST /Consumer/Scale/Check`` do: any
    instruction parameter is accepted, and the columns read from the Activity Record tables
    (``$Process_Live`` etc.) are checked against their declaration. Raises :class:`ScaleError`."""
    from .tablecheck import check_activity_columns

    program = compile_scale(source, AnyParameters())
    check_activity_columns(program)
    return program


@app.command("check")
def check_command(file: str = typer.Argument(..., help="payload file, or - for standard input")) -> None:
    """Compile a payload and report the first error with its line and column."""
    source = _read_source(file)
    console = Console()
    try:
        program = check_source(source)
    except ScaleError as e:
        _print_error(console, e)
        raise typer.Exit(1) from None
    kind = "action" if program.is_action else "question"
    console.print(f"ok: {kind}" + (f" (calls {', '.join(a.method for a in program.actions)})" if program.is_action else ""))


def methods_json() -> list[dict[str, object]]:
    """The method reference as JSON values: what ``quanta methods --json`` prints and
    ``GET /Consumer/Methods`` answers (one source: the method declarations)."""
    return [
        {
            "module": s.module, "name": s.name, "description": s.description, "is_action": s.is_action,
            "platforms": list(s.platforms), "dynamic_columns": s.dynamic_columns,
            "params": [{"name": p.name, "type": p.type, "required": p.required, "default": p.default,
                        "aliases": list(p.aliases), "description": p.description} for p in s.params],
            "columns": [{"name": c.name, "type": c.type, "description": c.description} for c in s.columns],
        }
        for s in method_reference()
    ]


def methods_command(json_output: bool = False) -> None:
    """Print the method reference (``quanta methods``)."""
    if json_output:
        typer.echo(json.dumps(methods_json(), indent=2))
        return
    specs = method_reference()
    console = Console()
    table = RichTable("Method", "Kind", "Parameters", "Columns", "Platforms")
    for s in specs:
        params = ", ".join(f"{p.name}{'' if p.required else '?'}: {p.type}" for p in s.params)
        cols = ", ".join(c.name for c in s.columns)
        table.add_row(s.full_name, "action" if s.is_action else "question", params, cols, ", ".join(s.platforms))
    console.print(table)
    console.print(activity_tables_table())


def activity_tables_table() -> RichTable:
    """The Activity Record tables and their columns (``quanta methods``), from the same
    declarations as docs/scale.md and ``quanta scale check`` (:mod:`quanta.scale.tables`)."""
    from .tables import GRANULARITIES, SOURCES

    table = RichTable("Activity Record table", "Columns", "Against the model's documentation",
                      title="Activity Record tables (SELECT ... FROM $Name; docs/scale.md)")
    for src in SOURCES:
        for g in GRANULARITIES:
            cols = ", ".join(c.name + ("" if g != "Live" or c.model else " (Quanta)") for c in src.columns(g))
            table.add_row("$" + src.table(g), cols, src.documented if g == "Live" else "as the live table")
    return table
