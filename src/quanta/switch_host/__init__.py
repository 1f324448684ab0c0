"""Switch Host: supervises one Switch process per SwitchConfiguration row on this host."""

from __future__ import annotations

from pathlib import Path

from quanta.supervisor import Child, Supervisor, quanta_argv


def switch_children(root: Path) -> list[Child]:
    from quanta.switch.main import local_switch_rows

    rows = [r for r in local_switch_rows(root) if r["Enabled"]]
    return [Child(f"switch:{r['Name']}", quanta_argv("switch", str(root), "--name", r["Name"])) for r in rows]


async def serve(root: Path) -> int:
    children = switch_children(root)
    if not children:
        raise SystemExit("error: no enabled Switch in SwitchConfiguration")
    return await Supervisor(children).run()
