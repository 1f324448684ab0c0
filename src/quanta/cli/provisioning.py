"""``quanta init``, ``quanta enroll``, ``quanta revoke``: the commands (the work is in :mod:`quanta.provisioning`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from quanta.cli.common import DirArg, app, console, fail, load_settings_or_fail, out
from quanta.settings import SETTABLE_PORTS


@app.command()
def init(
    root: DirArg,
    https_port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="web tier HTTPS port (HTTPSIISPORT)")] = None,
    switch_port: Annotated[Optional[int], typer.Option(min=1, max=65534, help="first Switch client port; poke = +1")] = None,
    port: Annotated[Optional[list[str]], typer.Option(
        help=f"NAME=NUMBER for any port (repeatable); NAME is one of {', '.join(SETTABLE_PORTS)} "
             "(poke is always switch + 1)")] = None,
    database_url: Annotated[Optional[str], typer.Option(help="PostgreSQL URL; default: SQLite files in DIR")] = None,
    responses_database_url: Annotated[Optional[str], typer.Option(help="separate Responses database URL")] = None,
    server_name: Annotated[Optional[str], typer.Option(help="name agents and browsers use for this server")] = None,
    switches: Annotated[int, typer.Option(min=1, max=64, help="Switch processes under the Switch Host")] = 1,
    force: Annotated[bool, typer.Option(help="overwrite an existing data directory")] = False,
) -> None:
    """Create a server data directory: settings, PKI, databases, SwitchConfiguration, admin."""
    from quanta.provisioning import ProvisioningError, init_server, parse_ports

    try:
        ports = parse_ports(port)
        if https_port is not None:
            ports["https"] = https_port
        if switch_port is not None:
            ports["switch"] = switch_port
        r = init_server(root, ports=ports, database_url=database_url, responses_database_url=responses_database_url,
                        server_name=server_name, switches=switches, force=force)
    except ProvisioningError as e:
        fail(f"error: {e}", e.code)
        return
    except OSError as e:
        fail(f"error: cannot write {root}: {e}", 2)
        return
    for w in r.warnings:
        console.print(f"warning: {w}", highlight=False)
    s = r.settings
    out.print(f"initialised {r.root}: server name {s.server_name}, https {s.port('https')}, "
              f"switch {s.port('switch')} (poke {s.port('poke')}), "
              f"database {'SQLite files' if not database_url else 'PostgreSQL'}; "
              f"administrator credentials in {r.admin_credentials}", highlight=False)


@app.command()
def enroll(root: DirArg, device: Annotated[str, typer.Option(help="device name (certificate CN)")],
           out_dir: Annotated[Path, typer.Option("--out", help="agent directory to write")],
           switch_host: Annotated[Optional[str], typer.Option(help="host agents dial; default: server name")] = None,
           switch: Annotated[Optional[str], typer.Option(help="Switch=host:port[,host:port] for the agent (e.g. a DMZ Switch)")] = None,
           background_url: Annotated[Optional[str], typer.Option(help="BackgroundChannelUrl for the agent")] = None,
           replace: Annotated[bool, typer.Option("--replace", help="re-enrol an enrolled device: revoke every "
                                                 "certificate issued to it and issue new ones")] = False) -> None:
    """Issue a device certificate and an interaction-port certificate and write an agent directory.

    A name that is already enrolled (revoked or not) is refused unless --replace, which revokes all
    its earlier certificates (the CRL is rewritten; running Switches drop them within seconds)."""
    from quanta.provisioning import ProvisioningError, check_device_name, enroll_device

    try:
        check_device_name(device)
        load_settings_or_fail(root)
        r = enroll_device(root, device, out_dir, switch_host=switch_host, switch=switch,
                          background_url=background_url, replace=replace)
    except ProvisioningError as e:
        fail(f"error: {e}", e.code)
        return
    again = f", {len(r.superseded)} earlier certificates revoked" if replace else ""
    out.print(f"enrolled {device}: agent directory {out_dir} (Switch={r.switches}{again})", highlight=False)


@app.command()
def revoke(root: DirArg, device: Annotated[str, typer.Option(help="device name")]) -> None:
    """Revoke a device: every certificate issued to it. Running Switches drop it within seconds."""
    from quanta.provisioning import ProvisioningError, revoke_device

    load_settings_or_fail(root)
    try:
        serials = revoke_device(root, device)
    except ProvisioningError as e:
        fail(f"error: {e}", e.code)
        return
    out.print(f"revoked {device} ({len(serials)} certificates: serials {', '.join(serials)})", highlight=False)
