"""``quanta server DIR --log-format json``: every line of the server and its children is one JSON
object, and the startup lines name every Switch of SwitchConfiguration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import make_server, wait_until


def test_server_log_format_json_and_every_switch_named(tmp_path: Path) -> None:
    s = make_server(tmp_path, "--switches", "2")
    s.log = s.root / "server.log"
    s.proc = subprocess.Popen([sys.executable, "-m", "quanta", "server", str(s.root), "--log-format", "json"],
                              stdout=open(s.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: "linked to core" in s.log_text(), 90, "switch linked to core", s)
        lines = [x for x in s.log_text().splitlines() if x.strip()]
        records = [json.loads(x) for x in lines]  # fails on any text line, from any process
        assert {"core", "web"} <= {r.get("component", "").split(":")[0].split("[")[0] for r in records}, records[:5]
        ports = [r["message"] for r in records if "switches on" in r.get("message", "")]
        assert ports, records[:5]
        assert f"switch-1:{s.switch} (poke {s.switch + 1})" in ports[0]
        assert f"switch-2:{s.switch + 2} (poke {s.switch + 3})" in ports[0]
    finally:
        s.stop()
