"""``quanta ports``, ``quanta preflight`` and ``quanta http``: registered by quanta.cli."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

HOST_NAMES = ("server", "master", "response", "dmz", "catalog")


def _host_for(topology: str, host: str | None) -> str:
    from . import model as m

    if host is None:
        return m.host_of_role(topology, "master") if topology != "single-server" else m.SERVER
    if host == "server":
        if topology != "single-server":
            raise ValueError("--host server is the single-server host; use master, response, dmz or catalog")
        return m.SERVER
    return m.host_of_role(topology, host)


def register(app: typer.Typer) -> None:
    @app.command()
    def ports(
        root: Annotated[Optional[Path], typer.Argument(help="server data directory; default: the default settings")] = None,
        topology: Annotated[str, typer.Option(help="single-server | remote-response-stack | dmz | remote-catalog")]
        = "single-server",
        fmt: Annotated[str, typer.Option("--format", help="markdown | csv | json | nftables")] = "markdown",
        internal: Annotated[bool, typer.Option("--internal", help="list the flows inside one host instead")] = False,
        host: Annotated[Optional[str], typer.Option(help="nftables: the host to make rules for (server, master, "
                                                         "response, dmz, catalog)")] = None,
        write_docs: Annotated[bool, typer.Option("--write-docs", help="regenerate docs/ports.md and exit")] = False,
    ) -> None:
        """Print the firewall requirements of a topology, from the live configuration."""
        from . import render
        from .model import TOPOLOGIES, build_table, internal_rows, load_live

        if write_docs:
            from .docs import write

            print(f"wrote {write()}")
            return
        if topology not in TOPOLOGIES:
            _fail(f"unknown topology {topology!r}; choose one of {', '.join(TOPOLOGIES)}")
        if fmt not in ("markdown", "csv", "json", "nftables"):
            _fail(f"unknown format {fmt!r}; choose markdown, csv, json or nftables")
        if host is not None and host not in HOST_NAMES:
            _fail(f"unknown host {host!r}; choose one of {', '.join(HOST_NAMES)}")
        try:
            cfg = load_live(root)
        except FileNotFoundError as e:
            _fail(f"error: {e}")
        rows = internal_rows(cfg, topology) if internal else build_table(cfg, topology)
        if fmt == "nftables":
            if internal:
                _fail("--internal flows stay on one host: there is no nftables rule to make for them")
            try:
                device = _host_for(topology, host)
                text = render.nftables(rows, device, topology)
            except ValueError as e:
                _fail(f"error: {e}")
        elif fmt == "json":
            text = render.to_json(rows)
        elif fmt == "csv":
            text = render.to_csv(rows)
        else:
            text = render.markdown(rows)
        sys.stdout.write(text)

    @app.command()
    def preflight(
        root: Annotated[Path, typer.Argument(help="server data directory, or (role agent) an agent directory")],
        role: Annotated[str, typer.Option(help="master | response | dmz | catalog | agent")],
        topology: Annotated[str, typer.Option(help="topology the role is part of")] = "single-server",
        peer: Annotated[Optional[list[str]], typer.Option(help="ROLE=HOST of another host (master, response, dmz, "
                                                               "catalog, smtp); repeatable")] = None,
        timeout: Annotated[float, typer.Option(min=0.2, max=60, help="seconds allowed per connection stage")] = 3.0,
        json_output: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    ) -> None:
        """Check, from this host, every flow the role needs; exit 1 on any failure."""
        from .preflight import ROLES, failed, run_preflight

        if role not in ROLES:
            _fail(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
        peers: dict[str, str] = {}
        for item in peer or []:
            k, sep, v = item.partition("=")
            if not sep or not v:
                _fail(f"--peer expects ROLE=HOST, got {item!r}")
            peers[k.strip()] = v.strip()
        try:
            checks = run_preflight(root, role, topology, peers, timeout)
        except (FileNotFoundError, ValueError) as e:
            _fail(f"error: {e}")
        except Exception as e:  # agent config errors and the like: say what is wrong, no traceback
            from quanta.agent.config import AgentConfigError

            if isinstance(e, AgentConfigError):
                _fail(f"error: {e}")
            raise
        bad = failed(checks)
        if json_output:
            print(json.dumps({"role": role, "topology": topology, "directory": str(root), "ok": not bad,
                              "checks": [c.as_json() for c in checks]}, indent=1))
        else:
            from rich.console import Console
            from rich.table import Table

            table = Table("Check", "Direction", "Target", "Result", "Detail", "Hint", title=f"preflight: {role}")
            colour = {"pass": "green", "fail": "red", "skip": "yellow"}
            for c in checks:
                table.add_row(c.name, c.direction, c.target, f"[{colour[c.status]}]{c.status}[/]", c.detail, c.hint)
            Console(width=200).print(table)
            n_fail = sum(c.status == "fail" for c in checks)
            print(f"{len(checks)} checks: {sum(c.status == 'pass' for c in checks)} passed, {n_fail} failed, "
                  f"{sum(c.status == 'skip' for c in checks)} skipped")
        raise typer.Exit(1 if bad else 0)

    @app.command()
    def http(root: Annotated[Path, typer.Argument(help="server data directory")]) -> None:
        """Run the HTTP tier (CRL distribution point, later the Catalog) on the http port."""
        from quanta.cli import _run_component
        from quanta.http_tier import serve

        _run_component(serve(root))


def _fail(msg: str) -> None:
    print(msg, file=sys.stderr)
    raise typer.Exit(2)
