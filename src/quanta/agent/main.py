"""``quanta agent AGENTDIR``."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from quanta.runtime import setup_logging, wait_for_signal

from .config import load_agent_config
from .runtime import Agent


def cli_main(argv: list[str]) -> int:
    """``quanta agent AGENTDIR [--log-level LEVEL]``, parsed without loading the server-side CLI.

    The agent runs on every device, so it stays small: no web framework, no SQL toolkit, and the
    standard asyncio loop (uvloop pays off for thousands of connections, an agent holds one).
    """
    import argparse

    from .config import AgentConfigError

    ap = argparse.ArgumentParser(prog="quanta agent", description="Run a Quanta agent.")
    ap.add_argument("agent_dir", type=Path, help="agent directory from 'quanta enroll'")
    ap.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    args = ap.parse_args(argv)
    try:
        asyncio.run(serve(args.agent_dir, args.log_level))
    except AgentConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


async def serve(root: Path, log_level: str = "INFO") -> None:
    cfg = load_agent_config(root)
    setup_logging(f"agent:{cfg.device_name}", log_level)
    cfg.state.mkdir(parents=True, exist_ok=True)
    agent = Agent(cfg)
    stop = asyncio.Event()
    waiter = asyncio.create_task(wait_for_signal())
    waiter.add_done_callback(lambda _: stop.set())
    await agent.run(stop)
