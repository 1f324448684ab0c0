"""Integrate Agent: connectors that import device inventory (file, SQL database, LDAP directory) into the
master ``devices`` table, with ``source`` set to the connector's name.

Public interface: :class:`DeviceRecord`, :func:`load_config` / :class:`IntegrateConfig` (``DIR/integrate.toml``),
:class:`IntegrateAgent` (runs connectors; ``run_sync`` is the whole read-then-apply step), and
:func:`request` (the client of the agent's WebSocket on the integrate port).
"""

from __future__ import annotations

from quanta.lazy import lazy_exports

# Imported on first use, so that `quanta --help` and `quanta ask` do not pay for this package.
__all__, __getattr__ = lazy_exports(__name__, {
    "ConfigError": ".config",
    "DeviceRecord": ".connectors",
    "IntegrateAgent": ".service",
    "IntegrateConfig": ".config",
    "SourceError": ".connectors",
    "load_config": ".config",
    "request": ".service",
})
