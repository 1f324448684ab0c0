"""Role names and what each grants (no I/O, cheap to import: the CLI lists them in its help)."""

from __future__ import annotations

from typing import Literal

FULL_ADMIN = "Full Administrator"
ROLES = (FULL_ADMIN, "Questioner", "Actioner", "Approver", "Viewer", "Group Administrator")
Permission = Literal["ask", "act", "approve", "view", "groups"]

GRANTS: dict[str, frozenset[str]] = {
    FULL_ADMIN: frozenset({"ask", "act", "approve", "view", "groups"}),
    "Questioner": frozenset({"ask", "view"}),
    "Actioner": frozenset({"ask", "act", "view"}),
    "Approver": frozenset({"approve", "view"}),
    "Viewer": frozenset({"view"}),
    "Group Administrator": frozenset({"groups", "view"}),
}
