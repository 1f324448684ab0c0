"""The ``quanta`` command."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from quanta.runtime import PortError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Quanta: ask every device a question and get the answers in seconds.")
console = Console(stderr=True)
out = Console()

DirArg = Annotated[Path, typer.Argument(help="server data directory")]


def _fail(msg: str, code: int = 1) -> None:
    console.print(f"[red]{msg}[/red]", highlight=False)
    raise typer.Exit(code)


def _run_component(coro: Any) -> None:
    from quanta.runtime import run

    try:
        result = run(coro)
    except PortError as e:
        print(str(e), file=sys.stderr)
        raise typer.Exit(e.exit_code) from None
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    if isinstance(result, int) and result:
        raise typer.Exit(result)


# ------------------------------------------------------------------------------------ init
def _resolvable(name: str) -> bool:
    try:
        socket.getaddrinfo(name, None)
        return True
    except OSError:
        return False


@app.command()
def init(
    root: DirArg,
    https_port: Annotated[Optional[int], typer.Option(help="web tier HTTPS port (HTTPSIISPORT)")] = None,
    switch_port: Annotated[Optional[int], typer.Option(help="first Switch client port; poke = +1")] = None,
    port: Annotated[Optional[list[str]], typer.Option(help="NAME=NUMBER for any other port (repeatable)")] = None,
    database_url: Annotated[Optional[str], typer.Option(help="PostgreSQL URL; default: SQLite files in DIR")] = None,
    responses_database_url: Annotated[Optional[str], typer.Option(help="separate Responses database URL")] = None,
    server_name: Annotated[Optional[str], typer.Option(help="name agents and browsers use for this server")] = None,
    switches: Annotated[int, typer.Option(min=1, max=64, help="Switch processes under the Switch Host")] = 1,
    force: Annotated[bool, typer.Option(help="overwrite an existing data directory")] = False,
) -> None:
    """Create a server data directory: settings, PKI, databases, SwitchConfiguration, admin."""
    from quanta import settings as st
    from quanta.accounts import hash_password
    from quanta.roles import FULL_ADMIN as ADMIN_ROLE
    from quanta.db import make_engine, migrate, store
    from quanta.db.tables import users
    from quanta.pki import Pki

    dd = st.DataDir(root)
    if dd.config.exists() and not force:
        _fail(f"{dd.config} exists: this directory is already initialised (use --force to start over)", 2)
    ports = st.default_ports()
    for item in port or []:
        name, sep, number = item.partition("=")
        if not sep or not number.strip().isdigit():
            _fail(f"--port expects NAME=NUMBER, got {item!r}", 2)
        ports[name.strip()] = int(number)
    if https_port is not None:
        ports["https"] = https_port
    if switch_port is not None:
        ports["switch"] = switch_port
    name = server_name or socket.getfqdn()
    if not _resolvable(name):
        console.print(f"warning: {name!r} does not resolve here; using 'localhost' (set --server-name)")
        name = "localhost"
    try:
        settings = st.Settings(server_name=name, ports=ports, database_url=database_url,
                               responses_database_url=responses_database_url, switches=switches)
    except ValueError as e:
        _fail(f"invalid settings: {e}", 2)
    if force and dd.root.exists():
        for sub in ("pki", "run", "content"):
            shutil.rmtree(dd.root / sub, ignore_errors=True)
        for f in (dd.master_db, dd.responses_db, dd.admin_credentials):
            for suffix in ("", "-wal", "-shm"):
                Path(str(f) + suffix).unlink(missing_ok=True)
    dd.create_private()  # 0700, and every file init creates 0600 (databases, keys, secrets)
    st.save_settings(root, settings)
    pki = Pki(dd.pki)
    pki.create(name)
    dd.secret_file.write_text(st.new_internal_secret())
    os.chmod(dd.secret_file, 0o600)
    migrate(dd.master_url(settings), "master")
    migrate(dd.responses_url(settings), "responses")
    master = make_engine(dd.master_url(settings))
    store.set_switches(master, name, settings.ports["switch"], switches)
    from quanta.coordinator import SmtpConfig, save_smtp

    save_smtp(master, SmtpConfig(enabled=True, host="localhost", port=settings.port("smtp"), username=None,
                                 password=None, starttls=False, from_addr=f"quanta@{name}",
                                 require_approval_code=False))
    password = secrets.token_urlsafe(18)
    with master.begin() as c:
        c.execute(users.delete().where(users.c.username == "admin"))
        c.execute(users.insert().values(username="admin", password_hash=hash_password(password), role=ADMIN_ROLE,
                                        created_at=time.time(), password_changed_at=time.time()))
    # a key for this Master's own use of the co-located Catalog (software normalisation)
    from quanta.catalog.app import KEY_FILE
    from quanta.catalog.db import catalog_db_url, open_catalog
    from quanta.catalog.store import add_key

    fd = os.open(dd.root / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(add_key(open_catalog(catalog_db_url(dd.root, settings)), "master") + "\n")
    fd = os.open(dd.admin_credentials, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"username=admin\npassword={password}\n")
    store.audit(master, "quanta init", "init", str(dd.root), ports=settings.ports, switches=switches)
    out.print(f"initialised {dd.root}: server name {name}, https {settings.port('https')}, "
              f"switch {settings.port('switch')} (poke {settings.port('poke')}), "
              f"database {'SQLite files' if not database_url else 'PostgreSQL'}; "
              f"administrator credentials in {dd.admin_credentials}", highlight=False)


@app.command()
def demo(root: Annotated[Path, typer.Argument(help="data directory to create or reuse")] = Path("quanta-data"),
         keep_running: Annotated[bool, typer.Option(help="leave the server running after the answer")] = False) -> None:
    """Start a single server (SQLite) with a local agent and answer a real question."""
    from quanta.demo import run_demo

    raise typer.Exit(run_demo(root, keep_running))


# ------------------------------------------------------------------------------- components
@app.command()
def server(root: DirArg) -> None:
    """Run a whole single server: Core, Switch Host, Coordinator, web tier and HTTP tier, each its own process."""
    from quanta.settings import DataDir, load_settings
    from quanta.supervisor import Child, Supervisor, quanta_argv

    from quanta.runtime import setup_logging

    settings = load_settings(root)
    setup_logging("server", settings.log_level)
    import logging

    log = logging.getLogger("quanta.server")
    r = str(DataDir(root).root)
    by_role = {  # DESIGN §2 topologies: which components run on this host
        "single": ("core", "switch-host", "coordinator", "web", "http", "integrate"),
        "master": ("coordinator", "web", "http", "hub", "integrate"),
        "response": ("core", "switch-host", "web", "hub-client"),
        "dmz": ("switch-host", "web", "hub-client"),
    }
    children = [Child(name, quanta_argv(name, r)) for name in by_role[settings.role]]
    log.info("%s server: %s", settings.role, ", ".join(c.name for c in children))
    log.info("ports: https %s:%d (Consumer API, Background), http %d (CRL), switch wss %s:%d + poke %d, "
             "core ws %s:%d, coordinator https %d", settings.bind_host, settings.port("https"), settings.port("http"),
             settings.bind_host, settings.port("switch"), settings.port("poke"), settings.internal_host,
             settings.port("core"), settings.port("coordinator"))
    _run_component(Supervisor(children).run())


@app.command()
def core(root: DirArg) -> None:
    """Run the Core (internal endpoint on the core port)."""
    from quanta.core.app import serve

    _run_component(serve(root))


@app.command()
def switch(root: DirArg, name: Annotated[str, typer.Option(help="the Switch's SwitchConfiguration Name")] = "switch-1") -> None:
    """Run one Switch process."""
    from quanta.switch.main import serve

    _run_component(serve(root, name))


@app.command("switch-host")
def switch_host(root: DirArg) -> None:
    """Run every enabled Switch of SwitchConfiguration, restarting any that die."""
    from quanta.runtime import setup_logging
    from quanta.settings import load_settings
    from quanta.switch_host import serve

    setup_logging("switch-host", load_settings(root).log_level)
    _run_component(serve(root))


@app.command()
def coordinator(root: DirArg) -> None:
    """Run the Coordinator (approvals, schedules, email) on the coordinator port."""
    from quanta.coordinator.app import serve

    _run_component(serve(root))


@app.command()
def hub(root: DirArg) -> None:
    """Run the Master hub (remote Response Stacks and DMZ servers register here)."""
    from quanta.hub import serve_hub

    _run_component(serve_hub(root))


@app.command("hub-client")
def hub_client(root: DirArg) -> None:
    """On a Response Stack or DMZ server: stay registered with the Master hub, keep the CRL current."""
    from quanta.hub import run_client

    _run_component(run_client(root))


host_app = typer.Typer(help="Remote hosts: Response Stacks and DMZ servers.", no_args_is_help=True)
app.add_typer(host_app, name="host")


@host_app.command("export")
def host_export(master_root: Annotated[Path, typer.Argument(help="the Master's data directory")],
                role: Annotated[str, typer.Option(help="response or dmz")],
                server_name: Annotated[str, typer.Option(help="the remote host's name (its certificate's name)")],
                out_dir: Annotated[Path, typer.Option("--out", help="data directory to write for that host")],
                https_port: Annotated[int, typer.Option()] = 443,
                switch_port: Annotated[int, typer.Option()] = 4000,
                switches: Annotated[int, typer.Option(min=1, max=64)] = 1,
                port: Annotated[Optional[list[str]], typer.Option(help="NAME=NUMBER for any other port")] = None,
                response_url: Annotated[Optional[str], typer.Option(help="dmz: https://<response stack>:<port>")] = None) -> None:
    """Write the data directory of a remote Response Stack or DMZ server, and tell the Master."""
    from quanta.db import make_engine, store
    from quanta.settings import DataDir, load_settings
    from quanta.topology import TopologyError, export_host

    extra = {}
    for item in port or []:
        name, _, number = item.partition("=")
        extra[name] = int(number)
    try:
        s = export_host(master_root, out_dir, role=role, server_name=server_name, https_port=https_port,
                        switch_port=switch_port, switches=switches, ports=extra, response_url=response_url)
    except (TopologyError, ValueError) as e:
        _fail(f"error: {e}", 2)
        return
    master = make_engine(DataDir(master_root).master_url(load_settings(master_root)))
    store.audit(master, "quanta host export", "host_export", server_name, role=role)
    out.print(f"wrote {out_dir} for {role} host {server_name} (https {s.port('https')}, switch {s.port('switch')}, "
              f"poke {s.port('poke')}); copy it there and run 'quanta server {out_dir}'", highlight=False)


@app.command()
def web(root: DirArg) -> None:
    """Run the web tier (Consumer API) on the HTTPS port."""
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


# ---------------------------------------------------------------------------- enrol/revoke
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
    from cryptography import x509

    from quanta.agent.config import interaction_name, write_conf
    from quanta.db import make_engine, store
    from quanta.pki import Pki, Purpose
    from quanta.settings import DataDir, load_settings

    if not device or any(ch in device for ch in "/\\\x00") or len(device) > 255:
        _fail(f"invalid device name {device!r}", 2)
    settings = load_settings(root)
    dd = DataDir(root)
    pki = Pki(dd.pki)
    master = make_engine(dd.master_url(settings))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _fail(f"cannot create the agent directory {out_dir}: {e}; nothing was enrolled", 2)
    # The serials are recorded (and the old certificates revoked) before any certificate exists, so
    # no certificate is ever valid without the Master knowing it belongs to this device.
    device_serial, interaction_serial = x509.random_serial_number(), x509.random_serial_number()
    try:
        superseded = store.register_device(master, device, format(device_serial, "x"), format(interaction_serial, "x"),
                                           replace=replace, before_commit=pki.revoke_many)
    except store.DeviceAlreadyEnrolled:
        _fail(f"device {device!r} is already enrolled; nothing was changed. To issue it new certificates, run "
              f"'quanta enroll {root} --device {device} --out AGENTDIR --replace' (this revokes every certificate "
              f"issued to it before); to retire it, 'quanta revoke {root} --device {device}'", 2)
    try:
        pki.issue(device, out_dir / "device.crt", out_dir / "device.key", serial=device_serial)
        pki.issue(interaction_name(device), out_dir / "interaction.crt", out_dir / "interaction.key",
                  purpose=Purpose.INTERACTION, san=[interaction_name(device)], serial=interaction_serial)
        shutil.copy(pki.ca_crt, out_dir / "ca.crt")
        shutil.copy(pki.signing_pub, out_dir / "signing.pub")
    except OSError as e:
        _fail(f"cannot write the agent directory {out_dir}: {e}; {device!r} is enrolled without usable "
              f"certificates: run again with --replace", 1)
    rows = store.switch_rows(master)
    host = switch_host or settings.server_name
    switches = switch or ",".join(f"{switch_host or r['Host']}:{r['Port']}" for r in rows if r["Enabled"]) \
        or f"{host}:{settings.port('switch')}"
    write_conf(out_dir, device_name=device, switches=switches,
               background_url=background_url or f"https://{host}:{settings.port('https')}/Background",
               interaction_port=settings.port("interaction"))
    store.audit(master, "quanta enroll", "re-enroll" if superseded else "enroll", device,
                serial=format(device_serial, "x"), interaction_serial=format(interaction_serial, "x"),
                revoked=sorted(superseded))
    again = f", {len(superseded)} earlier certificates revoked" if replace else ""
    out.print(f"enrolled {device}: agent directory {out_dir} (Switch={switches}{again})", highlight=False)


@app.command()
def revoke(root: DirArg, device: Annotated[str, typer.Option(help="device name")]) -> None:
    """Revoke a device: every certificate issued to it. Running Switches drop it within seconds."""
    from quanta.db import make_engine, store
    from quanta.pki import Pki
    from quanta.settings import DataDir, load_settings

    settings = load_settings(root)
    dd = DataDir(root)
    master = make_engine(dd.master_url(settings))
    serials = store.mark_revoked(master, device, before_commit=Pki(dd.pki).revoke_many)
    if serials is None:
        _fail(f"no enrolled device named {device!r}", 2)
        return
    store.audit(master, "quanta revoke", "revoke", device, serials=serials)
    out.print(f"revoked {device} ({len(serials)} certificates: serials {', '.join(serials)})", highlight=False)


# ---------------------------------------------------------------------------------- client
@app.command()
def ask(root: DirArg, payload: Annotated[Optional[str], typer.Argument(help="SCALE text (or use --definition)")] = None,
        definition: Annotated[Optional[str], typer.Option(help="issue an imported instruction definition")] = None,
        device: Annotated[Optional[list[str]], typer.Option(help="target device (repeatable); default all")] = None,
        wait: Annotated[float, typer.Option(min=1, help="gather window and how long to wait, seconds")] = 60,
        param: Annotated[Optional[list[str]], typer.Option(help="NAME=VALUE instruction parameter")] = None,
        json_output: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False) -> None:
    """Ask a question and show the answers."""
    from quanta.ask import run

    raise typer.Exit(run(root, payload, definition, device, wait, param, json_output))


UserOpt = Annotated[Optional[str], typer.Option("--user", help="act as this user (default: the administrator)")]
PasswordOpt = Annotated[Optional[Path], typer.Option("--password-file", help="file holding the user's password "
                                                                         "(or set QUANTA_PASSWORD)")]


def _as_user(root: Path, user: str | None, password_file: Path | None):  # type: ignore[no-untyped-def]
    from quanta.client import ConsumerClient

    if user is None:
        return ConsumerClient.for_data_dir(root)
    pw = password_file.read_text().strip() if password_file else os.environ.get("QUANTA_PASSWORD", "")
    return ConsumerClient.for_data_dir(root, user, pw)


def _decide(root: Path, iid: int, verb: str, user: str | None, password_file: Path | None, **kw: Any) -> None:
    from quanta.client import ApiError

    try:
        with _as_user(root, user, password_file) as api:
            result = api.decide(iid, verb, **kw)
    except ApiError as e:
        _fail(f"error: {e}", 2)
        return
    out.print(json.dumps(result), highlight=False)


@app.command()
def approve(root: DirArg, instruction_id: int, user: UserOpt = None, password_file: PasswordOpt = None,
            code: Annotated[Optional[str], typer.Option(help="one-time code from the approval email")] = None,
            reason: Optional[str] = None) -> None:
    """Approve someone else's action instruction."""
    _decide(root, instruction_id, "Approve", user, password_file, code=code, reason=reason)


@app.command()
def reject(root: DirArg, instruction_id: int, reason: Annotated[str, typer.Option(help="why")],
           user: UserOpt = None, password_file: PasswordOpt = None) -> None:
    """Reject someone else's action instruction."""
    _decide(root, instruction_id, "Reject", user, password_file, reason=reason)


@app.command()
def cancel(root: DirArg, instruction_id: int, user: UserOpt = None, password_file: PasswordOpt = None) -> None:
    """Cancel an instruction that waits for approval, is scheduled, or is still gathering."""
    from quanta.client import ApiError

    try:
        with _as_user(root, user, password_file) as api:
            result = api._call("POST", f"/Consumer/Instructions/{instruction_id}/Cancel")
    except ApiError as e:
        _fail(f"error: {e}", 2)
        return
    out.print(json.dumps(result), highlight=False)


@app.command("approval-code")
def approval_code(root: DirArg, instruction_id: int, user: UserOpt = None, password_file: PasswordOpt = None) -> None:
    """Email yourself a one-time code for approving an instruction."""
    _decide(root, instruction_id, "ApprovalCode", user, password_file)


user_app = typer.Typer(help="Manage users and roles.", no_args_is_help=True)
app.add_typer(user_app, name="user")
from quanta.roles import ROLES  # noqa: E402


def _accounts(root: Path) -> Any:
    """The accounts service on this data directory's Master database."""
    from quanta.accounts import Accounts, Policy
    from quanta.db import make_engine
    from quanta.settings import DataDir, load_settings

    try:
        settings = load_settings(root)
    except (FileNotFoundError, ValueError) as e:
        _fail(f"error: {e}", 2)
    return Accounts(make_engine(DataDir(root).master_url(settings)), Policy.from_settings(settings))


def _operator(command: str) -> Any:
    """The actor of a CLI change: the command, from the local account that ran it."""
    import getpass

    from quanta.accounts import Actor

    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = str(os.getuid())
    return Actor.local(f"quanta {command}", source=f"cli:{who}")


def _account_call(fn: Any, *args: Any, **kw: Any) -> Any:
    """Run an accounts call; a refusal is a clear message and exit code 2 (never a traceback)."""
    from quanta.accounts import AccountError

    try:
        return fn(*args, **kw)
    except AccountError as e:
        _fail(f"error: {e}", 2)


def _new_password(password_file: Optional[Path], generate: bool = False) -> tuple[str, bool]:
    """A new password from a file, or a prompt (twice), or generated. Never from the command line."""
    if password_file is not None:
        try:
            return password_file.read_text().strip(), False
        except (OSError, UnicodeDecodeError) as e:
            _fail(f"error: cannot read {password_file}: {e}", 2)
    if generate:
        return secrets.token_urlsafe(15), True
    if not sys.stdin.isatty():
        _fail("error: give --password-file FILE or --generate (no terminal to prompt on)", 2)
    import getpass

    first = getpass.getpass("New password: ")
    if getpass.getpass("Again: ") != first:
        _fail("error: the passwords differ", 2)
    return first, False


NameArg = Annotated[str, typer.Argument(help="user name")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


@user_app.command("add")
def user_add(root: DirArg, username: Annotated[str, typer.Option()], role: Annotated[str, typer.Option(help=", ".join(ROLES))],
             email: Annotated[Optional[str], typer.Option()] = None,
             password_file: Annotated[Optional[Path], typer.Option(help="file with the password; default: generate")] = None) -> None:
    """Add a user (prints a generated password unless --password-file is given)."""
    if role not in ROLES:
        _fail(f"unknown role {role!r}; roles: {', '.join(ROLES)}", 2)
    accounts = _accounts(root)
    password, generated = _new_password(password_file, generate=password_file is None)
    _account_call(accounts.create_user, _operator("user add"), username, password, role, email=email)
    out.print(f"added {username} ({role})" + (f"; password: {password}" if generated else ""), highlight=False)


def _user_rows(records: Any) -> Table:
    table = Table("User", "Role", "Disabled", "E-mail", "Roles per set", "Groups", "Sessions", "Locked until")
    for u in records:
        table.add_row(u.username, u.role, "yes" if u.disabled else "", u.email or "",
                      ", ".join(f"{r}@{s}" for r, s in u.assignments), ", ".join(u.groups), str(u.sessions),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(u.locked_until)) if u.locked_until else "")
    return table


@user_app.command("list")
def user_list(root: DirArg, json_output: JsonOpt = False) -> None:
    """List users: role, roles per instruction set, groups, live sessions, locks."""
    records = _account_call(_accounts(root).list_users, _operator("user list"))
    if json_output:
        print(json.dumps([u.to_dict() for u in records]))
        return
    out.print(_user_rows(records))


@user_app.command("show")
def user_show(root: DirArg, name: NameArg, json_output: JsonOpt = False) -> None:
    """Show one user."""
    u = _account_call(_accounts(root).get_user, _operator("user show"), name)
    if json_output:
        print(json.dumps(u.to_dict()))
        return
    out.print(_user_rows([u]))


def _set_disabled(root: Path, name: str, disabled: bool) -> None:
    verb = "disable" if disabled else "enable"
    _account_call(_accounts(root).update_user, _operator(f"user {verb}"), name, disabled=disabled)
    out.print(f"{name} {verb}d" + ("; every session of the user has ended" if disabled else ""), highlight=False)


@user_app.command("disable")
def user_disable(root: DirArg, name: NameArg) -> None:
    """Disable a user: every session ends at once, and logins are refused."""
    _set_disabled(root, name, True)


@user_app.command("enable")
def user_enable(root: DirArg, name: NameArg) -> None:
    """Enable a disabled user."""
    _set_disabled(root, name, False)


@user_app.command("delete")
def user_delete(root: DirArg, name: NameArg,
                yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False) -> None:
    """Delete a user, its sessions, roles and group memberships (the audit log keeps its history)."""
    accounts = _accounts(root)
    if not yes and not typer.confirm(f"delete user {name!r}?", default=False):
        _fail("not deleted", 1)
    _account_call(accounts.delete_user, _operator("user delete"), name)
    out.print(f"deleted {name}", highlight=False)


@user_app.command("set-role")
def user_set_role(root: DirArg, name: NameArg, role: Annotated[str, typer.Argument(help=", ".join(ROLES))],
                  instruction_set: Annotated[Optional[str], typer.Option(
                      help="give the role for this instruction set (or *) instead of as the global role")] = None,
                  remove: Annotated[bool, typer.Option("--remove", help="take that instruction-set role away")] = False) -> None:
    """Set a user's global role, or add (--instruction-set) or remove (--remove) a role for an instruction set."""
    accounts = _accounts(root)
    actor = _operator("user set-role")
    if instruction_set is None:
        if remove:
            _fail("error: --remove needs --instruction-set (a user always has a global role)", 2)
        _account_call(accounts.update_user, actor, name, role=role)
        out.print(f"{name} is {role}", highlight=False)
        return
    current = _account_call(accounts.get_user, actor, name)
    pairs = set(current.assignments)
    pairs = pairs - {(role, instruction_set)} if remove else pairs | {(role, instruction_set)}
    _account_call(accounts.update_user, actor, name, assignments=sorted(pairs))
    out.print(f"{name} {'is no longer' if remove else 'is'} {role} for {instruction_set}", highlight=False)


@user_app.command("reset-password")
def user_reset_password(root: DirArg, name: NameArg,
                        password_file: Annotated[Optional[Path], typer.Option(help="file with the new password")] = None,
                        generate: Annotated[bool, typer.Option("--generate", help="generate one and print it")] = False) -> None:
    """Set a new password for a user (from a file, a prompt, or generated); ends all of its sessions."""
    accounts = _accounts(root)
    password, generated = _new_password(password_file, generate)
    n = _account_call(accounts.reset_password, _operator("user reset-password"), name, password)
    out.print(f"password of {name} reset; {n} session(s) ended" + (f"; password: {password}" if generated else ""),
              highlight=False)


@user_app.command("unlock")
def user_unlock(root: DirArg, name: Annotated[str, typer.Argument(help="user name (or, with --source, an address)")],
                source: Annotated[bool, typer.Option("--source", help="NAME is a source address")] = False) -> None:
    """Lift a login lock on a user (or a source address) and forget its failed logins."""
    live = _account_call(_accounts(root).unlock, _operator("user unlock"), name, "source" if source else "user")
    out.print(f"{'unlocked' if live else 'was not locked; failed logins forgotten:'} {name}", highlight=False)


@user_app.command("locks")
def user_locks(root: DirArg, json_output: JsonOpt = False) -> None:
    """List live login locks (user names and source addresses)."""
    locks = _account_call(_accounts(root).list_locks, _operator("user locks"))
    if json_output:
        print(json.dumps([lk.to_dict() for lk in locks]))
        return
    table = Table("Kind", "Subject", "Failures", "Locked until")
    for lk in locks:
        table.add_row(lk.kind, lk.subject, str(lk.failures),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lk.locked_until)))
    out.print(table)


@user_app.command("sign-out")
def user_sign_out(root: DirArg, name: NameArg) -> None:
    """End every session of a user now."""
    n = _account_call(_accounts(root).end_sessions, _operator("user sign-out"), name)
    out.print(f"{n} session(s) of {name} ended", highlight=False)


def _when(value: Optional[str], option: str) -> Optional[float]:
    """A time: unix seconds, ISO 8601 (UTC unless it says otherwise), or an age such as 30m, 2h, 7d."""
    import datetime as dt
    import re

    if value is None:
        return None
    v = value.strip()
    m = re.fullmatch(r"(\d{1,9})([smhd])", v)
    if m:
        return time.time() - int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if re.fullmatch(r"\d{1,12}(\.\d+)?", v):
        return float(v)
    try:
        t = dt.datetime.fromisoformat(v)
    except ValueError:
        _fail(f"error: {option} {value!r}: give unix seconds, an ISO 8601 time, or an age like 30m, 2h, 7d", 2)
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()


def _change_text(before: Any, after: Any, details: dict[str, Any]) -> str:
    """What changed, briefly: ``key: old -> new`` for the keys that differ (or the details)."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = [k for k in {**before, **after} if before.get(k) != after.get(k)]
        return "; ".join(f"{k}: {json.dumps(before.get(k))} -> {json.dumps(after.get(k))}" for k in keys)
    if before is not None or after is not None:
        return json.dumps({"before": before, "after": after}, default=str)
    return json.dumps(details, default=str) if details else ""


@app.command("audit")
def audit_command(root: DirArg, json_output: JsonOpt = False,
                  actor: Annotated[Optional[str], typer.Option(help="only this actor")] = None,
                  action: Annotated[Optional[str], typer.Option(help="only this action, e.g. login_failed")] = None,
                  object_: Annotated[Optional[str], typer.Option("--object", help="only this object")] = None,
                  since: Annotated[Optional[str], typer.Option(help="from: unix time, ISO 8601, or an age (2h)")] = None,
                  until: Annotated[Optional[str], typer.Option(help="before: unix time, ISO 8601, or an age")] = None,
                  limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
                  offset: Annotated[int, typer.Option(min=0, max=2**62)] = 0) -> None:
    """Read the audit log, newest first: who did what, from where, and what changed."""
    accounts = _accounts(root)
    page = _account_call(accounts.query_audit, _operator("audit"), actor=actor, action=action, object=object_,
                         since=_when(since, "--since"), until=_when(until, "--until"), limit=limit, offset=offset)
    if json_output:
        print(json.dumps(dict(total=page.total, offset=page.offset, limit=page.limit,
                              items=[e.to_dict() for e in page.items]), default=str))
        return
    table = Table("Time (UTC)", "Actor", "Source", "Action", "Object", "Change")
    for e in page.items:
        table.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.at)), e.actor, e.source, e.action, e.object,
                      _change_text(e.before, e.after, e.details))
    out.print(table)
    console.print(f"{len(page.items)} of {page.total} row(s) from offset {page.offset}", highlight=False)


@app.command()
def smtp(root: DirArg, host: Annotated[Optional[str], typer.Option()] = None,
         port: Annotated[Optional[int], typer.Option()] = None,
         username: Annotated[Optional[str], typer.Option(help="SMTP login (anonymous if unset)")] = None,
         password_file: Annotated[Optional[Path], typer.Option()] = None,
         starttls: Annotated[Optional[bool], typer.Option("--starttls/--no-starttls")] = None,
         from_addr: Annotated[Optional[str], typer.Option("--from")] = None,
         require_approval_code: Annotated[Optional[bool], typer.Option("--require-approval-code/--no-approval-code")] = None,
         enabled: Annotated[Optional[bool], typer.Option("--enable/--disable")] = None) -> None:
    """Show or change how the Coordinator sends email (anonymous on port 25 by default)."""
    import dataclasses

    from quanta.coordinator import load_smtp, save_smtp
    from quanta.db import make_engine, store
    from quanta.settings import DataDir, load_settings

    master = make_engine(DataDir(root).master_url(load_settings(root)))
    cfg = load_smtp(master)
    if cfg is None:
        _fail("no SMTP settings row; run quanta init", 2)
        return
    changes = {k: v for k, v in dict(host=host, port=port, username=username, starttls=starttls, from_addr=from_addr,
                                     require_approval_code=require_approval_code, enabled=enabled).items()
               if v is not None}
    if password_file is not None:
        changes["password"] = password_file.read_text().strip()
    if changes:
        cfg = dataclasses.replace(cfg, **changes)
        save_smtp(master, cfg)
        store.audit(master, "quanta smtp", "smtp_change", cfg.host, fields=sorted(changes))  # never the password
    shown = dataclasses.asdict(cfg) | {"password": "***" if cfg.password else None}
    out.print(json.dumps(shown), highlight=False)


pack_app = typer.Typer(help="Signed product packs of instruction definitions.", no_args_is_help=True)
app.add_typer(pack_app, name="pack")


@pack_app.command("keygen")
def pack_keygen(name: Annotated[str, typer.Option(help="publisher name")],
                out_dir: Annotated[Path, typer.Option("--out")] = Path(".")) -> None:
    """Create a publisher key pair (NAME.key stays with the publisher; NAME.pub goes to servers)."""
    from quanta.definitions import keygen

    priv, pub = keygen(out_dir, name)
    out.print(f"wrote {priv} (keep it secret) and {pub}", highlight=False)


@pack_app.command("build")
def pack_build(source: Path, key: Annotated[Path, typer.Option(help="publisher private key")],
               out_file: Annotated[Path, typer.Option("--out")]) -> None:
    """Sign a pack directory (pack.toml, definitions/, resources/) into a zip."""
    from quanta.definitions import PackError, build

    try:
        build(source, key, out_file)
    except PackError as e:
        _fail(f"error: {e}", 2)
    out.print(f"signed pack written to {out_file}", highlight=False)


@pack_app.command("trust")
def pack_trust(root: DirArg, name: Annotated[str, typer.Option(help="publisher name")],
               key: Annotated[Path, typer.Option(help="publisher public key (PEM)")]) -> None:
    """Trust a publisher: packs it signs may be imported."""
    from quanta.db import make_engine, store
    from quanta.definitions import PackError, trust
    from quanta.settings import DataDir, load_settings

    master = make_engine(DataDir(root).master_url(load_settings(root)))
    try:
        trust(master, name, key.read_bytes())
    except (PackError, ValueError) as e:
        _fail(f"error: {e}", 2)
    store.audit(master, "quanta pack trust", "publisher_trust", name)
    out.print(f"trusting publisher {name}", highlight=False)


@pack_app.command("import")
def pack_import(root: DirArg, pack_file: Path) -> None:
    """Verify and import a signed pack (all or nothing)."""
    from quanta.background import ContentStore
    from quanta.db import make_engine, store
    from quanta.definitions import PackError, import_pack
    from quanta.settings import DataDir, load_settings

    dd = DataDir(root)
    master = make_engine(dd.master_url(load_settings(root)))
    try:
        pack = import_pack(master, pack_file.read_bytes(), ContentStore(dd.content))
    except PackError as e:
        store.audit(master, "quanta pack import", "pack_refused", str(pack_file), reason=str(e))
        _fail(f"pack refused: {e}", 2)
        return
    store.audit(master, "quanta pack import", "pack_import", pack.info.name, version=pack.info.version,
                publisher=pack.info.publisher)
    out.print(f"imported {pack.info.name} {pack.info.version} from {pack.info.publisher}: "
              f"{', '.join(d.name for d in pack.definitions)}", highlight=False)


role_app = typer.Typer(help="Roles per instruction set.", no_args_is_help=True)
app.add_typer(role_app, name="role")


@role_app.command("assign")
def role_assign(root: DirArg, username: Annotated[str, typer.Option()], role: Annotated[str, typer.Option()],
                instruction_set: Annotated[str, typer.Option(help="an instruction set, or * for all")] = "*") -> None:
    """Give a user a role for one instruction set (or all)."""
    from quanta import rbac
    from quanta.db import make_engine, store
    from quanta.settings import DataDir, load_settings

    master = make_engine(DataDir(root).master_url(load_settings(root)))
    try:
        rbac.assign(master, username, role, instruction_set)
    except ValueError as e:
        _fail(f"error: {e}", 2)
    store.audit(master, "quanta role assign", "role_assign", username, role=role, instruction_set=instruction_set)
    out.print(f"{username} is {role} for {instruction_set}", highlight=False)


@role_app.command("approvers")
def role_approvers(root: DirArg, instruction_set: Annotated[str, typer.Option(help="an instruction set, or * for the default")] = "*",
                   required: Annotated[Optional[int], typer.Option(help="distinct approvers (never the requester) an action needs")] = None) -> None:
    """Show or set how many people must approve an action of an instruction set (default 1)."""
    from quanta import instructions as ins
    from quanta.coordinator.service import show_approvers_required
    from quanta.db import make_engine, store
    from quanta.settings import DataDir, load_settings

    master = make_engine(DataDir(root).master_url(load_settings(root)))
    if required is not None:
        try:
            before = ins.set_approvers_required(master, instruction_set, required)
        except ValueError as e:
            _fail(f"error: {e}", 2)
        store.audit(master, "quanta role approvers", "approvers_required", instruction_set, before=before, after=required)
    out.print(json.dumps(show_approvers_required(master, instruction_set)), highlight=False)


group_app = typer.Typer(help="Management groups: which devices a user may reach.", no_args_is_help=True)
app.add_typer(group_app, name="group")


@group_app.command("set")
def group_set(root: DirArg, name: Annotated[str, typer.Option()],
              device: Annotated[Optional[list[str]], typer.Option(help="member device (repeatable)")] = None,
              os_like: Annotated[Optional[str], typer.Option(help="OS glob, e.g. 'linux*'")] = None,
              tag: Annotated[Optional[list[str]], typer.Option(help="NAME=VALUE tag every member has")] = None) -> None:
    """Create or replace a management group's rule."""
    from quanta import rbac
    from quanta.db import make_engine, store
    from quanta.settings import DataDir, load_settings

    rule: dict[str, Any] = {}
    if device:
        rule["devices"] = device
    if os_like:
        rule["os_like"] = os_like
    if tag:
        rule["tags"] = dict(t.split("=", 1) for t in tag)
    if not rule:
        _fail("a group needs at least one of --device, --os-like, --tag", 2)
    master = make_engine(DataDir(root).master_url(load_settings(root)))
    rbac.set_group(master, name, rule)
    store.audit(master, "quanta group set", "group_set", name, rule=rule)
    out.print(f"group {name}: {json.dumps(rule)}", highlight=False)


@group_app.command("add-member")
def group_add_member(root: DirArg, name: Annotated[str, typer.Option()],
                     username: Annotated[str, typer.Option()]) -> None:
    """Limit a user to the devices of this group (and any other groups they are in)."""
    from quanta import rbac
    from quanta.db import make_engine, store
    from quanta.settings import DataDir, load_settings

    master = make_engine(DataDir(root).master_url(load_settings(root)))
    try:
        rbac.add_member(master, username, name)
    except ValueError as e:
        _fail(f"error: {e}", 2)
    store.audit(master, "quanta group add-member", "group_member", name, username=username)
    out.print(f"{username} now reaches the devices of group {name}", highlight=False)


@app.command()
def devices(root: DirArg, json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List devices known to the server."""
    from quanta.client import ApiError, ConsumerClient

    try:
        with ConsumerClient.for_data_dir(root) as api:
            rows = api.devices()
    except ApiError as e:
        _fail(f"error: {e}", 2)
        return
    if json_output:
        print(json.dumps(rows))
        return
    table = Table("Device", "Online", "OS", "FQDN", "Switch", "Agent", "Revoked")
    for d in rows:
        table.add_row(d["device_id"], "yes" if d["online"] else "no", d["os"], d["fqdn"], d["switch"] or "",
                      d["agent_version"], "yes" if d["revoked"] else "")
    out.print(table)


# Sub-commands that live with their components. Each module has ``register(app)``.
COMMAND_MODULES = ("quanta.ports.cli", "quanta.simulate.cli", "quanta.catalog.cli", "quanta.integrate.cli")


def _register_component_commands() -> None:
    import importlib
    import importlib.util

    from quanta.scale.cli import app as scale_app
    from quanta.scale.cli import methods_command

    app.add_typer(scale_app, name="scale", help="Author and run SCALE payloads locally (no server).")

    @app.command()
    def methods(json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
        """Print the SCALE method reference."""
        methods_command(json_output)

    for name in COMMAND_MODULES:
        package = name.rsplit(".", 1)[0]
        # a component not installed is skipped; one that is installed but broken fails loudly
        if importlib.util.find_spec(package) is not None and importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(app)


_register_component_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
