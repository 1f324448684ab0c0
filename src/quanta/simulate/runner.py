"""The simulator's parent process: spreads the fleet over worker processes (each below the
per-process open-file limit), shows a progress bar while they connect, optionally writes a
JSON status file for scripts, and prints a one-line summary at the end.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from .enroll import Fleet
from .fleet import C, COUNTERS, SimConfig, worker_main

PER_PROCESS_MAX = 12_000  # leaves headroom under a 20,000 open-file limit


def default_processes(n: int) -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    per = min(PER_PROCESS_MAX, max(100, soft - 500)) if soft > 0 else PER_PROCESS_MAX
    return max(1, math.ceil(n / per))


@dataclass
class Summary:
    devices: int
    processes: int
    switches: int
    connected: int
    connect_seconds: float | None
    totals: dict[str, int]
    elapsed: float

    def line(self) -> str:
        t = self.totals
        ct = f"in {self.connect_seconds:.1f}s ({self.devices / self.connect_seconds:.0f}/s)" \
            if self.connect_seconds else "(not all connected)"
        return (f"simulate: {self.connected}/{self.devices} devices connected {ct} over {self.switches} switches "
                f"by {self.processes} processes; {t['executions']} executed, {t['responses']} responses, "
                f"{t['acks']} acked, {t['resends']} resent, {t['disconnects']} disconnects, "
                f"{t['churned']} churned, {t['resumed']} TLS resumed, {t['connect_failures']} failed connects, "
                f"{t['welcome_timeouts']} never welcomed (retried); "
                f"ran {self.elapsed:.1f}s")


class FleetRunner:
    def __init__(self, fleet: Fleet, cfg: SimConfig, *, count: int | None = None, processes: int | None = None,
                 log_level: str = "WARNING") -> None:
        self.fleet = fleet
        self.cfg = cfg
        self.names = fleet.names[:count] if count else fleet.names
        self.processes = processes or default_processes(len(self.names))
        self.ctx = mp.get_context("spawn")
        self.counters = self.ctx.RawArray("q", len(COUNTERS) * self.processes)
        self.stop_event = self.ctx.Event()
        self.procs: list[Any] = []
        self.log_level = log_level
        self.started = 0.0
        self.connected_at: float | None = None

    def totals(self) -> dict[str, int]:
        k = len(COUNTERS)
        return {name: sum(self.counters[w * k + i] for w in range(self.processes)) for i, name in enumerate(COUNTERS)}

    def start(self) -> None:
        self.started = time.monotonic()
        n, P = len(self.names), self.processes
        cfg_bytes = msgspec.msgpack.encode(self.cfg)
        for w in range(P):
            lo, hi = w * n // P, (w + 1) * n // P
            proc = self.ctx.Process(target=worker_main, name=f"simulate-{w}", daemon=True,
                                    args=(str(self.fleet.root), self.names[lo:hi], lo, cfg_bytes, self.counters,
                                          w * len(COUNTERS), self.stop_event, self.log_level))
            proc.start()
            self.procs.append(proc)

    def poll(self) -> dict[str, int]:
        t = self.totals()
        if self.connected_at is None and t["connected"] >= len(self.names):
            self.connected_at = time.monotonic()
        return t

    def status(self) -> dict[str, Any]:
        t = self.poll()
        return {"devices": len(self.names), "processes": self.processes, "pids": [p.pid for p in self.procs],
                "connect_seconds": (self.connected_at - self.started) if self.connected_at else None,
                "elapsed": time.monotonic() - self.started, "time": time.time(), **t}

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def stop(self) -> Summary:
        t = self.poll()
        self.stop_event.set()
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        return Summary(len(self.names), self.processes, len(self.fleet.switches), t["connected"],
                       (self.connected_at - self.started) if self.connected_at else None, t,
                       time.monotonic() - self.started)


def run_simulation(fleet_root: Path, cfg: SimConfig, *, count: int | None, processes: int | None,
                   duration: float | None, status_file: Path | None, progress: bool, log_level: str) -> Summary:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    fleet = Fleet.load(fleet_root)
    runner = FleetRunner(fleet, cfg, count=count, processes=processes, log_level=log_level)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    runner.start()

    def write_status() -> None:
        if status_file is not None:
            tmp = status_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(runner.status()))
            os.replace(tmp, status_file)

    n = len(runner.names)
    bar = None
    if progress:
        bar = Progress(TextColumn("[bold]connecting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=Console(stderr=True), transient=False)
        bar.start()
        task = bar.add_task("connect", total=n)
    deadline = None if duration is None else time.monotonic() + duration
    try:
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            t = runner.poll()
            if bar is not None:
                bar.update(task, completed=t["connected"])
                if runner.connected_at is not None:
                    bar.stop()
                    bar = None
            write_status()
            if not runner.alive():
                break
            time.sleep(0.05 if runner.connected_at is None else 0.2)
    finally:
        if bar is not None:
            bar.stop()
        summary = runner.stop()
        write_status()
    return summary


__all__ = ["C", "FleetRunner", "Summary", "run_simulation"]
