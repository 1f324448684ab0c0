"""The Switch's link to the Core: dialled again with exponential back-off, jitter and a cap
(tenacity), and its failures logged once per interval with a count, not once per attempt."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from conftest import free_port
from quanta.pki import Pki
from quanta.switch import service
from quanta.switch.service import LINK_RETRY_JITTER, LINK_RETRY_MIN, Switch


async def _dial_times(pki: Pki, seconds: float) -> tuple[list[float], Switch]:
    """Run a Switch's core link for ``seconds`` against a port that accepts each connection and
    closes it at once (a Core that is not there, or not itself); when each attempt came."""
    times: list[float] = []

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        times.append(time.monotonic())
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sw = Switch(name="s1", host="localhost", port=free_port(), bind_host="127.0.0.1", pki=pki,
                core_url=f"ws://127.0.0.1:{port}/Core/switch", secret=b"k" * 32, max_message_bytes=1 << 20)
    task = asyncio.create_task(sw._core_link())
    await asyncio.sleep(seconds)
    task.cancel()
    server.close()
    sw.link_failures.close()
    return times, sw


def test_the_core_link_backs_off_exponentially_with_jitter_and_logs_once(pki: Pki,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "quanta.switch")
    times, sw = asyncio.run(_dial_times(pki, 3.5))
    gaps = [b - a for a, b in zip(times, times[1:])]
    # 0.2, 0.4, 0.8, 1.6 s apart (each plus up to LINK_RETRY_JITTER): 4 or 5 attempts in 3.5 s
    assert 3 <= len(times) <= 6, gaps
    for i, gap in enumerate(gaps):
        want = LINK_RETRY_MIN * 2 ** i
        assert want * 0.9 <= gap <= want + LINK_RETRY_JITTER + 0.5, (i, gaps)
    assert sw._link_failed == len(times)
    lines = [r.getMessage() for r in caplog.records if "core link down" in r.getMessage()]
    assert len(lines) == 1, lines  # the rest are counted, for the next line of the interval
    assert "retrying in" in lines[0] and "attempt 1" in lines[0], lines


def test_the_core_link_back_off_is_capped(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "LINK_RETRY_MAX", 0.3)
    times, _ = asyncio.run(_dial_times(pki, 3.0))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) >= 6, gaps  # uncapped, 3 s would hold 4 attempts
    assert all(g <= 0.3 + LINK_RETRY_JITTER + 0.3 for g in gaps[2:]), gaps
    assert len({round(g, 3) for g in gaps[2:]}) > 1, gaps  # jittered: not one fixed delay
