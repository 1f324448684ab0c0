"""``quanta backup DIR --out FILE`` (the work: :mod:`quanta.backup`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quanta.cli.common import DirArg, app, console, fail, load_settings_or_fail, out


@app.command()
def backup(root: DirArg,
           out_file: Annotated[Path, typer.Option("--out", help="the archive to write (.tar.gz, 0600); must not exist")]) -> None:
    """Back up a data directory while its server runs: SQLite snapshots (online backup API), PKI, settings, content.

    Restore with: mkdir -m 700 NEWDIR && tar -xpzf FILE -C NEWDIR. PostgreSQL databases are not
    included: dump them with pg_dump (docs/operations.md, "Backup and restore")."""
    from quanta.backup import BackupError, backup as run_backup

    settings = load_settings_or_fail(root)
    try:
        r = run_backup(root, out_file, settings)
    except (BackupError, OSError) as e:
        fail(f"error: {e}", 2)
        return
    for line in r.not_included:
        console.print(f"warning: not in the archive: {line}", highlight=False)
    out.print(f"wrote {r.out}: {', '.join(r.databases) or 'no database'} (SQLite snapshots) and {r.files} file(s) "
              f"of {Path(root).resolve()}", highlight=False)
