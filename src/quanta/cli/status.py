"""``quanta status DIR``: every component of the server in DIR, as its supervisor recorded it and the
live system confirms it (the work: :mod:`quanta.status`)."""

from __future__ import annotations

import typer

from quanta.cli.common import DirArg, FormatOpt, JsonOpt, app, console, load_settings_or_fail, output_format, print_rows
from quanta.status import EXIT_CODES


@app.command(epilog="Exit codes: " + "; ".join(f"{code} {what}" for code, what in EXIT_CODES.items()) + ".")
def status(root: DirArg, fmt: FormatOpt = None, json_output: JsonOpt = False) -> None:
    """Show each component of the server in DIR: state, ports, pid, uptime, restarts and last error.

    States: running; starting (alive, its ports not open yet, for up to 60 s); not listening (alive, a
    port closed or held by another process); restarting; exited (gone, its supervisor has not noticed
    yet); stopping; stopped; stopped (stale: its supervisor was killed without recording the stop);
    failed (not restarted); orphaned (alive without its supervisor); not configured (not run by this
    role, or disabled in SwitchConfiguration).
    """
    from quanta.status import COLUMNS, collect, rows

    settings = load_settings_or_fail(root)
    fmt = output_format(fmt, json_output)
    report = collect(root, settings)
    for problem in report.problems:
        console.print(f"warning: {problem}", highlight=False)
    title = f"{report.root} ({report.role} server)"
    print_rows(COLUMNS, rows(report), fmt, json_items=report.as_json(), title=title)
    raise typer.Exit(report.exit_code)
