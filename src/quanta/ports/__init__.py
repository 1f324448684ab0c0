"""Ports: the firewall tables generated from the live configuration (``quanta ports``), the
preflight checks (``quanta preflight``) and docs/ports.md. See :mod:`quanta.ports.model`."""

from __future__ import annotations

from quanta.lazy import lazy_exports

# Imported on first use, so that `quanta --help` and `quanta ask` do not pay for this package.
__all__, __getattr__ = lazy_exports(__name__, {
    "LiveConfig": ".model",
    "Row": ".model",
    "TOPOLOGIES": ".model",
    "build_table": ".model",
    "internal_rows": ".model",
    "load_live": ".model",
})
