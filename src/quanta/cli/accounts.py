"""Users, roles, management groups, the audit log and SMTP settings (on the server, from its data directory)."""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from quanta.cli.common import DirArg, FormatOpt, JsonOpt, _fail, app, console, master_engine, out, output_format, print_rows


user_app = typer.Typer(help="Manage users and roles.", no_args_is_help=True)
app.add_typer(user_app, name="user")
from quanta.roles import ROLES  # noqa: E402


def _accounts(root: Path) -> Any:
    """The accounts service on this data directory's Master database."""
    from quanta.accounts import Accounts, Policy
    from quanta.cli.common import load_settings_or_fail
    from quanta.db import make_engine
    from quanta.settings import DataDir

    settings = load_settings_or_fail(root)
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


USER_COLUMNS = ("User", "Role", "Disabled", "E-mail", "Roles per set", "Groups", "Sessions", "Locked until")


def _user_rows(records: Any) -> list[list[Any]]:
    return [[u.username, u.role, "yes" if u.disabled else "", u.email,
             ", ".join(f"{r}@{s}" for r, s in u.assignments), ", ".join(u.groups), u.sessions,
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(u.locked_until)) if u.locked_until else None]
            for u in records]


@user_app.command("list")
def user_list(root: DirArg, json_output: JsonOpt = False, fmt: FormatOpt = None) -> None:
    """List users: role, roles per instruction set, groups, live sessions, locks."""
    f = output_format(fmt, json_output)
    records = _account_call(_accounts(root).list_users, _operator("user list"))
    print_rows(USER_COLUMNS, _user_rows(records), f, json_items=[u.to_dict() for u in records])


@user_app.command("show")
def user_show(root: DirArg, name: NameArg, json_output: JsonOpt = False, fmt: FormatOpt = None) -> None:
    """Show one user."""
    f = output_format(fmt, json_output)
    u = _account_call(_accounts(root).get_user, _operator("user show"), name)
    print_rows(USER_COLUMNS, _user_rows([u]), f, json_items=u.to_dict())


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
def user_locks(root: DirArg, json_output: JsonOpt = False, fmt: FormatOpt = None) -> None:
    """List live login locks (user names and source addresses)."""
    f = output_format(fmt, json_output)
    locks = _account_call(_accounts(root).list_locks, _operator("user locks"))
    print_rows(("Kind", "Subject", "Failures", "Locked until"),
               [[lk.kind, lk.subject, lk.failures, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lk.locked_until))]
                for lk in locks], f, json_items=[lk.to_dict() for lk in locks])


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
def audit_command(root: DirArg, json_output: JsonOpt = False, fmt: FormatOpt = None,
                  actor: Annotated[Optional[str], typer.Option(help="only this actor")] = None,
                  action: Annotated[Optional[str], typer.Option(help="only this action, e.g. login_failed")] = None,
                  object_: Annotated[Optional[str], typer.Option("--object", help="only this object")] = None,
                  since: Annotated[Optional[str], typer.Option(help="from: unix time, ISO 8601, or an age (2h)")] = None,
                  until: Annotated[Optional[str], typer.Option(help="before: unix time, ISO 8601, or an age")] = None,
                  limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
                  offset: Annotated[int, typer.Option(min=0, max=2**62)] = 0) -> None:
    """Read the audit log, newest first: who did what, from where, and what changed."""
    f = output_format(fmt, json_output)
    accounts = _accounts(root)
    page = _account_call(accounts.query_audit, _operator("audit"), actor=actor, action=action, object=object_,
                         since=_when(since, "--since"), until=_when(until, "--until"), limit=limit, offset=offset)
    if f == "json":
        print(json.dumps(dict(total=page.total, offset=page.offset, limit=page.limit,
                              items=[e.to_dict() for e in page.items]), default=str))
        return
    print_rows(("Time (UTC)", "Actor", "Source", "Action", "Object", "Change"),
               [[time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.at)), e.actor, e.source, e.action, e.object,
                 _change_text(e.before, e.after, e.details)] for e in page.items], f)
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

    from quanta import secretbox
    from quanta.coordinator import load_smtp, save_smtp
    from quanta.db import store

    master = master_engine(root)
    try:
        cfg = load_smtp(master)
    except secretbox.SecretBoxError as e:
        if password_file is None:
            _fail(f"error: the stored SMTP password cannot be read: {e}; set it again with --password-file", 2)
            return
        cfg = load_smtp(master, password=False)  # it is being replaced: the old one need not be read
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
        try:
            save_smtp(master, cfg)
        except ValueError as e:  # a password longer than a stored secret may be
            _fail(f"error: {e}", 2)
            return
        store.audit(master, "quanta smtp", "smtp_change", cfg.host, fields=sorted(changes))  # never the password
    shown = dataclasses.asdict(cfg) | {"password": "***" if cfg.password else None}
    out.print(json.dumps(shown), highlight=False)



role_app = typer.Typer(help="Roles per instruction set.", no_args_is_help=True)
app.add_typer(role_app, name="role")


@role_app.command("assign")
def role_assign(root: DirArg, username: Annotated[str, typer.Option()], role: Annotated[str, typer.Option()],
                instruction_set: Annotated[str, typer.Option(help="an instruction set, or * for all")] = "*") -> None:
    """Give a user a role for one instruction set (or all)."""
    from quanta import rbac
    from quanta.db import store

    master = master_engine(root)
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
    from quanta.db import store

    master = master_engine(root)
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
              tag: Annotated[Optional[list[str]], typer.Option(
                  help="NAME=VALUE tag every member has (a device reports its own tags: it can claim one)")] = None,
              attribute: Annotated[Optional[list[str]], typer.Option(
                  help="NAME=VALUE server-assigned attribute every member has (only an administrator sets "
                       "them: PUT /Consumer/Devices/ID/Attributes)")] = None) -> None:
    """Create or replace a management group's rule."""
    from quanta import rbac
    from quanta.db import store

    def pairs(option: str, items: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                _fail(f"{option} {item!r}: write NAME=VALUE", 2)
            out[key.strip()] = value
        return out

    rule: dict[str, Any] = {}
    if device:
        rule["devices"] = device
    if os_like:
        rule["os_like"] = os_like
    if tag:
        rule["tags"] = pairs("--tag", tag)
    if attribute:
        rule["attributes"] = pairs("--attribute", attribute)
    if not rule:
        _fail("a group needs at least one of --device, --os-like, --tag, --attribute", 2)
    master = master_engine(root)
    try:
        rbac.set_group(master, name, rule)
    except ValueError as e:
        _fail(f"error: {e}", 2)
    store.audit(master, "quanta group set", "group_set", name, rule=rule)
    out.print(f"group {name}: {json.dumps(rule)}", highlight=False)


@group_app.command("add-member")
def group_add_member(root: DirArg, name: Annotated[str, typer.Option()],
                     username: Annotated[str, typer.Option()]) -> None:
    """Limit a user to the devices of this group (and any other groups they are in)."""
    from quanta import rbac
    from quanta.db import store

    master = master_engine(root)
    try:
        rbac.add_member(master, username, name)
    except ValueError as e:
        _fail(f"error: {e}", 2)
    store.audit(master, "quanta group add-member", "group_member", name, username=username)
    out.print(f"{username} now reaches the devices of group {name}", highlight=False)


