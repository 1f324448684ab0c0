"""Schema of the Master and Responses databases (SQLAlchemy Core).

Migrations under ``migrations/`` create exactly these tables; a test checks they agree.
"""

from __future__ import annotations

import sqlalchemy as sa

master = sa.MetaData()
responses = sa.MetaData()

users = sa.Table(
    "users", master,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.String(128), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(256), nullable=False),
    sa.Column("role", sa.String(64), nullable=False),
    sa.Column("email", sa.String(256), nullable=True),
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=True),
    sa.Column("password_changed_at", sa.Float, nullable=True),
)

# Signed-in sessions (quanta.accounts). Only the SHA-256 of the bearer token is stored. The token
# expires ``expires_at`` (sliding: renewed while in use) and never after ``absolute_expires_at``.
sessions = sa.Table(
    "sessions", master,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("source", sa.String(64), nullable=False, server_default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_used_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("absolute_expires_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
)
sa.Index("ix_sessions_token_hash", sessions.c.token_hash, unique=True)
sa.Index("ix_sessions_user", sessions.c.user_id)

# Failed login attempts (and ``pending`` ones, whose password is being checked), counted per user
# name and per source address within the lockout window; rows older than the window are purged.
login_failures = sa.Table(
    "login_failures", master,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("username", sa.String(128), nullable=True),  # null: a name that cannot exist (invalid)
    sa.Column("source", sa.String(64), nullable=False),
    sa.Column("pending", sa.Boolean, nullable=False, server_default=sa.false()),
)
sa.Index("ix_login_failures_user", login_failures.c.username, login_failures.c.at)
sa.Index("ix_login_failures_source", login_failures.c.source, login_failures.c.at)
sa.Index("ix_login_failures_at", login_failures.c.at)

# Login locks: kind "user" (subject: a user name, known or not) or "source" (an address).
login_locks = sa.Table(
    "login_locks", master,
    sa.Column("kind", sa.String(8), primary_key=True),
    sa.Column("subject", sa.String(128), primary_key=True),
    sa.Column("locked_at", sa.Float, nullable=False),
    sa.Column("locked_until", sa.Float, nullable=False),
    sa.Column("failures", sa.Integer, nullable=False),
)
sa.Index("ix_login_locks_until", login_locks.c.locked_until)

devices = sa.Table(
    "devices", master,
    sa.Column("device_id", sa.String(255), primary_key=True),
    sa.Column("fqdn", sa.String(255), nullable=False, server_default=""),
    sa.Column("os", sa.String(255), nullable=False, server_default=""),
    sa.Column("agent_version", sa.String(64), nullable=False, server_default=""),
    sa.Column("tags", sa.JSON, nullable=False, default=dict),
    sa.Column("switch", sa.String(128), nullable=True),
    sa.Column("address", sa.String(128), nullable=False, server_default=""),
    sa.Column("online", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("cert_serial", sa.String(64), nullable=True),
    sa.Column("revoked", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("first_seen", sa.Float, nullable=True),
    sa.Column("last_seen", sa.Float, nullable=True),
    # null: known from an agent (enrolment/hello); otherwise the Integrate connector that imported it
    sa.Column("source", sa.String(128), nullable=True),
)

# Every certificate issued to a device (its device certificate and its interaction-port certificate,
# and every older one a --replace superseded), so revoking a device revokes them all. Kept apart
# from ``devices`` (no foreign key): a deleted device row must not take its revocations with it.
device_certificates = sa.Table(
    "device_certificates", master,
    sa.Column("serial", sa.String(64), primary_key=True),  # hex, as on the CRL index
    sa.Column("device_id", sa.String(255), nullable=False),
    sa.Column("purpose", sa.String(16), nullable=False),  # quanta.pki.Purpose: "device" | "interaction"
    sa.Column("issued_at", sa.Float, nullable=True),  # null: recorded from devices.cert_serial by the migration
    sa.Column("revoked_at", sa.Float, nullable=True),
)
sa.Index("ix_device_certificates_device", device_certificates.c.device_id)

# The seed's table: a Switch's client port lives in SwitchConfiguration.Port.
switch_configuration = sa.Table(
    "SwitchConfiguration", master,
    sa.Column("Name", sa.String(128), primary_key=True),
    sa.Column("Host", sa.String(255), nullable=False),
    sa.Column("Port", sa.Integer, nullable=False),
    sa.Column("Enabled", sa.Boolean, nullable=False, server_default=sa.true()),
)

instructions = sa.Table(
    "instructions", master,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("parameters", sa.JSON, nullable=False, default=dict),
    sa.Column("scope", sa.JSON, nullable=True),  # list of device ids, or null for all
    sa.Column("created_by", sa.String(128), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("issued_at", sa.Float, nullable=True),
    sa.Column("expires_at", sa.Float, nullable=True),
    sa.Column("response_expires_at", sa.Float, nullable=True),
    sa.Column("status", sa.String(16), nullable=False),  # created, active, finished, cancelled
    sa.Column("body", sa.LargeBinary, nullable=True),  # signed InstructionBody (msgpack)
    sa.Column("signature", sa.LargeBinary, nullable=True),
    sa.Column("targeted", sa.Integer, nullable=False, server_default="0"),
    # Coordinator workflow (actions): who decided, when, why; TTLs to apply when finally issued.
    sa.Column("instruction_ttl", sa.Integer, nullable=True),
    sa.Column("response_ttl", sa.Integer, nullable=True),
    sa.Column("scheduled_at", sa.Float, nullable=True),
    sa.Column("approval_expires_at", sa.Float, nullable=True),
    sa.Column("decided_by", sa.String(128), nullable=True),
    sa.Column("decided_at", sa.Float, nullable=True),
    sa.Column("decision_reason", sa.Text, nullable=True),
    sa.Column("instruction_set", sa.String(128), nullable=True),  # of its definition; null for raw SCALE
    # N-of-M approval: distinct approvers (never the requester) this action needs, taken from its
    # instruction set's policy when it is requested (null: 1); why the Core has not issued it yet.
    sa.Column("approvers_required", sa.Integer, nullable=True),
    sa.Column("issue_error", sa.Text, nullable=True),
)

# Per-instruction-set settings ("*": the default for sets without a row, and for raw SCALE).
instruction_sets = sa.Table(
    "instruction_sets", master,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("approvers_required", sa.Integer, nullable=False, server_default="1"),
    sa.CheckConstraint("approvers_required >= 1 AND approvers_required <= 100", name="ck_instruction_sets_approvers"),
)

# One row per approval of an action by one person (a rejection ends the instruction instead).
approvals = sa.Table(
    "approvals", master,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("instruction_id", sa.Integer, nullable=False),
    sa.Column("approver", sa.String(128), nullable=False),
    sa.Column("approved_at", sa.Float, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.UniqueConstraint("instruction_id", "approver", name="uq_approvals_instruction_approver"),
)

# One row (Id = 1): how the Coordinator sends email. Anonymous on port 25 by default, as in the seed.
smtp_settings = sa.Table(
    "smtp_settings", master,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
    sa.Column("username", sa.String(255), nullable=True),
    sa.Column("password", sa.Text, nullable=True),  # sealed (quanta.secretbox), up to 4 KiB plain
    sa.Column("starttls", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("from_addr", sa.String(255), nullable=False),
    sa.Column("require_approval_code", sa.Boolean, nullable=False, server_default=sa.false()),
)

approval_codes = sa.Table(
    "approval_codes", master,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("instruction_id", sa.Integer, nullable=False),
    sa.Column("username", sa.String(128), nullable=False),
    sa.Column("code_hash", sa.String(64), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("used", sa.Boolean, nullable=False, server_default=sa.false()),
)

audit_log = sa.Table(
    "audit_log", master,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.String(255), nullable=False, server_default=""),
    sa.Column("details", sa.JSON, nullable=False, default=dict),
    # master_0021 (quanta.accounts.audit is the one writer): where the request came from, and the
    # object's state before and after a change. Append-only: database triggers refuse UPDATE/DELETE.
    sa.Column("source", sa.String(64), nullable=False, server_default=""),
    sa.Column("state_before", sa.JSON, nullable=True),
    sa.Column("state_after", sa.JSON, nullable=True),
)
sa.Index("ix_audit_log_at", audit_log.c.at)
sa.Index("ix_audit_log_actor", audit_log.c.actor, audit_log.c.at)
sa.Index("ix_audit_log_action", audit_log.c.action, audit_log.c.at)
sa.Index("ix_audit_log_target", audit_log.c.target, audit_log.c.at)

# One row per Integrate Agent connector run (scheduled or on demand), successful or not.
integrate_runs = sa.Table(
    "integrate_runs", master,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("connector", sa.String(128), nullable=False),
    sa.Column("trigger", sa.String(32), nullable=False),  # schedule | demand
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("created", sa.Integer, nullable=False, server_default="0"),
    sa.Column("updated", sa.Integer, nullable=False, server_default="0"),
    sa.Column("unchanged", sa.Integer, nullable=False, server_default="0"),
    sa.Column("removed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("skipped", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error", sa.Text, nullable=True),
)
sa.Index("ix_integrate_runs_connector", integrate_runs.c.connector, integrate_runs.c.id)

# One row per (instruction, device): the idempotency key of every write on the response path.
# On PostgreSQL the table is partitioned by day of ``expires_at`` (quanta.db.partitions, migration
# responses_0004), its primary key then (instruction_id, device_id, expires_at); the store keeps one
# row per (instruction, device) all the same. ``expires_at`` +Infinity: never expires.
results = sa.Table(
    "results", responses,
    sa.Column("instruction_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("device_id", sa.String(255), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("columns", sa.JSON, nullable=True),
    sa.Column("rows", sa.JSON, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),  # response TTL
)
sa.Index("ix_results_state", results.c.instruction_id, results.c.state)
sa.Index("ix_results_expires_at", results.c.expires_at)  # the response-TTL purge
sa.Index("ix_results_device", results.c.device_id, results.c.instruction_id)  # a device's recent instructions

# Answers the Core kept but did not count: "late" (the instruction had already ended: its final
# counts stay final) or "refused" (it could not be stored, came through a Switch link the device
# is not on, or names an unknown instruction). Kept for administrators until ``expires_at``.
held_responses = sa.Table(
    "held_responses", responses,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # late | refused
    sa.Column("instruction_id", sa.Integer, nullable=False),
    sa.Column("device_id", sa.String(255), nullable=False),
    sa.Column("switch", sa.String(128), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # the state the answer carried
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("response", sa.LargeBinary, nullable=False),  # the Response as msgpack
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)
sa.Index("ix_held_responses_instruction", held_responses.c.instruction_id, held_responses.c.kind)
sa.Index("ix_held_responses_expires", held_responses.c.expires_at)


# --------------------------------------------------------------- definitions, packs, RBAC
# Trusted publishers: only packs signed by one of these keys are imported.
publishers = sa.Table(
    "publishers", master,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("public_key", sa.Text, nullable=False),  # Ed25519, PEM
    sa.Column("added_at", sa.Float, nullable=False),
)

definitions = sa.Table(
    "definitions", master,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("instruction_set", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),  # the whole validated definition
    sa.Column("checksum", sa.String(64), nullable=False),  # SHA-256 of the canonical spec, re-checked at issue
    sa.Column("pack", sa.String(255), nullable=False),
    sa.Column("publisher", sa.String(128), nullable=False),
    sa.Column("imported_at", sa.Float, nullable=False),
)

# A role for one instruction set, or for all ("*").
role_assignments = sa.Table(
    "role_assignments", master,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.String(128), nullable=False),
    sa.Column("role", sa.String(64), nullable=False),
    sa.Column("instruction_set", sa.String(128), nullable=False),
    sa.UniqueConstraint("username", "role", "instruction_set", name="uq_role_assignment"),
)

# Server-assigned device attributes (set by an administrator, never by the device): what a
# management-group rule's "attributes" key matches, unlike the tags a device reports itself.
device_attributes = sa.Table(
    "device_attributes", master,
    sa.Column("device_id", sa.String(255), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
    sa.Column("set_by", sa.String(128), nullable=False),
    sa.Column("set_at", sa.Float, nullable=False),
)

# Management groups scope which devices a user may reach.
management_groups = sa.Table(
    "management_groups", master,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("rule", sa.JSON, nullable=False),  # {"devices": [...], "os_like": "...", "tags": {k: v}, "attributes": {k: v}}
)

user_groups = sa.Table(
    "user_groups", master,
    sa.Column("username", sa.String(128), primary_key=True),
    sa.Column("group_name", sa.String(128), primary_key=True),
)
