"""``quanta host export``: the data directory of a remote Response Stack or DMZ server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from quanta.cli.common import app, console, fail, load_settings_or_fail, out

host_app = typer.Typer(help="Remote hosts: Response Stacks and DMZ servers.", no_args_is_help=True)
app.add_typer(host_app, name="host")


@host_app.command("export")
def host_export(master_root: Annotated[Path, typer.Argument(help="the Master's data directory")],
                role: Annotated[str, typer.Option(help="response or dmz")],
                server_name: Annotated[str, typer.Option(help="the remote host's name (its certificate's name)")],
                out_dir: Annotated[Path, typer.Option("--out", help="data directory to write for that host")],
                https_port: Annotated[int, typer.Option(min=1, max=65535)] = 443,
                switch_port: Annotated[int, typer.Option(min=1, max=65534)] = 4000,
                switches: Annotated[int, typer.Option(min=1, max=64)] = 1,
                port: Annotated[Optional[list[str]], typer.Option(help="NAME=NUMBER for any other port")] = None,
                response_url: Annotated[Optional[str], typer.Option(help="dmz: https://<response stack>:<port>")] = None,
                update_master: Annotated[bool, typer.Option(
                    "--update-master", help="also change the Master as listed (its SwitchConfiguration and "
                                            "quanta.toml); without it the Master is left as it is")] = False,
                dry_run: Annotated[bool, typer.Option("--dry-run", help="print what would change; write nothing")] = False,
                replace: Annotated[bool, typer.Option(
                    "--replace", help="this export replaces an earlier host of the same name exported to "
                                      "another directory")] = False) -> None:
    """Write the data directory of a remote Response Stack or DMZ server; with --update-master, tell the Master.

    The changes are printed first. On a single server, --update-master makes it a Master: it stops
    running its own Core and Switches (its own Switch rows are removed), so its agents go offline
    until they dial the remote host's Switches."""
    from quanta.db import store
    from quanta.provisioning import ProvisioningError, parse_ports
    from quanta.topology import TopologyError, apply_export, plan_export

    load_settings_or_fail(master_root)
    try:
        extra = parse_ports(port)
        plan = plan_export(master_root, out_dir, role=role, server_name=server_name, https_port=https_port,
                           switch_port=switch_port, switches=switches, ports=extra, response_url=response_url,
                           replace=replace)
    except (TopologyError, ProvisioningError, ValueError) as e:
        fail(f"error: {e}", 2)
        return
    lines = plan.describe()
    for line in lines:
        master_line = line.startswith("master:")
        prefix = "would " if dry_run or (master_line and not update_master) else ""
        console.print(f"  {prefix}{line}", highlight=False)
    if dry_run:
        out.print("dry run: nothing was written", highlight=False)
        return
    try:
        apply_export(plan, update=update_master)
    except (TopologyError, OSError, ValueError) as e:
        fail(f"error: {e}", 2)
        return
    from quanta.cli.common import master_engine

    store.audit(master_engine(master_root), "quanta host export", "host_export", server_name, role=role,
                master_updated=update_master, changes=[x for x in lines if x.startswith("master:")] if update_master else [])
    s = plan.settings
    out.print(f"wrote {out_dir} for {role} host {server_name} (https {s.port('https')}, switch {s.port('switch')}, "
              f"poke {s.port('poke')}); copy it there and run 'quanta server {out_dir}'", highlight=False)
    if update_master:
        out.print(f"updated the Master {master_root} as listed; restart it ('quanta server {master_root}')",
                  highlight=False)
    elif any(x.startswith("master:") for x in lines):
        out.print(f"the Master {master_root} was NOT changed; to make these changes run the same command with "
                  "--update-master", highlight=False)
