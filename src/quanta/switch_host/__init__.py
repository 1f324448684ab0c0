"""Switch Host: supervises one Switch process per SwitchConfiguration row on this host."""

from __future__ import annotations

import logging
from pathlib import Path

from quanta.runtime import EXIT_CONFIGURATION
from quanta.supervisor import Child, Supervisor, quanta_argv

log = logging.getLogger("quanta.switch_host")


def switch_children(root: Path) -> list[Child]:
    from quanta.switch.main import local_switch_rows

    rows = [r for r in local_switch_rows(root) if r["Enabled"]]
    return [Child(f"switch:{r['Name']}", quanta_argv("switch", str(root), "--name", r["Name"])) for r in rows]


async def serve(root: Path) -> int:
    """Supervise this host's enabled Switches. None is a configuration error (code 2), so that the server's
    supervisor stops instead of restarting a Switch Host that has nothing to run."""
    children = switch_children(root)
    if not children:
        log.error("error: no enabled Switch in SwitchConfiguration for this host (rows whose Host is this "
                  "server's name and Enabled is set); nothing to supervise")
        return EXIT_CONFIGURATION
    from quanta.status import SWITCH_HOST, StatusRecord, status_path

    return await Supervisor(children, status=StatusRecord(status_path(root, SWITCH_HOST), SWITCH_HOST)).run()
