"""The server's components (each its own process), the agent, the user prompt, the demo, and their
systemd units."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from quanta.cli.common import DirArg, _fail, _run_component, app, fail, load_settings_or_fail, out

LogFormatOpt = Annotated[Optional[str], typer.Option(
    "--log-format", help="text or json (one object a line); sets QUANTA_LOG_FORMAT for this process and its "
                         "children, over log_format in quanta.toml")]


def _prepare(root: Path, log_format: Optional[str]) -> Any:
    """Check the data directory (one line and exit 2 if it is not one) and apply --log-format;
    the settings."""
    from quanta.runtime import LOG_FORMAT_ENV, LOG_FORMATS

    if log_format is not None:
        if log_format not in LOG_FORMATS:
            fail(f"error: --log-format {log_format!r}: give one of {', '.join(LOG_FORMATS)}", 2)
        os.environ[LOG_FORMAT_ENV] = log_format
    return load_settings_or_fail(root)


@app.command()
def server(root: DirArg, log_format: LogFormatOpt = None) -> None:
    """Run a whole single server: Core, Switch Host, Coordinator, web tier and HTTP tier, each its own process."""
    import logging

    from quanta.runtime import configure_logging
    from quanta.settings import DataDir
    from quanta.status import ROLE_COMPONENTS, SERVER, StatusRecord, status_path
    from quanta.supervisor import Child, Supervisor, quanta_argv

    settings = _prepare(root, log_format)
    configure_logging("server", settings)
    log = logging.getLogger("quanta.server")
    r = str(DataDir(root).root)
    children = [Child(name, quanta_argv(name, r)) for name in ROLE_COMPONENTS[settings.role]]
    log.info("%s server: %s", settings.role, ", ".join(c.name for c in children))
    log.info("ports: https %s:%d (Consumer API, Background), http %d (CRL), switches on %s: %s, "
             "core ws %s:%d, coordinator https %d", settings.bind_host, settings.port("https"), settings.port("http"),
             settings.bind_host, _switch_summary(root, settings), settings.internal_host,
             settings.port("core"), settings.port("coordinator"))
    _run_component(Supervisor(children, status=StatusRecord(status_path(root, SERVER), SERVER)).run())


def _switch_summary(root: Path, settings: Any) -> str:
    """Every Switch of SwitchConfiguration this host runs: ``name:port (poke port)``."""
    from quanta.db import make_engine, store
    from quanta.settings import DataDir

    if settings.local_switches:  # a DMZ server has no database: its Switches are in its settings
        mine = list(settings.local_switches)
    elif settings.role == "master":
        return "none (the Response Stacks run them)"
    else:
        try:
            rows = store.switch_rows(make_engine(DataDir(root).master_url(settings)))
        except Exception as e:  # noqa: BLE001 - the database may be down; the Core reports that on its own
            return f"(SwitchConfiguration not readable: {type(e).__name__})"
        mine = [r for r in rows if r["Host"] == settings.server_name]
    parts = [f"{r['Name']}:{r['Port']} (poke {int(r['Port']) + 1}){'' if r.get('Enabled', True) else ' disabled'}"
             for r in mine]
    return ", ".join(parts) or "none"


@app.command()
def demo(root: Annotated[Path, typer.Argument(help="data directory to create or reuse")] = Path("quanta-data"),
         keep_running: Annotated[bool, typer.Option(help="leave the server running after the answer")] = False) -> None:
    """Start a single server (SQLite) with a local agent and answer a real question."""
    from quanta.demo import run_demo

    raise typer.Exit(run_demo(root, keep_running))


@app.command()
def core(root: DirArg, log_format: LogFormatOpt = None) -> None:
    """Run the Core (internal endpoint on the core port)."""
    _prepare(root, log_format)
    from quanta.core.app import serve

    _run_component(serve(root))


@app.command()
def switch(root: DirArg, log_format: LogFormatOpt = None, name: Annotated[str, typer.Option(help="the Switch's SwitchConfiguration Name")] = "switch-1") -> None:
    """Run one Switch process."""
    _prepare(root, log_format)
    from quanta.switch.main import serve

    _run_component(serve(root, name))


@app.command("switch-host")
def switch_host(root: DirArg, log_format: LogFormatOpt = None) -> None:
    """Run every enabled Switch of SwitchConfiguration, restarting any that die."""
    from quanta.runtime import configure_logging
    from quanta.switch_host import serve

    configure_logging("switch-host", _prepare(root, log_format))
    _run_component(serve(root))


@app.command()
def coordinator(root: DirArg, log_format: LogFormatOpt = None) -> None:
    """Run the Coordinator (approvals, schedules, email) on the coordinator port."""
    _prepare(root, log_format)
    from quanta.coordinator.app import serve

    _run_component(serve(root))


@app.command()
def hub(root: DirArg, log_format: LogFormatOpt = None) -> None:
    """Run the Master hub (remote Response Stacks and DMZ servers register here)."""
    _prepare(root, log_format)
    from quanta.hub import serve_hub

    _run_component(serve_hub(root))


@app.command("hub-client")
def hub_client(root: DirArg, log_format: LogFormatOpt = None) -> None:
    """On a Response Stack or DMZ server: stay registered with the Master hub, keep the CRL current."""
    _prepare(root, log_format)
    from quanta.hub import run_client

    _run_component(run_client(root))


@app.command()
def web(root: DirArg, log_format: LogFormatOpt = None) -> None:
    """Run the web tier (Consumer API) on the HTTPS port."""
    _prepare(root, log_format)
    from quanta.web import serve

    _run_component(serve(root))


@app.command()
def agent(agent_dir: Annotated[Path, typer.Argument(help="agent directory from 'quanta enroll'")],
          log_level: str = "INFO") -> None:
    """Run an agent."""
    from quanta.agent.config import AgentConfigError
    from quanta.agent.main import serve

    try:
        _run_component(serve(agent_dir, log_level))
    except AgentConfigError as e:
        _fail(f"error: {e}", 2)


@app.command("agent-storage")
def agent_storage(
        agent_dir: Annotated[Path, typer.Argument(help="the agent directory on this device")],
        adopt: Annotated[Optional[str], typer.Option(
            "--adopt", help="give the tables of this earlier agent's owner (as listed, legacy:NAME or NAME) to --to")] = None,
        to: Annotated[Optional[str], typer.Option(
            "--to", help="the owner to give them to, as listed (e.g. pack:Quanta-Inventory@<fingerprint>)")] = None,
        drop: Annotated[Optional[str], typer.Option("--drop", help="delete the tables of this earlier agent's owner")] = None,
) -> None:
    """List the owners of this agent's Storage.* tables; adopt or drop those an earlier agent stored
    under an instruction name's prefix (legacy:NAME), which no instruction reaches."""
    from quanta.scale.methods import storage as st

    state = agent_dir / "state"
    if not (agent_dir / "agent.conf").is_file():
        fail(f"error: {agent_dir} is not an agent directory (no agent.conf)", 2)
    if (adopt is None) != (to is None):
        fail("error: --adopt and --to go together", 2)
    if adopt is not None and drop is not None:
        fail("error: give --adopt or --drop, not both", 2)
    try:
        if adopt is not None:
            moved, left = st.adopt_legacy(state, adopt, to or "")
            typer.echo(f"{moved} table(s) given to {to}" + (f"; left (the owner has a table of that name): "
                                                           f"{', '.join(left)}" if left else ""))
            return
        if drop is not None:
            out.print(f"{st.drop_legacy(state, drop)} table(s) deleted", highlight=False)
            return
        rows = st.owners(state)
    except st.StorageAdminError as e:
        fail(f"error: {e}", 1)
        return
    if not rows:
        out.print("no storage tables", highlight=False)
        return
    for owner, n, nrows, nbytes in rows:
        note = "  (earlier agent's owner: no instruction reaches it)" if owner.startswith(st.LEGACY) else ""
        typer.echo(f"{owner}\t{n} table(s)\t{nrows} row(s)\t{nbytes} bytes{note}")


@app.command()
def prompt(agent_dir: Annotated[Path, typer.Argument(help="the agent directory on this device")],
           answer: Annotated[Optional[str], typer.Option(help="answer every prompt with Yes or No (no questions asked)")] = None,
           once: Annotated[bool, typer.Option(help="exit after the first prompt")] = False) -> None:
    """The user session's client of the agent's interaction port: show prompts, send answers."""
    import asyncio

    from quanta.agent.config import load_agent_config
    from quanta.agent.interaction import prompt_client

    cfg = load_agent_config(agent_dir)
    if answer is not None and answer not in ("Yes", "No"):
        _fail("--answer must be Yes or No", 2)

    def decide(p) -> str:  # type: ignore[no-untyped-def]
        out.print(f"[bold]{p.title}[/bold]: {p.description}", highlight=False)
        if p.kind == "announcement":
            return "Acknowledged"
        if answer is not None:
            return answer
        return "Yes" if typer.confirm("Answer yes?", default=False) else "No"

    try:
        n = asyncio.run(prompt_client(cfg.state, cfg.ca, cfg.device_name, cfg.interaction_port, decide, once))
    except OSError as e:
        _fail(f"cannot reach the agent's interaction port {cfg.interaction_port}: {e}", 2)
        return
    out.print(f"answered {n} prompt(s)", highlight=False)



@app.command()
def systemd(root: DirArg,
            agent: Annotated[Optional[Path], typer.Option("--agent", help="also write the unit of this agent directory")] = None,
            out_dir: Annotated[Path, typer.Option("--out", help="directory to write the unit files to")] = Path("."),
            user: Annotated[Optional[str], typer.Option(help="account the server runs as; default: the data directory's owner")] = None,
            after_postgresql: Annotated[bool, typer.Option(help="order the server after postgresql.service")] = False) -> None:
    """Write systemd unit files for this server (and an agent), and print how to enable them."""
    from quanta.deploy import agent_unit, server_unit

    load_settings_or_fail(root)
    if agent is not None and not (agent / "agent.conf").is_file():
        fail(f"error: {agent} is not an agent directory (no agent.conf; 'quanta enroll' writes one)", 2)
    exe = Path(shutil.which("quanta") or Path(sys.executable).with_name("quanta")).resolve()
    try:
        units = [server_unit(root, exe, user, after_postgresql)] + ([agent_unit(agent, exe)] if agent else [])
    except ValueError as e:
        fail(f"error: {e}", 2)
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for u in units:
            (out_dir / u.name).write_text(u.text)
    except OSError as e:
        fail(f"error: cannot write to {out_dir}: {e}", 2)
    names = " ".join(u.name for u in units)
    for u in units:
        out.print(f"wrote {(out_dir / u.name).resolve()}", highlight=False)
    out.print("to install and start them (as root):\n"
              f"  cp {' '.join(str((out_dir / u.name).resolve()) for u in units)} /etc/systemd/system/\n"
              "  systemctl daemon-reload\n"
              f"  systemctl enable --now {names}", highlight=False)
