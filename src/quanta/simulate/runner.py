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
from .fleet import C, COUNTERS, GAUGES, SimConfig, worker_main

PER_PROCESS_MAX = 12_000  # leaves headroom under a 20,000 open-file limit
FD_HEADROOM = 500  # descriptors a worker keeps for itself (certificates, logs, the event loop)
# Of the kernel's ephemeral port range, the share the simulator plans to use: the rest is for
# connections still in TIME_WAIT after a reconnect, and for every other program on the machine.
PORT_SHARE = 0.9


class PlanError(ValueError):
    """The fleet does not fit the processes, source addresses or ports asked for; the message says
    what to change."""


def ephemeral_ports() -> int:
    """How many ports the kernel's ephemeral range holds (net.ipv4.ip_local_port_range)."""
    try:
        lo, hi = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return hi - lo + 1
    except (OSError, ValueError):
        return 28_232  # Linux's default range, 32768-60999


def open_file_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft > 0 else 1 << 20


def per_process_limit(nofile: int) -> int:
    return min(PER_PROCESS_MAX, max(100, nofile - FD_HEADROOM))


def default_processes(n: int, *, source_ip: str | None = None, nofile: int | None = None,
                      ports: int | None = None) -> int:
    """Enough worker processes that none runs out of descriptors and, with ``source_ip`` (one source
    address per process), none runs out of ports: a connection from an address bound before the
    connect holds its port against every destination."""
    per = per_process_limit(open_file_limit() if nofile is None else nofile)
    if source_ip is not None:
        per = min(per, int((ephemeral_ports() if ports is None else ports) * PORT_SHARE))
    return max(1, math.ceil(n / per))


def source_addresses(source_ip: str | None, processes: int) -> list[str] | None:
    """Worker W's source address, source_ip + W; None without --source-ip."""
    if source_ip is None:
        return None
    import ipaddress

    first = ipaddress.IPv4Address(source_ip)
    try:
        last = first + (processes - 1)
    except ipaddress.AddressValueError:
        raise PlanError(f"--source-ip {source_ip} + {processes - 1} workers runs past 255.255.255.255") from None
    if first.is_loopback and not last.is_loopback:
        raise PlanError(f"--source-ip {source_ip}: {processes} workers need {processes} addresses, but "
                        f"{last} is outside the loopback network 127.0.0.0/8; start lower")
    return [str(first + w) for w in range(processes)]


def check_plan(n: int, processes: int, switches: int, source_ip: str | None, *, nofile: int, ports: int) -> None:
    """Refuse, with what to change, a fleet that some process or source address cannot carry: more
    devices in one process than its open-file limit, more connections from one source address than
    the ephemeral port range (per Switch port without --source-ip: the kernel then picks the address
    and the port per destination). Pure."""
    if n <= 0 or processes <= 0:
        raise PlanError("nothing to simulate: no devices or no processes")
    per_proc = math.ceil(n / processes)
    limit = nofile - FD_HEADROOM
    if per_proc > limit:
        raise PlanError(f"{n} devices over {processes} processes is {per_proc} connections per process, more than "
                        f"the open-file limit ({nofile}, less {FD_HEADROOM} kept spare) allows; use --processes "
                        f"{math.ceil(n / max(1, limit))} or more, or raise the limit (ulimit -n)")
    usable = int(ports * PORT_SHARE)
    if source_ip is not None:
        if per_proc > usable:
            raise PlanError(f"{per_proc} connections per source address ({n} devices over {processes} processes, "
                            f"one address each from --source-ip {source_ip}) exceed {usable} ports "
                            f"({PORT_SHARE:.0%} of the {ports}-port ephemeral range); use --processes "
                            f"{math.ceil(n / usable)} or more")
        source_addresses(source_ip, processes)
    else:
        per_pair = math.ceil(n / max(1, switches))
        if per_pair > usable:
            raise PlanError(f"{per_pair} connections from one source address to one Switch port ({n} devices over "
                            f"{switches} Switches, no --source-ip) exceed {usable} ports ({PORT_SHARE:.0%} of the "
                            f"{ports}-port ephemeral range); pass --source-ip 127.0.0.2 (one address per process) "
                            f"or add Switches")


def check_addresses(addresses: list[str]) -> None:
    """Every source address can be bound here (a loopback address always can; another must be this
    host's)."""
    import socket

    for a in addresses:
        with socket.socket() as s:
            try:
                s.bind((a, 0))
            except OSError as e:
                raise PlanError(f"source address {a} cannot be bound ({e.strerror}): each simulator process needs "
                                f"its own address, --source-ip and the next ones; use 127.0.0.2 on loopback") from None


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
        self.processes = processes or default_processes(len(self.names), source_ip=cfg.source_ip)
        check_plan(len(self.names), self.processes, len(fleet.switches), cfg.source_ip, nofile=open_file_limit(),
                   ports=ephemeral_ports())
        addresses = source_addresses(cfg.source_ip, self.processes)
        if addresses:
            check_addresses(addresses)
        self.ctx = mp.get_context("spawn")
        self.counters = self.ctx.RawArray("q", len(COUNTERS) * self.processes)
        self.stop_event = self.ctx.Event()
        self.procs: list[Any] = []
        self.log_level = log_level
        self.started = 0.0
        self.connected_at: float | None = None

    def totals(self) -> dict[str, int]:
        k = len(COUNTERS)  # gauges (the handshake windows) add up too: the fleet's window
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


__all__ = ["C", "GAUGES", "FleetRunner", "PlanError", "Summary", "check_plan", "default_processes", "run_simulation"]
