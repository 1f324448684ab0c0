"""Fleet simulator: many protocol-true agents per process, spread over several processes.

Public interface: :func:`enroll_batch` (one certificate per simulated device, a fleet
directory), :class:`SimConfig` (synthetic answers, latency, failure and churn), and
:class:`FleetRunner` / :func:`run_simulation` (start, watch, stop). ``quanta enroll-batch`` and
``quanta simulate`` are in :mod:`quanta.simulate.cli`.
"""

from __future__ import annotations

from quanta.lazy import lazy_exports

# Imported on first use, so that `quanta --help` and `quanta ask` do not pay for this package.
__all__, __getattr__ = lazy_exports(__name__, {
    "Fleet": ".enroll",
    "FleetRunner": ".runner",
    "SimConfig": ".fleet",
    "Summary": ".runner",
    "enroll_batch": ".enroll",
    "latency_sampler": ".fleet",
    "run_simulation": ".runner",
})
