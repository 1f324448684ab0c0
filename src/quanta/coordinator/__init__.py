"""Coordinator: approvals (never by the requester), one-time codes by email, expiry, schedules, SMTP."""

from .service import APPROVER_ROLES, Coordinator, SmtpConfig, WorkflowError, load_smtp, save_smtp

__all__ = ["APPROVER_ROLES", "Coordinator", "SmtpConfig", "WorkflowError", "load_smtp", "save_smtp"]
