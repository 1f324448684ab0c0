"""``quanta ask``: issue a question, wait for every answer, print them.

:mod:`quanta.entry` runs :func:`main` before the full CLI is imported (the server-side CLI loads
the web framework and the SQL toolkit: most of a second). The typer command ``quanta ask`` in
:mod:`quanta.cli` calls the same :func:`run`. :func:`main` parses the options itself and hands
anything it does not handle plainly (``--help``, a bad option) back to the typer CLI, so help,
usage errors and their exit codes stay typer's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _err_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def run(root: Path, payload: str | None, definition: str | None = None, devices: list[str] | None = None,
        wait: float = 60, params: list[str] | None = None, json_output: bool = False) -> int:
    """Ask, wait up to ``wait`` + 5 s, print; the exit code: 0 finished, 1 not finished, 2 error."""
    from quanta.client import ApiError, ConsumerClient, parse_param

    if (payload is None) == (definition is None):
        _err_console().print("[red]give a SCALE payload or --definition NAME (not both)[/red]", highlight=False)
        return 2
    try:
        parameters = dict(parse_param(x) for x in params or [])
        with ConsumerClient.for_data_dir(root) as api:
            issued = api.issue(payload, devices=devices or None, instruction_ttl=int(wait), parameters=parameters,
                               definition=definition)
            iid = issued["id"]
            if issued["status"] == "pending_approval":
                _err_console().print(f"instruction {iid} is an action: waiting for a second person to approve it "
                                     f"(quanta approve {root} {iid})", highlight=False)
            status = api.wait(iid, wait + 5, progress=None if json_output else _err_console())
            results = api.all_results(iid)
    except (ApiError, FileNotFoundError) as e:
        _err_console().print(f"[red]error: {e}[/red]", highlight=False)
        return 2
    finished = status["status"] == "finished"
    if json_output:
        print(json.dumps({"instruction_id": iid, "status": status["status"], "targeted": status["targeted"],
                          "states": status["states"], "finished": finished,
                          "responses": [{"device": r["device"], "status": r["status"],
                                         "rows": [dict(zip(r["columns"] or [], row)) for row in r["rows"] or []],
                                         **({"error": r["error"]} if r["error"] else {})} for r in results]},
                         default=str))
    else:
        print_results(iid, status, results)
    return 0 if finished else 1


def print_results(iid: int, status: dict[str, Any], results: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console()
    states = ", ".join(f"{k} {v}" for k, v in sorted(status["states"].items()))
    out.print(f"instruction {iid}: {status['status']}; {status['targeted']} targeted; {states}", highlight=False)
    columns: list[str] = []
    for r in results:
        for c in r["columns"] or []:
            if c not in columns:
                columns.append(c)
    table = Table("Device", "Status", *columns, "Error")
    for r in results:
        cols = r["columns"] or []
        rows = r["rows"] or [[]]
        for row in rows:
            vals = dict(zip(cols, row))
            table.add_row(r["device"], r["status"], *(str(vals.get(c, "")) for c in columns), r["error"] or "")
    out.print(table)


_VALUED = {"--definition": "definition", "--device": "device", "--wait": "wait", "--param": "param"}


def parse(argv: list[str]) -> dict[str, Any] | None:
    """``ROOT [PAYLOAD] [--definition NAME] [--device D]... [--wait S] [--param N=V]... [--json]``
    as typer parses it, or None for anything else (help, unknown options, bad values)."""
    positional: list[str] = []
    opts: dict[str, Any] = {"definition": None, "device": [], "wait": 60.0, "param": [], "json_output": False}
    i, only_positional = 0, False
    while i < len(argv):
        a = argv[i]
        i += 1
        if only_positional or not a.startswith("-") or a == "-":
            positional.append(a)
        elif a == "--":
            only_positional = True
        elif a == "--json":
            opts["json_output"] = True
        else:
            name, eq, value = a.partition("=")
            key = _VALUED.get(name)
            if key is None:
                return None
            if not eq:
                if i >= len(argv):
                    return None
                value = argv[i]
                i += 1
            if key == "wait":
                try:
                    opts["wait"] = float(value)
                except ValueError:
                    return None
                if not opts["wait"] >= 1:
                    return None
            elif key == "definition":
                opts["definition"] = value
            else:
                opts[key].append(value)
    if not 1 <= len(positional) <= 2:
        return None
    opts["root"] = Path(positional[0])
    opts["payload"] = positional[1] if len(positional) == 2 else None
    return opts


def main(argv: list[str]) -> int | None:
    """Run ``quanta ask ARGV``; None: not handled here, let the full CLI parse it."""
    o = parse(argv)
    if o is None:
        return None
    return run(o["root"], o["payload"], o["definition"], o["device"], o["wait"], o["param"], o["json_output"])

