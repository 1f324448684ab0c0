"""The agent's protocol behaviour (:mod:`quanta.protocol.agent_session`): a large answer ends its
instruction with an error instead of a frame the Switch refuses, with real agents and a real Switch."""

from __future__ import annotations

import re

from conftest import Server, wait_until
from quanta.client import ConsumerClient
from quanta.protocol import Response
from quanta.protocol.agent_session import bounded

# ~20,000 rows of ~100 bytes: over the Switch's 1 MiB frame limit, inside the row and memory limits.
LARGE = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000) "
         "SELECT x AS N, hex(zeroblob(48)) AS Pad FROM c;")
SMALL = "@x = Agent.GetSummary();"


def test_bounded_replaces_only_what_is_over_the_limit() -> None:
    r = Response(instruction_id=3, status="success", columns=["A"], rows=[["x" * 100]] * 100, elapsed_ms=2.0)
    assert bounded(r, 1 << 20) is r
    e = bounded(r, 1000)
    assert e.status == "error" and e.instruction_id == 3 and e.rows == [] and e.elapsed_ms == 2.0
    assert re.fullmatch(r"result too large: \d+ bytes, limit 1000", e.error or ""), e.error


def test_a_large_answer_is_an_error_and_the_connection_stays(server: Server) -> None:
    names = ("big", "small1", "small2")
    for n in names:
        server.enroll(n)
        server.start_agent(n)
    server.wait_online(set(names))
    with ConsumerClient.for_data_dir(server.root) as api:
        iid = api.issue(LARGE, devices=["big"], instruction_ttl=60)["id"]
        status = api.wait(iid, 60)
        assert status["status"] == "finished" and status["states"] == {"error": 1}, status
        (result,) = api.all_results(iid)
        m = re.fullmatch(r"result too large: (\d+) bytes, limit (\d+)", result["error"] or "")
        assert m and int(m.group(1)) > 20_000 * 100 and int(m.group(2)) == 1024 * 1024, result
        # The same connection answers the next question, as do the other devices.
        iid2 = api.issue(SMALL, instruction_ttl=30)["id"]
        status2 = api.wait(iid2, 30)
        assert status2["status"] == "finished" and status2["states"] == {"success": 3}, status2
    log = server.log_text()
    assert "(device big)" not in log, [line for line in log.splitlines() if "(device big)" in line]  # never closed
    agent_log = server.agent_log("big")
    assert agent_log.count("connected to switch") == 1 and "no connection to switch" not in agent_log, agent_log
    assert f"instruction {iid}: result too large" in agent_log
