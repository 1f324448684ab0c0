"""One router per resource of the Consumer API; ``create_app`` includes them all (:data:`ALL`)."""

from __future__ import annotations

from . import (audit, auth, content, definitions, devices, export, groups, health, instructions, methods, packs,
               results, switches, users)

ALL = (health.router, auth.router, instructions.router, results.router, export.router, content.router,
       definitions.router, packs.router, devices.router, switches.router, users.router, groups.router, audit.router,
       methods.router)
