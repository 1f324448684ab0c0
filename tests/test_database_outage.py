"""A database that goes away: the Core waits and retries, the API answers 503, nothing is lost."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from conftest import make_server, quanta, wait_until
from quanta.db import normalise_url

pytestmark = pytest.mark.slow

SLOW = ("@p = OperatingSystem.GetProcesses(); "
        "SELECT COUNT(*) AS N FROM @p, (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 3000000) "
        "SELECT MAX(x) AS M FROM c);")


def _block(admin: sa.Engine, db: str, allow: bool) -> None:
    with admin.connect() as c:
        c.execute(sa.text(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS {"true" if allow else "false"}'))
        if not allow:
            c.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"), {"d": db})


def test_postgres_outage_mid_question_loses_nothing(tmp_path, pg_url, pg_server_url) -> None:
    server = make_server(tmp_path, "--database-url", pg_url)
    db = sa.engine.make_url(pg_url).database
    admin = sa.create_engine(normalise_url(pg_server_url), isolation_level="AUTOCOMMIT")
    server.start()
    try:
        names = ["a1", "a2", "a3"]
        for n in names:
            server.enroll(n)
            server.start_agent(n)
        server.wait_online(set(names))
        proc = subprocess.Popen([sys.executable, "-m", "quanta", "ask", str(server.root), SLOW, "--json", "--wait", "60"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: "delivering to 3 connected devices" in server.log_text(), 20, "delivery", server)
        _block(admin, db, allow=False)
        wait_until(lambda: "database unavailable" in server.log_text(), 30, "the outage to be noticed", server)
        # the API says so plainly instead of failing obscurely
        r = quanta("devices", str(server.root), "--json", check=False)
        assert r.returncode != 0 and ("503" in r.stderr or "database unavailable" in r.stderr), r.stderr
        time.sleep(2)
        _block(admin, db, allow=True)
        stdout, stderr = proc.communicate(timeout=120)
        out = json.loads(stdout)
        assert out["states"] == {"success": 3}, (out, stderr)
        assert sorted(x["device"] for x in out["responses"]) == names
        assert "database back after" in server.log_text()
    finally:
        _block(admin, db, allow=True)
        server.stop()
        admin.dispose()
