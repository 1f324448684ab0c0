"""``quanta agent AGENTDIR``."""

from __future__ import annotations

import asyncio
from pathlib import Path

from quanta.runtime import setup_logging, wait_for_signal

from .config import load_agent_config
from .runtime import Agent


async def serve(root: Path, log_level: str = "INFO") -> None:
    cfg = load_agent_config(root)
    setup_logging(f"agent:{cfg.device_name}", log_level)
    cfg.state.mkdir(parents=True, exist_ok=True)
    agent = Agent(cfg)
    stop = asyncio.Event()
    waiter = asyncio.create_task(wait_for_signal())
    waiter.add_done_callback(lambda _: stop.set())
    await agent.run(stop)
