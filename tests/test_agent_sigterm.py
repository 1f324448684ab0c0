"""SIGTERM stops a real agent within seconds whatever its worker threads run: a payload that can
be told to stop (SQL counting to a billion) stops at once; one blocked where no check reaches (an
approved action waiting for the user's answer to a prompt) is left behind by a hard exit after
the grace, with the logs flushed. Real server, real agents, real mutual TLS."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import Server, quanta, wait_until

pytestmark = pytest.mark.slow

SLOW_QUESTION = ("SELECT COUNT(*) AS n FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c "
                 "WHERE x < 1000000000) SELECT x FROM c);")
PROMPT_ACTION = 'Interaction.ShowQuestion(Title: "Maintenance", Description: "Reboot at 22:00?", TimeoutSeconds: 600);'
EXIT_WITHIN = 5.0


def _cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _ask(server: Server, payload: str, device: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "quanta", "ask", str(server.root), payload, "--device", device, "--wait-approval",
                             "--json", "--wait", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)


def _sigterm(proc: subprocess.Popen[bytes]) -> float:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(EXIT_WITHIN + 10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the agent did not exit within 15 s of SIGTERM") from None
    return time.monotonic() - started


def test_sigterm_stops_a_busy_agent_within_seconds(server: Server, tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("a sufficiently long password")
    quanta("user", "add", str(server.root), "--username", "bob", "--role", "Approver", "--password-file",
           str(tmp_path / "pw"))
    desk_dir = server.enroll("desk")
    desk = server.start_agent("desk")  # first, so it holds the interaction port
    wait_until(lambda: "interaction port listening" in server.agent_log("desk"), 20, "interaction port", server)
    server.enroll("busy")
    busy = server.start_agent("busy")
    server.wait_online({"desk", "busy"})

    # 1. a slow SQL question: told to stop, it stops at once
    asker = _ask(server, SLOW_QUESTION, "busy")
    try:
        base = _cpu_seconds(busy.pid)
        wait_until(lambda: _cpu_seconds(busy.pid) - base > 1.0, 30, "the busy agent running the question", server)
        elapsed = _sigterm(busy)
    finally:
        asker.kill()
        asker.wait(10)
    server.agents.pop("busy")
    log = server.agent_log("busy")
    assert elapsed < EXIT_WITHIN, (elapsed, log[-2000:])
    assert "stopping: running payloads are told to stop" in log
    assert "exiting now" not in log  # the payload stopped by itself, no hard exit needed
    assert busy.returncode == 0

    # 2. an approved action blocked waiting for the user: the hard exit after the grace
    user = subprocess.Popen([sys.executable, "-m", "quanta", "prompt", str(desk_dir)], stdin=subprocess.PIPE,
                            stdout=open(tmp_path / "prompt.out", "wb"), stderr=subprocess.STDOUT)
    asker = _ask(server, PROMPT_ACTION, "desk")
    try:
        from quanta.client import ConsumerClient

        with ConsumerClient.for_data_dir(server.root) as api:
            def pending() -> list[dict]:
                return api.http.get("/Consumer/Instructions", params={"status": "pending_approval"}).json()["items"]

            wait_until(pending, 20, "pending action", server)
            iid = pending()[0]["id"]
        quanta("approve", str(server.root), str(iid), "--user", "bob", "--password-file", str(tmp_path / "pw"))
        wait_until(lambda: "Reboot at 22:00?" in (tmp_path / "prompt.out").read_text(errors="replace"), 30,
                   "the prompt shown to the user (the agent's worker now waits for the answer)", server)
        elapsed = _sigterm(desk)
    finally:
        asker.kill()
        user.kill()
        asker.wait(10)
        user.wait(10)
    server.agents.pop("desk")
    log = server.agent_log("desk")
    assert elapsed < EXIT_WITHIN, (elapsed, log[-2000:])
    assert "still running 3s after the stop signal" in log and "exiting now" in log, log[-2000:]
    assert desk.returncode == 0
