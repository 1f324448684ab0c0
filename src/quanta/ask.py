"""``quanta ask``: issue a question, wait for every answer, print them.

:mod:`quanta.entry` runs :func:`main` before the full CLI is imported (the server-side CLI loads
the web framework and the SQL toolkit: most of a second). The arguments are defined once, in
:data:`OPTIONS` (a plain spec, built into a standard-library ``argparse`` parser by
:func:`parser`); the typer command ``quanta ask`` of :mod:`quanta.cli` hands its arguments to the
same :func:`main`, so there is one parser, one help text and one set of exit codes.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

# Exit codes of ``quanta ask`` (docs/operations.md, "Exit codes"; printed by ``quanta ask --help``).
# 1 and 2 keep their earlier meanings (not finished; an error), so scripts written for them still work.
EXIT_OK = 0  # finished, and no targeted device answered error (success, no content, not applicable, offline)
EXIT_NOT_FINISHED = 1  # not finished within --wait
EXIT_ERROR = 2  # the request failed (unreachable server, refused login, refused question) or bad arguments
EXIT_USAGE = 2
EXIT_DEVICE_ERRORS = 3  # finished, but some devices answered error
EXIT_NOTHING_TARGETED = 4  # no device was targeted (or a --device is not one this user can see)
EXIT_AWAITING_APPROVAL = 5  # an action waits for approval (returned at once; --wait-approval waits)

EXIT_CODES = (
    (EXIT_OK, "finished; no targeted device answered error (success, no content, not applicable or offline)"),
    (EXIT_NOT_FINISHED, "not finished within --wait"),
    (EXIT_ERROR, "error: bad arguments, no server, refused login, expired session, refused question"),
    (EXIT_DEVICE_ERRORS, "finished, but some devices answered error"),
    (EXIT_NOTHING_TARGETED, "nothing targeted (no device matched, or an unknown --device, which is named)"),
    (EXIT_AWAITING_APPROVAL, "an action is awaiting approval (printed at once; --wait-approval waits for it)"),
)


@dataclass(frozen=True)
class Opt:
    """One option of a command, defined once for every parser that reads it."""

    flags: tuple[str, ...]
    dest: str
    help: str
    kind: str = "flag"  # flag, str, float, list
    default: Any = None
    metavar: str | None = None
    min: float | None = None


OPTIONS: tuple[Opt, ...] = (
    Opt(("--definition",), "definition", "issue an imported instruction definition instead of SCALE text", "str",
        metavar="NAME"),
    Opt(("--device",), "device", "target device (repeatable); default: every device you may reach", "list",
        metavar="NAME"),
    Opt(("--wait",), "wait", "gather window and how long to wait, seconds (default 60)", "float", 60.0,
        metavar="SECONDS", min=1),
    Opt(("--param",), "param", "NAME=VALUE instruction parameter (repeatable)", "list", metavar="NAME=VALUE"),
    Opt(("--wait-approval",), "wait_approval", "an action: wait for its approval (within --wait) instead of "
        "returning at once"),
    Opt(("--profile",), "profile", "login profile from 'quanta login' (instead of a data directory)", "str",
        metavar="PROFILE"),
    Opt(("--format",), "format", "table, csv or json", "str", metavar="FORMAT"),
    Opt(("--json",), "json_output", "print one JSON object (same as --format json)"),
)

USAGE = "quanta ask [DIR] [PAYLOAD] [options]"
DESCRIPTION = ("Ask a question and show the answers. DIR is the server's data directory (on the server); "
               "without it, the --profile (or default profile) stored by 'quanta login' is used.")


def exit_code_text() -> str:
    return "exit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES)


def parser() -> Any:
    import argparse

    p = argparse.ArgumentParser(prog="quanta ask", usage=USAGE, description=DESCRIPTION, epilog=exit_code_text(),
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("positional", nargs="*", metavar="DIR PAYLOAD",
                   help="data directory and SCALE text (either may be left out: see above)")
    for o in OPTIONS:
        if o.kind == "flag":
            p.add_argument(*o.flags, dest=o.dest, action="store_true", help=o.help)
        elif o.kind == "list":
            p.add_argument(*o.flags, dest=o.dest, action="append", default=[], metavar=o.metavar, help=o.help)
        else:
            p.add_argument(*o.flags, dest=o.dest, default=o.default, metavar=o.metavar, help=o.help,
                           type=_bounded(float, o.min) if o.kind == "float" else str)
    return p


def _bounded(cast: Any, low: float | None) -> Any:
    import argparse

    def convert(text: str) -> Any:
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if low is not None and not v >= low:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"{text!r} is below {low:g}")
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        return v

    return convert


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def parse(argv: Sequence[str]) -> dict[str, Any]:
    """The options as a dict (``root``, ``payload`` and every :data:`OPTIONS` dest); usage errors
    exit 2 with one line, ``--help`` exits 0."""
    ns = parser().parse_args(list(argv))
    o = vars(ns)
    pos = o.pop("positional")
    if len(pos) > 2:
        parser().error(f"at most DIR and PAYLOAD, got {len(pos)} positional arguments")
    root = payload = None
    if len(pos) == 2:
        root, payload = pos
    elif len(pos) == 1:
        # `quanta ask DIR --definition NAME` (on the server) or `quanta ask PAYLOAD [--profile P]`
        if o["definition"] is not None and o["profile"] is None:
            root = pos[0]
        else:
            payload = pos[0]
    if root is not None and o["profile"] is not None:
        parser().error("give a data directory or --profile, not both")
    o["root"] = Path(root) if root is not None else None
    o["payload"] = payload
    fmt = "json" if o["json_output"] else (o["format"] or "table").lower()
    if fmt not in ("table", "csv", "json"):
        parser().error(f"--format {o['format']!r}: give table, csv or json")
    o["format"] = fmt
    return o


def connect(root: Path | None, profile: str | None) -> Any:
    """A logged-in client: on the server from its data directory, else from a login profile."""
    from quanta.client import ConsumerClient

    if root is not None:
        return ConsumerClient.for_data_dir(root)
    return ConsumerClient.for_profile(profile)


def run(root: Path | None, payload: str | None, definition: str | None = None, devices: list[str] | None = None,
        wait: float = 60, params: list[str] | None = None, json_output: bool = False, *,
        profile: str | None = None, wait_approval: bool = False, fmt: str | None = None) -> int:
    """Ask, wait up to ``wait`` + 5 s, print; the exit code is one of :data:`EXIT_CODES`."""
    from quanta.client import ApiError, parse_param

    fmt = "json" if json_output else (fmt or "table")
    if (payload is None) == (definition is None):
        _err("error: give a SCALE payload or --definition NAME (not both)")
        return EXIT_USAGE
    progress = _err_console() if fmt == "table" else None
    try:
        parameters = dict(parse_param(x) for x in params or [])
        with connect(root, profile) as api:
            if devices:
                known = {d["device_id"] for d in api.devices()}
                unknown = [d for d in dict.fromkeys(devices) if d not in known]
                if unknown:
                    _err(f"error: unknown device{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                         "(not enrolled, or not one you may reach): nothing was asked")
                    return EXIT_NOTHING_TARGETED
            issued = api.issue(payload, devices=devices or None, instruction_ttl=int(wait), parameters=parameters,
                               definition=definition)
            iid = issued["id"]
            if issued["status"] == "pending_approval":
                status = api.status(iid)
                where = f"{root} " if root is not None else (f"--profile {profile} " if profile else "")
                who = (f"an Approver of instruction set {status['instruction_set']!r}"
                       if status.get("instruction_set") else "an Approver")
                msg = (f"instruction {iid} is an action awaiting approval by {who} (not you): "
                       f"quanta approve {where}{iid}")
                if not wait_approval:
                    _err(msg)
                    if fmt == "json":
                        print(json.dumps(_json(iid, status, [])))
                    return EXIT_AWAITING_APPROVAL
                _err(msg + "; waiting for it")
            status = api.wait(iid, wait + 5, progress=progress)
            results = api.all_results(iid) if status["status"] != "pending_approval" else []
    except ApiError as e:
        _err(f"error: {e}")
        return EXIT_ERROR
    if fmt == "json":
        print(json.dumps(_json(iid, status, results), default=str))
    else:
        print_results(iid, status, results, fmt)
    return outcome(status)


def outcome(status: dict[str, Any]) -> int:
    if status["status"] == "pending_approval":
        return EXIT_AWAITING_APPROVAL
    if status["status"] != "finished":
        return EXIT_NOT_FINISHED
    if not status["targeted"]:
        return EXIT_NOTHING_TARGETED
    if status["states"].get("error"):
        return EXIT_DEVICE_ERRORS
    return EXIT_OK


def _json(iid: int, status: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"instruction_id": iid, "status": status["status"], "targeted": status["targeted"],
            "states": status["states"], "finished": status["status"] == "finished",
            "responses": [{"device": r["device"], "status": r["status"],
                           "rows": [dict(zip(r["columns"] or [], row)) for row in r["rows"] or []],
                           **({"error": r["error"]} if r["error"] else {})} for r in results]}


def _err_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def result_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """One row per device and result row: Device, Status, every result column, Error."""
    columns: list[str] = []
    for r in results:
        for c in r["columns"] or []:
            if c not in columns:
                columns.append(c)
    rows: list[list[Any]] = []
    for r in results:
        cols = r["columns"] or []
        for row in r["rows"] or [[]]:
            vals = dict(zip(cols, row))
            rows.append([r["device"], r["status"], *(vals.get(c) for c in columns), r["error"]])
    return ["Device", "Status", *columns, "Error"], rows


def print_results(iid: int, status: dict[str, Any], results: list[dict[str, Any]], fmt: str = "table") -> None:
    columns, rows = result_table(results)
    if fmt == "csv":
        write_csv(columns, rows)
        return
    from rich.console import Console

    out = Console()
    states = ", ".join(f"{k} {v}" for k, v in sorted(status["states"].items()))
    out.print(f"instruction {iid}: {status['status']}; {status['targeted']} targeted; {states}", highlight=False)
    out.print(rich_table(columns, rows, out.width))


def write_csv(columns: Sequence[str], rows: Any) -> None:
    """A table as CSV on stdout, each value as :func:`cell` prints it (the CLI's one CSV writer)."""
    import csv

    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([cell(v) for v in row])


def cell(value: Any) -> str:
    """NULL prints empty; containers as JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def middle_cut(text: str, limit: int) -> str:
    """``text`` at most ``limit`` characters, cut in the middle (both ends of a path stay)."""
    if len(text) <= limit:
        return text
    keep = max(limit - 1, 2)
    head = (keep + 1) // 2
    tail = keep - head
    return text[:head] + "…" + (text[-tail:] if tail else "")


def rich_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], width: int, title: str | None = None) -> Any:
    """A table that fits ``width``: cells wrap (never cut at the edge); a cell longer than a few
    lines is cut in the middle."""
    from rich.table import Table

    table = Table(title=title, expand=False)
    share = max((width - 1) // max(len(columns), 1) - 3, 1)  # 3: a cell's borders and padding
    for c in columns:
        table.add_column(c, overflow="fold", min_width=min(len(c), 12, share))
    limit = max(3 * width // max(len(columns), 1), 40)
    for r in rows:
        table.add_row(*(middle_cut(cell(v), limit) for v in r))
    return table


def main(argv: Sequence[str]) -> int:
    """Run ``quanta ask ARGV`` and return its exit code."""
    o = parse(argv)
    return run(o["root"], o["payload"], o["definition"], o["device"], o["wait"], o["param"],
               profile=o["profile"], wait_approval=o["wait_approval"], fmt=o["format"])
