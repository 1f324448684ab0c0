"""Fleet simulator: many protocol-true agents per process, spread over several processes.

Public interface: :func:`enroll_batch` (one certificate per simulated device, a fleet
directory), :class:`SimConfig` (synthetic answers, latency, failure and churn), and
:class:`FleetRunner` / :func:`run_simulation` (start, watch, stop). ``quanta enroll-batch`` and
``quanta simulate`` are in :mod:`quanta.simulate.cli`.
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use, so that `quanta --help` and `quanta ask` do not pay for this package.
_WHERE = {
    "Fleet": ".enroll",
    "FleetRunner": ".runner",
    "SimConfig": ".fleet",
    "Summary": ".runner",
    "enroll_batch": ".enroll",
    "latency_sampler": ".fleet",
    "run_simulation": ".runner",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
