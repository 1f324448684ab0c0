"""Quick payloads: a question made only of quick method calls (Program.quick) runs on the agent's
event loop; anything else, and anything that does not compile, is handled as before (a worker
thread; an error response). Each gives the same response either way."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import pytest

from quanta import protocol as p
from quanta.agent import runtime
from quanta.agent.config import load_agent_config, write_conf
from quanta.pki import Pki
from quanta.scale import compile_scale


@pytest.mark.parametrize("payload,quick", [
    ("@x = Agent.GetSummary();", True),
    ('Tagging.Get(Name: "a");', True),
    ("@a = Agent.GetKeyFiles(); IF (@a) @b = Tagging.GetAll(); ENDIF;", True),
    ("NOCONTENT;", True),
    ("@x = Agent.GetSummary(); SELECT * FROM @x;", False),  # SQL: unbounded work
    ("@x = Agent.GetSummary(); FOREACH @r IN @x DO @y = Agent.GetSummary(); DONE;", False),
    ("@x = Device.GetSummary();", False),  # resolves the FQDN: may block on DNS
    ('@x = NativeServices.RunCommand(CommandLine: "true");', False),
    ("@x = Agent.GetSummary(); IF (@x) @y = Device.GetDisks(); ENDIF;", False),  # a slow call inside IF
])
def test_which_programs_are_quick(payload: str, quick: bool) -> None:
    assert compile_scale(payload).quick is quick


@pytest.fixture()
def agent_dir(tmp_path: Path) -> Path:
    pki = Pki(tmp_path / "pki")
    pki.create("localhost")
    d = tmp_path / "agent"
    d.mkdir()
    pki.issue("dev-1", d / "device.crt", d / "device.key")
    shutil.copy(pki.ca_crt, d / "ca.crt")
    shutil.copy(pki.signing_pub, d / "signing.pub")
    write_conf(d, device_name="dev-1", switches="localhost:1", background_url="https://localhost:1/Background")
    return d


def _run(agent_dir: Path, payload: str, kind: str = "question") -> tuple[p.Response, list[str]]:
    """Execute one verified body the way the agent does; returns the response it sends and the
    names of the threads the evaluator ran on."""
    cfg = load_agent_config(agent_dir)
    threads: list[str] = []
    real = runtime.run_instruction

    def spy(*args, **kw):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return real(*args, **kw)

    async def go() -> list[p.Response]:
        agent = runtime.Agent(cfg)
        sent: list[p.Response] = []
        agent.send = lambda m: sent.append(m) or True  # type: ignore[method-assign]
        runtime.run_instruction = spy  # type: ignore[assignment]
        try:
            body = p.InstructionBody(id=5, name="q", kind=kind, payload=payload, parameters={},  # type: ignore[arg-type]
                                     issued_at=time.time(), expires_at=time.time() + 60)
            await agent._execute(body)
        finally:
            runtime.run_instruction = real  # type: ignore[assignment]
        return sent

    sent = asyncio.run(go())
    assert len(sent) == 1
    return sent[0], threads


def test_a_quick_question_runs_on_the_event_loop(agent_dir: Path) -> None:
    r, threads = _run(agent_dir, "@x = Agent.GetSummary();")
    assert r.status == "success" and r.columns[:2] == ["AgentVersion", "DeviceName"]
    assert threads == ["MainThread"]
    assert r.elapsed_ms is not None and r.elapsed_ms >= 0


def test_anything_else_runs_on_a_worker_thread(agent_dir: Path) -> None:
    r, threads = _run(agent_dir, "@x = Agent.GetSummary(); SELECT AgentVersion FROM @x;")
    assert r.status == "success" and r.columns == ["AgentVersion"]
    assert len(threads) == 1 and threads[0] != "MainThread"


def test_a_large_payload_is_compiled_on_the_worker_thread_too(agent_dir: Path) -> None:
    payload = "@x = Agent.GetSummary();" + " " * runtime.QUICK_PAYLOAD
    r, threads = _run(agent_dir, payload)
    assert r.status == "success"
    assert len(threads) == 1 and threads[0] != "MainThread"


def test_a_payload_that_does_not_compile_is_an_error_response_without_running(agent_dir: Path) -> None:
    r, threads = _run(agent_dir, "@x = Agent.NoSuchMethod();")
    assert r.status == "error" and "NoSuchMethod" in (r.error or "") and r.error_line == 1
    assert threads == []  # never reached the evaluator
    r, threads = _run(agent_dir, 'Tagging.Set(Name: "a", Value: "b");')  # an action sent as a question
    assert r.status == "error" and "refused" in (r.error or "")
    assert threads == []


def _body(payload: str, expires_in: float = 60) -> p.InstructionBody:
    return p.InstructionBody(id=9, name="q", kind="question", payload=payload, parameters={},
                             issued_at=time.time(), expires_at=time.time() + expires_in)


def test_answers_fit_the_wire_blobs_as_hex_and_errors_without_nul(agent_dir: Path) -> None:
    """Whatever a payload returns, the response decodes at the Switch: a blob travels as hex text,
    and an error text loses its NUL bytes (which PostgreSQL's text refuses)."""
    cfg = load_agent_config(agent_dir)
    r = runtime.run_instruction(_body("SELECT zeroblob(2) AS B, x'00ff' AS C, 'a' || char(0) || 'b' AS D;"), cfg)
    assert r.status == "success" and r.rows == [["0000", "00ff", "a\x00b"]]
    assert p.decode_from_agent(p.encode(r)) == r
    r = runtime.run_instruction(_body("SELECT * FROM nosuch" + "\x00"), cfg)
    assert r.status == "error" and "\x00" not in (r.error or "")
    assert p.decode_from_agent(p.encode(r)) == r


def test_a_payload_stops_when_its_gather_window_closes(agent_dir: Path) -> None:
    cfg = load_agent_config(agent_dir)
    slow = "SELECT MAX(x) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT x FROM c);"
    t = time.monotonic()
    r = runtime.run_instruction(_body(slow, expires_in=1.5), cfg)
    assert r.status == "error" and time.monotonic() - t < 10, r


def test_a_cancel_from_the_switch_stops_the_running_payload(agent_dir: Path) -> None:
    """The session's Stop effect (a Cancel from the Switch) reaches the payload on its worker thread."""
    from quanta.protocol.agent_session import Stop

    cfg = load_agent_config(agent_dir)
    slow = "SELECT MAX(x) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT x FROM c);"

    async def go() -> tuple[list[p.Response], float]:
        agent = runtime.Agent(cfg)
        sent: list[p.Response] = []
        agent.send = lambda m: sent.append(m) or True  # type: ignore[method-assign]
        task = asyncio.create_task(agent._execute(_body(slow)))
        t = time.monotonic()
        while not task.done() and time.monotonic() - t < 20:  # a Stop before the payload starts does nothing
            agent.apply([Stop([9])])
            await asyncio.sleep(0.05)
        await asyncio.wait_for(task, 10)
        return sent, time.monotonic() - t

    [r], took = asyncio.run(go())
    assert r.status == "error" and "cancelled" in (r.error or "").lower() and took < 8, (r, took)
