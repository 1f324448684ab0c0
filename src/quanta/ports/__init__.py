"""Ports: the firewall tables generated from the live configuration (``quanta ports``), the
preflight checks (``quanta preflight``) and docs/ports.md. See :mod:`quanta.ports.model`."""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use, so that `quanta --help` and `quanta ask` do not pay for this package.
_WHERE = {
    "LiveConfig": ".model",
    "Row": ".model",
    "TOPOLOGIES": ".model",
    "build_table": ".model",
    "internal_rows": ".model",
    "load_live": ".model",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
