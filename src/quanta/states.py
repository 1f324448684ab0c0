"""Instruction and per-device state names (no I/O, cheap to import: the ``quanta ask`` client
uses them without loading the SQL toolkit or the wire protocol)."""

from __future__ import annotations

# Workflow states of an instruction before the Core takes over ("active", then "finished"/"cancelled").
# An action leaves PENDING_APPROVAL by exactly one compare-and-set that also writes who decided:
# to READY (approved, signed; SCHEDULED if its time has not come), REJECTED, APPROVAL_EXPIRED or
# CANCELLED. READY is also "approved, waiting for the Core" while the Core cannot be reached.
NEW = "new"  # stored, not yet signed
PENDING_APPROVAL = "pending_approval"
SCHEDULED = "scheduled"
REJECTED = "rejected"
APPROVAL_EXPIRED = "approval_expired"
CANCELLED = "cancelled"
READY = "created"
# Approved and signed (READY) but the Core never took it before its gather window ended (it was
# unavailable): final, never run; ``issue_error`` says why. Also cancelled straight from READY.
NEVER_ISSUED = "expired"
# No further change will happen to an instruction in one of these.
DONE_STATES = ("finished", CANCELLED, REJECTED, APPROVAL_EXPIRED, NEVER_ISSUED)

# A targeted device's state for one instruction.
FINAL_STATES = ("success", "nocontent", "error", "notapplicable", "offline", "expired")
LIVE_STATES = ("pending", "sent")
ALL_STATES = ("pending", "sent", *FINAL_STATES)
