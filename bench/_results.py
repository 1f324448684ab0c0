"""Shared by the results benchmarks: an answered instruction of N devices x R rows written
straight into a server's databases with the store's bulk writes (insert_targets + ingest)."""

from __future__ import annotations

import time
from pathlib import Path

COLUMNS = ["Name", "Pid", "Memory", "Started", "Path"]


def seed(root: Path, devices: int, rows: int = 10, chunk: int = 5000) -> int:
    from quanta.db import make_engine, store, tables

    master = make_engine(f"sqlite:///{root / 'master.db'}")
    responses = make_engine(f"sqlite:///{root / 'responses.db'}")
    with master.begin() as c:
        iid = c.execute(tables.instructions.insert().values(
            name="bench", kind="question", payload="@p = OperatingSystem.GetProcesses();", parameters={},
            scope=None, status="finished", created_by="bench", created_at=time.time(),
            targeted=devices)).inserted_primary_key[0]
    names = [f"dev-{i:06d}" for i in range(devices)]
    store.insert_targets(responses, iid, dict.fromkeys(names, True), time.time() + 86400)
    for i in range(0, devices, chunk):
        store.ingest(responses, [dict(instruction_id=iid, device_id=d, state="success", columns=COLUMNS, error=None,
                                      rows=[[f"proc-{r}", 1000 + r, 1_048_576 * ((n + r) % 512), 1_700_000_000 + n,
                                             f"/usr/bin/proc-{r},\"quoted\""] for r in range(rows)])
                                 for n, d in enumerate(names[i:i + chunk], start=i)])
    master.dispose()
    responses.dispose()
    return int(iid)


def admin(root: Path) -> tuple[str, str]:
    creds = dict(line.split("=", 1) for line in (root / "admin.credentials").read_text().split())
    return creds["username"], creds["password"]
