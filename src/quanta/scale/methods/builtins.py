"""``$Name`` built-in tables readable in a SELECT."""

from __future__ import annotations

import time
from typing import Callable

import psutil

from ..spec import MethodEnv

SAMPLE_SECONDS = 0.25


def software_performance_live(env: MethodEnv) -> tuple[list[str], list[list[object]]]:
    """CPU use per product (process name) over a short sample, as a percentage of one CPU."""
    first: dict[int, tuple[str, float]] = {}
    for p in psutil.process_iter(["name", "cpu_times"], ad_value=None):
        ct = p.info.get("cpu_times")
        if ct is not None:
            first[p.pid] = (p.info.get("name") or "", ct.user + ct.system)
    t0 = time.monotonic()
    time.sleep(max(0.0, min(SAMPLE_SECONDS, env.remaining() / 4)))
    elapsed = max(time.monotonic() - t0, 1e-6)
    per: dict[str, list[float]] = {}
    for p in psutil.process_iter(["name", "cpu_times", "memory_info"], ad_value=None):
        ct = p.info.get("cpu_times")
        name = p.info.get("name") or ""
        if ct is None:
            continue
        before = first.get(p.pid, (name, ct.user + ct.system))[1]
        mem = p.info.get("memory_info")
        acc = per.setdefault(name, [0.0, 0, 0])
        acc[0] += max(0.0, (ct.user + ct.system - before) / elapsed * 100.0)
        acc[1] += 1
        acc[2] += mem.rss if mem else 0
    rows = [[name, round(v[0], 2), int(v[1]), int(v[2])] for name, v in sorted(per.items())]
    return ["Product", "ProcessorTimePercent", "ProcessCount", "MemoryBytes"], rows


BUILTINS: dict[str, Callable[[MethodEnv], tuple[list[str], list[list[object]]]]] = {
    "SoftwarePerformance_Live": software_performance_live,
}
