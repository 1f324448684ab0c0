"""Ports: the firewall tables generated from the live configuration (``quanta ports``), the
preflight checks (``quanta preflight``) and docs/ports.md. See :mod:`quanta.ports.model`."""

from .model import TOPOLOGIES, LiveConfig, Row, build_table, internal_rows, load_live

__all__ = ["TOPOLOGIES", "LiveConfig", "Row", "build_table", "internal_rows", "load_live"]
