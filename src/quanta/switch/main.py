"""``quanta switch DIR --name NAME``: one Switch process, configured by its SwitchConfiguration row."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from quanta.db import make_engine, store
from quanta.pki import Pki
from quanta import metrics
from quanta.internal import POKE, SWITCH_TO_CORE, host_credentials
from quanta.runtime import configure_logging, wait_for_signal
from quanta.settings import DataDir, load_settings

from .service import Switch

log = logging.getLogger("quanta.switch")


def local_switch_rows(root: Path) -> list[dict]:
    """This host's Switches: its rows of SwitchConfiguration (Host = this server's name), or, on a
    DMZ server, which has no database, the rows its settings carry."""
    settings = load_settings(root)
    if settings.role == "dmz":
        return [dict(Name=r["Name"], Host=r["Host"], Port=int(r["Port"]), Enabled=True) for r in settings.local_switches]
    rows = store.switch_rows(make_engine(DataDir(root).master_url(settings)))
    return [r for r in rows if r["Host"] == settings.server_name]


def switch_row(root: Path, name: str) -> dict:
    rows = {r["Name"]: r for r in local_switch_rows(root)}
    if name not in rows:
        raise SystemExit(f"error: no Switch named {name!r} in SwitchConfiguration (have: {', '.join(rows) or 'none'})")
    return rows[name]


async def serve(root: Path, name: str) -> None:
    settings = load_settings(root)
    dd = DataDir(root)
    configure_logging("switch", settings, f"switch:{name}")
    row = switch_row(root, name)
    switch = Switch(name=name, host=row["Host"], port=row["Port"], bind_host=settings.bind_host,
                    pki=Pki(dd.pki), core_url=settings.core_link_url(),
                    secret=host_credentials(root, SWITCH_TO_CORE, POKE), max_message_bytes=settings.max_message_bytes)
    metrics.register_switch(switch)
    metrics.serve_metrics(settings, "switch", index=[r["Name"] for r in local_switch_rows(root)].index(name))
    stop = asyncio.Event()
    waiter = asyncio.create_task(wait_for_signal())
    waiter.add_done_callback(lambda _: stop.set())
    await switch.serve(stop)
