"""``quanta integrate DIR`` (the Integrate Agent) and ``quanta integrate run|list|check DIR``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

DirArg = Annotated[Path, typer.Argument(help="server data directory")]


class _DefaultServe(TyperGroup):
    """``quanta integrate DIR`` means ``quanta integrate serve DIR``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["serve", *args]
        return super().parse_args(ctx, args)


integrate_app = typer.Typer(cls=_DefaultServe, no_args_is_help=True,
                            help="Integrate Agent: import device inventory from files, SQL databases and LDAP. "
                                 "'quanta integrate DIR' runs it on the integrate port (loopback only).")


def _fail(msg: str, code: int = 2) -> None:
    print(msg, file=sys.stderr)
    raise typer.Exit(code)


@integrate_app.command("serve")
def serve(root: DirArg) -> None:
    """Run the Integrate Agent: WebSocket on the integrate port (127.0.0.1 only) and the connector schedule."""
    from quanta.cli import _run_component

    from .service import serve as serve_agent

    _run_component(serve_agent(root))


@integrate_app.command("run")
def run(root: DirArg, connector: Annotated[str, typer.Option(help="connector name from DIR/integrate.toml")],
        json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Run one connector now, through the running Integrate Agent, and print what changed."""
    from .service import Error, Result, Run, request

    try:
        reply = request(root, Run(connector))
    except (ConnectionError, FileNotFoundError) as e:
        _fail(f"error: {e}")
        return
    if isinstance(reply, Error):
        _fail(f"error: {reply.message}")
    assert isinstance(reply, Result)
    if json_output:
        import msgspec

        print(msgspec.json.encode(reply).decode())
    elif reply.ok:
        print(f"connector {reply.connector}: {reply.created} created, {reply.updated} updated, "
              f"{reply.unchanged} unchanged, {reply.removed} removed, {reply.skipped} skipped; attributes: "
              f"{reply.attributes_set} set, {reply.attributes_removed} removed ({reply.seconds}s)")
        for problem in reply.problems:
            print(f"refused: {problem}")
    if not reply.ok:
        _fail(f"error: {reply.error}", 1)


@integrate_app.command("list")
def list_(root: DirArg) -> None:
    """List configured connectors with their last run (through the running Integrate Agent)."""
    from .service import Connectors, ListConnectors, request

    try:
        reply = request(root, ListConnectors())
    except (ConnectionError, FileNotFoundError) as e:
        _fail(f"error: {e}")
        return
    assert isinstance(reply, Connectors)
    out: list[dict[str, Any]] = [dict(name=c.name, type=c.type, interval=c.interval, last_run=c.last_run)
                                 for c in reply.connectors]
    print(json.dumps({"connectors": out, "error": reply.error}, indent=1, default=str))
    if reply.error:
        raise typer.Exit(1)


@integrate_app.command("check")
def check(root: DirArg) -> None:
    """Validate DIR/integrate.toml without running anything."""
    from .config import ConfigError, config_path, load_config

    try:
        cfg = load_config(root)
    except ConfigError as e:
        _fail(f"error: {e}")
        return
    print(f"{config_path(root)}: {len(cfg.connector)} connector(s): "
          + (", ".join(f"{c.name} ({c.type})" for c in cfg.connector) or "none"))


def register(app: typer.Typer) -> None:
    app.add_typer(integrate_app, name="integrate")
