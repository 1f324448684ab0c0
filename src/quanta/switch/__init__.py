"""Switch: the agents' persistent wss connections, one process per core."""

from .service import Switch

__all__ = ["Switch"]
