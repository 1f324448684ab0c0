"""``quanta agent AGENTDIR``."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from pathlib import Path

from quanta.runtime import setup_logging, wait_for_signal

from .config import load_agent_config
from .runtime import MAX_PARALLEL, Agent

log = logging.getLogger("quanta.agent")

# After SIGTERM/SIGINT, running payloads are told to stop (SQL at its next progress check, method
# loops and child processes at their next check); whatever still runs after this grace (a worker
# blocked in a call that cannot be interrupted) does not hold the process: it exits anyway.
STOP_GRACE_SECONDS = 3.0


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


def limit_payload_memory() -> int:
    """Cap SQLite's memory in this process to what MAX_PARALLEL payloads may use."""
    from quanta.scale import limit_process_memory

    return limit_process_memory(MAX_PARALLEL)


def begin_stop(grace: float = STOP_GRACE_SECONDS) -> threading.Timer:
    """Stop every running payload and make sure the process is gone ``grace`` seconds from now.

    The hard exit flushes the logs first; the journal is an append-only log written with one
    ``write`` per record, so it loses at most the record being written.
    """
    from quanta.scale import stop_all

    stop_all()

    def hard_exit() -> None:
        busy = [t.name for t in threading.enumerate()
                if t is not threading.current_thread() and t is not threading.main_thread() and not t.daemon]
        log.warning("still running %gs after the stop signal (%s): exiting now", grace,
                    ", ".join(busy) or "shutdown")
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(grace, hard_exit)
    timer.name = "quanta-hard-exit"
    timer.daemon = True
    timer.start()
    return timer


async def serve(root: Path, log_level: str = "INFO") -> None:
    cfg = load_agent_config(root)
    setup_logging(f"agent:{cfg.device_name}", log_level)
    cfg.state.mkdir(parents=True, exist_ok=True)
    heap = limit_payload_memory()
    log.debug("SQLite hard heap limit %d bytes", heap)
    agent = Agent(cfg)
    stop = asyncio.Event()

    def on_signal(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        log.info("stopping: running payloads are told to stop; exit within %gs", STOP_GRACE_SECONDS)
        begin_stop()
        stop.set()

    waiter = asyncio.create_task(wait_for_signal())
    waiter.add_done_callback(on_signal)
    await agent.run(stop)
