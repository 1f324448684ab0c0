"""One router per resource of the Consumer API; ``create_app`` includes them all (:data:`ALL`)."""

from __future__ import annotations

from . import auth, content, definitions, devices, export, health, instructions, packs, results, switches

ALL = (health.router, auth.router, instructions.router, results.router, export.router, content.router, definitions.router,
       packs.router, devices.router, switches.router)
