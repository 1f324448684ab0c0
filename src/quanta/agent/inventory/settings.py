"""The Activity Record's settings in ``agent.conf`` (``Module.Inventory.*``; keys are
case-insensitive, as in the model's client configuration)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from quanta.scale.tables import GRANULARITIES, SOURCES

PREFIX = "module.inventory."
DEFAULT_INTERVALS = {"Process": 5.0, "TCP": 5.0, "Software": 60.0, "DevicePerformance": 60.0, "ProcessUsage": 60.0,
                     "Logon": 30.0, "Boot": 30.0}
PROCESS_METHODS = ("auto", "netlink", "poll")
MIB = 1024 * 1024


class InventoryConfigError(ValueError):
    pass


@dataclass
class SourceSettings:
    enabled: bool = True
    interval: float = 5.0  # polling interval, seconds
    retention: dict[str, tuple[float, int]] = field(default_factory=dict)  # granularity -> (days, rows)


@dataclass
class InventorySettings:
    enabled: bool = False
    max_size_bytes: int = 100 * MIB
    flush_seconds: float = 2.0  # a batch is written at least this often
    batch_rows: int = 1000  # ... or as soon as it holds this many rows
    queue_rows: int = 20_000  # rows waiting for the writer; past it new rows are dropped and counted
    maintenance_seconds: float = 60.0  # aggregation and retention run this often
    aggregation_grace_seconds: float = 120.0  # a period is aggregated this long after it ends
    process_method: str = "auto"
    sources: dict[str, SourceSettings] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def source(self, name: str) -> SourceSettings:
        return self.sources[name]


def _bool(key: str, value: str) -> bool:
    low = value.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise InventoryConfigError(f"{key}={value!r} is not true or false")


def _number(key: str, value: str, lo: float, hi: float) -> float:
    try:
        n = float(value)
    except ValueError:
        raise InventoryConfigError(f"{key}={value!r} is not a number") from None
    if not math.isfinite(n) or not lo <= n <= hi:
        raise InventoryConfigError(f"{key}={value!r} must be between {lo:g} and {hi:g}")
    return n


def parse_settings(values: dict[str, str]) -> InventorySettings:
    """The settings from ``agent.conf``'s values; raises :class:`InventoryConfigError` for a bad
    value of a known key. Unknown ``Module.Inventory.*`` keys are reported in ``warnings``."""
    s = InventorySettings()
    for src in SOURCES:
        s.sources[src.name] = SourceSettings(interval=DEFAULT_INTERVALS[src.name], retention=dict(src.retention))
    names = {src.name.lower(): src.name for src in SOURCES}
    grans = {g.lower(): g for g in GRANULARITIES}
    for raw_key, value in values.items():
        key = raw_key.strip().lower()
        if not key.startswith(PREFIX):
            continue
        rest = key[len(PREFIX):].split(".")
        if rest == ["enabled"]:
            s.enabled = _bool(raw_key, value)
        elif rest == ["maxsizemb"]:
            s.max_size_bytes = int(_number(raw_key, value, 1, 1024 * 1024) * MIB)
        elif rest == ["flushintervalseconds"]:
            s.flush_seconds = _number(raw_key, value, 0.05, 3600)
        elif rest == ["batchrows"]:
            s.batch_rows = int(_number(raw_key, value, 1, 100_000))
        elif rest == ["queuerows"]:
            s.queue_rows = int(_number(raw_key, value, 1, 10_000_000))
        elif rest == ["maintenanceintervalseconds"]:
            s.maintenance_seconds = _number(raw_key, value, 1, 86400)
        elif len(rest) >= 2 and rest[0] in names:
            src = s.sources[names[rest[0]]]
            if rest[1:] == ["enabled"]:
                src.enabled = _bool(raw_key, value)
            elif rest[1:] == ["pollintervalseconds"]:
                src.interval = _number(raw_key, value, 0.1, 86400)
            elif rest[0] == "process" and rest[1:] == ["method"]:
                if value.strip().lower() not in PROCESS_METHODS:
                    raise InventoryConfigError(f"{raw_key}={value!r} is not one of {', '.join(PROCESS_METHODS)}")
                s.process_method = value.strip().lower()
            elif len(rest) == 3 and rest[1] in grans and rest[2] in ("maxagedays", "maxrows"):
                g = grans[rest[1]]
                days, rows = src.retention[g]
                if rest[2] == "maxagedays":
                    days = _number(raw_key, value, 0.01, 100 * 366)
                else:
                    rows = int(_number(raw_key, value, 1, 100_000_000))
                src.retention[g] = (days, rows)
            else:
                s.warnings.append(f"unknown setting {raw_key} ignored")
        else:
            s.warnings.append(f"unknown setting {raw_key} ignored")
    return s
