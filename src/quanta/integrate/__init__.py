"""Integrate Agent: connectors that import device inventory (file, SQL database, LDAP directory) into the
master ``devices`` table, with ``source`` set to the connector's name.

Public interface: :class:`DeviceRecord`, :func:`load_config` / :class:`IntegrateConfig` (``DIR/integrate.toml``),
:class:`IntegrateAgent` (runs connectors; ``run_sync`` is the whole read-then-apply step), and
:func:`request` (the client of the agent's WebSocket on the integrate port).
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use, so that `quanta --help` and `quanta ask` do not pay for this package.
_WHERE = {
    "ConfigError": ".config",
    "DeviceRecord": ".connectors",
    "IntegrateAgent": ".service",
    "IntegrateConfig": ".config",
    "SourceError": ".connectors",
    "load_config": ".config",
    "request": ".service",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
