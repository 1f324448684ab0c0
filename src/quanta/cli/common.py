"""What every command group of ``quanta`` shares: the typer app, consoles, one-line errors, tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Iterable, Optional, Sequence

import typer
from rich.console import Console

from quanta.ask import cell, write_csv  # noqa: F401 - how a value prints in a table or CSV: one definition

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Quanta: ask every device a question and get the answers in seconds.")
console = Console(stderr=True, soft_wrap=True)
out = Console()

DirArg = Annotated[Path, typer.Argument(help="server data directory")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON (same as --format json)")]
FormatOpt = Annotated[Optional[str], typer.Option("--format", help="table, csv or json")]
FORMATS = ("table", "csv", "json")


def fail(msg: str, code: int = 1) -> None:
    """One red line on stderr, then exit ``code`` (never a traceback)."""
    console.print(f"[red]{msg}[/red]", highlight=False)
    raise typer.Exit(code)


_fail = fail  # the name older command modules (quanta.catalog.cli, quanta.integrate.cli) know


def output_format(fmt: Optional[str], json_output: bool = False) -> str:
    if json_output:
        return "json"
    fmt = (fmt or "table").lower()
    if fmt not in FORMATS:
        fail(f"error: --format {fmt!r}: give one of {', '.join(FORMATS)}", 2)
    return fmt


def load_settings_or_fail(root: Path) -> Any:
    """The settings of a server data directory, or one clear line and exit 2."""
    from quanta.settings import load_settings

    root = Path(root)
    if not root.is_dir():
        fail(f"error: {root} is not a directory: give a server data directory (made by 'quanta init')", 2)
    try:
        return load_settings(root)
    except FileNotFoundError:
        fail(f"error: {root} is not a Quanta data directory (no quanta.toml): run 'quanta init {root}' first", 2)
    except (ValueError, OSError) as e:
        fail(f"error: {root}/quanta.toml: {e}", 2)


def master_engine(root: Path) -> Any:
    from quanta.db import make_engine
    from quanta.settings import DataDir

    return make_engine(DataDir(root).master_url(load_settings_or_fail(root)))


def run_component(coro: Any) -> None:
    from quanta.internal import MissingCredential
    from quanta.runtime import PortError, run

    try:
        result = run(coro)
    except PortError as e:
        print(str(e), file=sys.stderr)
        raise typer.Exit(e.exit_code) from None
    except (FileNotFoundError, MissingCredential) as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    if isinstance(result, int) and result:
        raise typer.Exit(result)


_run_component = run_component  # quanta.catalog.cli and quanta.integrate.cli import this name


def print_rows(columns: Sequence[str], rows: Iterable[Sequence[Any]], fmt: str = "table",
               json_items: Any = None, title: str | None = None) -> None:
    """Print a table that fits the terminal (long cells wrap; very long ones are cut in the
    middle so both ends stay readable), or CSV, or JSON (``json_items`` if given, else one object
    per row)."""
    rows = list(rows)
    if fmt == "json":
        items = json_items if json_items is not None else [dict(zip(columns, r)) for r in rows]
        print(json.dumps(items, default=str))
        return
    if fmt == "csv":
        write_csv(columns, rows)
        return
    from quanta.ask import rich_table

    out.print(rich_table(columns, rows, out.width, title=title))
