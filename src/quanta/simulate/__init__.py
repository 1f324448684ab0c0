"""Fleet simulator: many protocol-true agents per process, spread over several processes.

Public interface: :func:`enroll_batch` (one certificate per simulated device, a fleet
directory), :class:`SimConfig` (synthetic answers, latency, failure and churn), and
:class:`FleetRunner` / :func:`run_simulation` (start, watch, stop). ``quanta enroll-batch`` and
``quanta simulate`` are in :mod:`quanta.simulate.cli`.
"""

from .enroll import Fleet, enroll_batch
from .fleet import SimConfig, latency_sampler
from .runner import FleetRunner, Summary, run_simulation

__all__ = ["Fleet", "FleetRunner", "SimConfig", "Summary", "enroll_batch", "latency_sampler", "run_simulation"]
