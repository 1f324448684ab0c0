"""Integrate Agent: connectors that import device inventory (file, SQL database, LDAP directory) into the
master ``devices`` table, with ``source`` set to the connector's name.

Public interface: :class:`DeviceRecord`, :func:`load_config` / :class:`IntegrateConfig` (``DIR/integrate.toml``),
:class:`IntegrateAgent` (runs connectors; ``run_sync`` is the whole read-then-apply step), and
:func:`request` (the client of the agent's WebSocket on the integrate port).
"""

from .config import ConfigError, IntegrateConfig, load_config
from .connectors import DeviceRecord, SourceError

__all__ = ["ConfigError", "IntegrateConfig", "load_config", "DeviceRecord", "SourceError", "IntegrateAgent",
           "request"]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    if name in ("IntegrateAgent", "request"):
        from . import service

        return getattr(service, name)
    raise AttributeError(name)
