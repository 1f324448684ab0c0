"""``quanta demo``: the README's first command. A single server on the embedded SQLite default,
one local agent, and a real question answered end to end over mutual TLS.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

QUESTION = ("@p = OperatingSystem.GetProcesses();\n"
            "SELECT Executable, COUNT(*) AS Processes FROM @p GROUP BY Executable ORDER BY Processes DESC LIMIT 10;")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def _pick(preferred: int, pair: bool = False) -> int:
    for port in range(preferred, preferred + 200, 2 if pair else 1):
        if _free(port) and (not pair or _free(port + 1)):
            return port
    raise SystemExit(f"error: no free port near {preferred}")


def _quanta(*args: str) -> list[str]:
    return [sys.executable, "-m", "quanta", *args]


def run_demo(root: Path, keep_running: bool) -> int:
    root = root.resolve()
    logs = root / "logs"
    if not (root / "quanta.toml").exists():
        # Unprivileged defaults so the demo runs without root; a production install uses the seed's ports.
        https, switch, core = _pick(18443), _pick(14000, pair=True), _pick(13900)
        subprocess.run(_quanta("init", str(root), "--https-port", str(https), "--switch-port", str(switch),
                               "--port", f"core={core}", "--port", f"interaction={_pick(17766)}",
                               "--port", f"coordinator={_pick(18081)}", "--port", f"http={_pick(18080)}",
                               "--port", f"hub={_pick(13901)}", "--port", f"integrate={_pick(16002)}",
                               "--server-name", "localhost"), check=True)
    from quanta.settings import load_settings

    settings = load_settings(root)
    logs.mkdir(parents=True, exist_ok=True)
    agent_dir = root / "local-agent"
    if not (agent_dir / "agent.conf").exists():
        subprocess.run(_quanta("enroll", str(root), "--device", socket.gethostname() or "local-agent",
                               "--out", str(agent_dir)), check=True)
    server = subprocess.Popen(_quanta("server", str(root)), stdout=open(logs / "server.log", "ab"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    agent = subprocess.Popen(_quanta("agent", str(agent_dir)), stdout=open(logs / "agent.log", "ab"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        print(f"server starting (logs in {logs}) ...", flush=True)
        deadline = time.monotonic() + 60
        url = f"https://localhost:{settings.port('https')}/Consumer/health"
        while True:
            if server.poll() is not None:
                print((logs / "server.log").read_text()[-3000:], file=sys.stderr)
                return 2
            try:
                if httpx.get(url, verify=str(root / "pki" / "ca.crt"), timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                print("error: the server did not come up within 60 s; see the logs", file=sys.stderr)
                return 2
            time.sleep(0.3)
        # wait for the agent to be online, then ask
        from quanta.client import ConsumerClient

        with ConsumerClient.for_data_dir(root) as api:
            while not any(d["online"] for d in api.devices()):
                if time.monotonic() > deadline:
                    print("error: the local agent did not connect; see logs/agent.log", file=sys.stderr)
                    return 2
                time.sleep(0.3)
        print(f"asking every device:\n{QUESTION}\n", flush=True)
        rc = subprocess.run(_quanta("ask", str(root), QUESTION, "--wait", "30")).returncode
        if keep_running and rc == 0:
            print(f"\nserver running: https://localhost:{settings.port('https')}/Consumer/docs "
                  f"(credentials in {root / 'admin.credentials'}); try: quanta ask {root} "
                  "'@s = Device.GetSummary(); SELECT * FROM @s;'  — Ctrl-C stops it.", flush=True)
            try:
                server.wait()
            except KeyboardInterrupt:
                pass
        return rc
    finally:
        for proc in (agent, server):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (agent, server):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
