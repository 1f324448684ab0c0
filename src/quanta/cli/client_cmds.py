"""Client commands: they talk to the Consumer API, from the server (its data directory) or from a
workstation (a profile stored by ``quanta login``)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

from quanta.cli.common import FormatOpt, JsonOpt, app, console, fail, out, output_format, print_rows

ProfileOpt = Annotated[Optional[str], typer.Option("--profile", help="login profile from 'quanta login' "
                                                   "(instead of a data directory; default: the default profile)")]
UserOpt = Annotated[Optional[str], typer.Option("--user", help="with DIR: act as this user (default: the administrator)")]
PasswordOpt = Annotated[Optional[Path], typer.Option("--password-file", help="file holding the user's password "
                                                                         "(or set QUANTA_PASSWORD)")]
MaybeDir = Annotated[Optional[Path], typer.Argument(help="server data directory (or use --profile)")]


# ------------------------------------------------------------------------------ connecting
def _connect(root: Optional[Path], profile: Optional[str], user: Optional[str] = None,
             password_file: Optional[Path] = None) -> Any:
    from quanta.client import ApiError, ConsumerClient, read_password_file

    if root is not None and profile is not None:
        fail("error: give a data directory or --profile, not both", 2)
    try:
        if root is None:
            if user is not None:
                fail("error: --user goes with a data directory; a profile logs in as its own user "
                     "('quanta login URL --user NAME --profile P')", 2)
            return ConsumerClient.for_profile(profile)
        if user is None:
            return ConsumerClient.for_data_dir(root)
        pw = read_password_file(password_file) if password_file else os.environ.get("QUANTA_PASSWORD", "")
        return ConsumerClient.for_data_dir(root, user, pw)
    except ApiError as e:
        fail(f"error: {_login_text(e)}", 2)


def _login_text(e: Exception) -> str:
    status = getattr(e, "status", None)
    text = str(e)
    if status == 401 and not text.startswith("session expired"):
        return f"login refused: {text}"
    return text


def _api_call(fn: Any, *args: Any, **kw: Any) -> Any:
    from quanta.client import ApiError

    try:
        return fn(*args, **kw)
    except ApiError as e:
        fail(f"error: {_login_text(e)}", 2)


def _target(first: str, second: Optional[str]) -> tuple[Optional[Path], int]:
    """``DIR ID`` or ``ID`` (with a profile)."""
    root, ident = (Path(first), second) if second is not None else (None, first)
    try:
        iid = int(ident)
    except ValueError:
        fail(f"error: {ident!r} is not an instruction id", 2)
    if not 0 < iid < 2**63:
        fail(f"error: {ident!r} is not an instruction id", 2)
    return root, iid


FirstArg = Annotated[str, typer.Argument(metavar="DIR|ID", help="the server's data directory, followed by ID; or, "
                                         "with a login profile (--profile or the default), the instruction id alone")]
SecondArg = Annotated[Optional[str], typer.Argument(metavar="[ID]", help="the instruction id (after DIR)",
                                                    show_default=False)]


# ------------------------------------------------------------------------------------- ask
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []}, add_help_option=False)
def ask(ctx: typer.Context) -> None:
    """Ask a question and show the answers ('quanta ask --help' for options and exit codes)."""
    from quanta.ask import main

    raise typer.Exit(main(ctx.args))


# ----------------------------------------------------------------------------------- login
@app.command()
def login(url: Annotated[str, typer.Argument(help="the server: https://HOST:PORT")],
          user: Annotated[str, typer.Option("--user", help="your user name")],
          password_file: Annotated[Optional[Path], typer.Option(
              help="file with your password; kept in the profile (the path, never the password) to log in "
                   "again when the session expires")] = None,
          ca: Annotated[Optional[Path], typer.Option(help="CA certificate of the server (its pki/ca.crt); default: "
                                                     "the system's trust store")] = None,
          profile: Annotated[str, typer.Option("--profile", help="profile name")] = "default",
          make_default: Annotated[bool, typer.Option("--default", help="make this the default profile")] = False) -> None:
    """Log in to a server and store a profile (0600, under your config directory) for the client commands."""
    import getpass

    from quanta import profiles
    from quanta.client import ApiError, ConsumerClient, TokenCache, read_password_file

    try:
        profiles.check_name(profile)
        base = profiles.check_url(url)
    except profiles.ProfileError as e:
        fail(f"error: {e}", 2)
        return
    if ca is not None:
        if not ca.is_file():
            fail(f"error: --ca {ca}: no such file", 2)
        ca = ca.resolve()
    try:
        if password_file is not None:
            password_file = password_file.resolve()
            password = read_password_file(password_file)
        elif os.environ.get("QUANTA_PASSWORD"):
            password = os.environ["QUANTA_PASSWORD"]
        elif sys.stdin.isatty():
            password = getpass.getpass(f"Password of {user} at {base}: ")
        else:
            fail("error: give --password-file FILE or QUANTA_PASSWORD (no terminal to prompt on)", 2)
            return
        cache = TokenCache(profiles.token_path(profile), base, user)
        cache.clear()
        with ConsumerClient(base, ca, user, password, token_cache=cache) as api:
            api.devices()  # the session works (and the server's certificate was verified)
    except ApiError as e:
        fail(f"error: {_login_text(e)}", 2)
        return
    try:
        profiles.save(profiles.Profile(profile, base, user, ca, password_file), make_default)
    except (OSError, profiles.ProfileError) as e:
        fail(f"error: cannot store the profile: {e}", 2)
    out.print(f"logged in to {base} as {user}; profile {profile!r} stored in {profiles.profiles_path()}"
              + ("" if password_file else " (no password kept: when the session expires, run quanta login again)"),
              highlight=False)


# -------------------------------------------------------------------------------- decisions
def _decide(first: str, second: Optional[str], verb: str, profile: Optional[str], user: Optional[str],
            password_file: Optional[Path], **kw: Any) -> None:
    root, iid = _target(first, second)
    with _connect(root, profile, user, password_file) as api:
        result = _api_call(api.decide, iid, verb, **kw)
    out.print(json.dumps(result), highlight=False)


@app.command()
def approve(first: FirstArg, second: SecondArg = None, profile: ProfileOpt = None, user: UserOpt = None,
            password_file: PasswordOpt = None,
            code: Annotated[Optional[str], typer.Option(help="one-time code from the approval email")] = None,
            reason: Optional[str] = None) -> None:
    """Approve someone else's action instruction."""
    _decide(first, second, "Approve", profile, user, password_file, code=code, reason=reason)


@app.command()
def reject(first: FirstArg, reason: Annotated[str, typer.Option(help="why")], second: SecondArg = None,
           profile: ProfileOpt = None, user: UserOpt = None, password_file: PasswordOpt = None) -> None:
    """Reject someone else's action instruction."""
    _decide(first, second, "Reject", profile, user, password_file, reason=reason)


@app.command()
def cancel(first: FirstArg, second: SecondArg = None, profile: ProfileOpt = None, user: UserOpt = None,
           password_file: PasswordOpt = None) -> None:
    """Cancel an instruction that waits for approval, is scheduled, or is still gathering."""
    root, iid = _target(first, second)
    with _connect(root, profile, user, password_file) as api:
        result = _api_call(api._call, "POST", f"/Consumer/Instructions/{iid}/Cancel")
    out.print(json.dumps(result), highlight=False)


@app.command("approval-code")
def approval_code(first: FirstArg, second: SecondArg = None, profile: ProfileOpt = None, user: UserOpt = None,
                  password_file: PasswordOpt = None) -> None:
    """Email yourself a one-time code for approving an instruction."""
    _decide(first, second, "ApprovalCode", profile, user, password_file)


# ------------------------------------------------------------------------------------ reads
@app.command()
def devices(root: MaybeDir = None, profile: ProfileOpt = None, fmt: FormatOpt = None,
            json_output: JsonOpt = False) -> None:
    """List devices known to the server (that you may reach)."""
    f = output_format(fmt, json_output)
    with _connect(root, profile) as api:
        rows = _api_call(api.devices)
    print_rows(["Device", "Online", "OS", "FQDN", "Switch", "Agent", "Revoked"],
               [[d["device_id"], "yes" if d["online"] else "no", d["os"], d["fqdn"], d["switch"], d["agent_version"],
                 "yes" if d["revoked"] else ""] for d in rows], f, json_items=rows)


def _when(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else ""


@app.command()
def history(root: MaybeDir = None, profile: ProfileOpt = None,
            user: Annotated[Optional[str], typer.Option("--user", help="only instructions this user issued")] = None,
            status: Annotated[Optional[str], typer.Option(help="only this status (comma-separated: finished,active,...)")] = None,
            limit: Annotated[int, typer.Option(min=1, max=10_000, help="at most this many, newest first")] = 50,
            fmt: FormatOpt = None, json_output: JsonOpt = False) -> None:
    """Past instructions you may see, newest first."""
    f = output_format(fmt, json_output)
    items: list[dict[str, Any]] = []
    with _connect(root, profile) as api:
        offset = 0
        while len(items) < limit:
            page = _api_call(api.instructions, offset, 500 if user else min(limit, 500), status)
            batch = page["items"]
            items += [i for i in batch if user is None or i["created_by"] == user]
            offset += len(batch)
            if not batch or offset >= page["total"]:
                break
    items = items[:limit]
    print_rows(["ID", "Name", "Kind", "Status", "By", "Created", "Targeted", "States", "Payload"],
               [[i["id"], i["name"], i["kind"], i["status"], i["created_by"], _when(i["created_at"]), i["targeted"],
                 " ".join(f"{k}={v}" for k, v in sorted(i["states"].items())), i["payload"]] for i in items],
               f, json_items=items)


@app.command()
def results(first: FirstArg, second: SecondArg = None, profile: ProfileOpt = None, fmt: FormatOpt = None,
            json_output: JsonOpt = False) -> None:
    """Show a past instruction's answers (one row per device and result row)."""
    from quanta.ask import _json, print_results

    f = output_format(fmt, json_output)
    root, iid = _target(first, second)
    with _connect(root, profile) as api:
        status = _api_call(api.status, iid)
        rows = _api_call(api.all_results, iid)
    if f == "json":
        print(json.dumps(_json(iid, status, rows), default=str))
    else:
        print_results(iid, status, rows, f)


EXPORT_FORMATS = ("csv", "json", "ndjson")


def _export_rows(api: Any, iid: int) -> Iterator[dict[str, Any]]:
    """Every visible row from paging /Responses by device (``api.results``: ``paging=device``,
    which a server without the Export route, older than row paging, answers as its only shape):
    one per device and result row, with device and status columns."""
    offset = 0
    while True:
        page = api._retrying(api.results, iid, offset, 1000)
        for r in page:
            cols = r["columns"] or []
            for row in r["rows"] or [None]:
                yield {"device": r["device"], "status": r["status"], **(dict(zip(cols, row)) if row else {}),
                       "error": r["error"]}
        offset += len(page)
        if len(page) < 1000:
            return


def _write_fallback(api: Any, iid: int, fmt: str, sink: Any) -> None:
    import csv
    import io

    from quanta.consumer_api.routers.export import csv_cell  # the server's cells: formula-safe

    rows = _export_rows(api, iid)
    text = io.TextIOWrapper(sink, encoding="utf-8", newline="", write_through=True)
    try:
        if fmt == "ndjson":
            for r in rows:
                text.write(json.dumps(r, default=str) + "\n")
        elif fmt == "json":
            text.write("[")
            for n, r in enumerate(rows):
                text.write(("," if n else "") + json.dumps(r, default=str))
            text.write("]\n")
        else:
            materialised = list(rows)  # CSV needs every column name before the first row
            columns: list[str] = []
            for r in materialised:
                for k in r:
                    if k not in columns:
                        columns.append(k)
            columns = ["device", "status", *[c for c in columns if c not in ("device", "status", "error")], "error"]
            w = csv.writer(text, lineterminator="\r\n")  # as the Export route writes it
            w.writerow([csv_cell(c) for c in columns])
            for r in materialised:
                w.writerow([csv_cell(r.get(c)) for c in columns])
    finally:
        text.detach()


@app.command()
def export(first: FirstArg, second: SecondArg = None, profile: ProfileOpt = None,
           fmt: Annotated[str, typer.Option("--format", help="csv, json or ndjson")] = "csv",
           out_file: Annotated[Optional[Path], typer.Option("-o", "--out", help="file to write (default: stdout)")] = None) -> None:
    """Export every row of an instruction's answers you may see (streamed by the server)."""
    if fmt not in EXPORT_FORMATS:
        fail(f"error: --format {fmt!r}: give one of {', '.join(EXPORT_FORMATS)}", 2)
    root, iid = _target(first, second)
    with _connect(root, profile) as api:
        _api_call(api.status, iid)  # an unknown or hidden instruction: one line, and no file left behind
        tmp = None
        try:
            if out_file is None:
                sink = sys.stdout.buffer
            else:
                tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}.part")
                sink = open(tmp, "wb")
            try:
                if not _api_call(api.export, iid, fmt, sink):
                    _api_call(_write_fallback, api, iid, fmt, sink)
                sink.flush()
            finally:
                if out_file is not None:
                    sink.close()
            if tmp is not None:
                os.replace(tmp, out_file)
                tmp = None
        except OSError as e:
            fail(f"error: cannot write {out_file or 'stdout'}: {e}", 2)
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    if out_file is not None:
        console.print(f"wrote {out_file}", highlight=False)
