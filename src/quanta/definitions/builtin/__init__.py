"""Product packs whose source ships with Quanta (signed by the operator's publisher key at build).

``pack_source(name)`` is the directory to give ``quanta pack build``; see docs/operations.md.
"""

from __future__ import annotations

from pathlib import Path

PACKS = {"quanta_inventory": "Quanta Inventory"}


def pack_source(name: str = "quanta_inventory") -> Path:
    """The source directory (pack.toml, definitions/) of a built-in pack."""
    if name not in PACKS:
        raise KeyError(f"no built-in pack {name!r} (known: {', '.join(PACKS)})")
    return Path(__file__).parent / name
