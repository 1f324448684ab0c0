"""Accounts: sessions, login throttling, user administration and the audit log.

The interface callers depend on (no web framework here; synchronous, safe from a thread pool)::

    accounts = Accounts(master_engine, Policy.from_settings(settings))
    session = accounts.login(name, password, source)   # BadCredentials | Locked(retry_after)
    user = accounts.authenticate(token)                # User | None; renews the session
    accounts.logout(token, source)
    accounts.list_users(actor) / get_user / create_user / update_user / delete_user / reset_password
    accounts.change_password(name, old, new, source)
    accounts.list_locks(actor) / unlock(actor, subject, kind)
    audit.record(engine, actor, source, action, object, before, after) / audit.query(engine, ...)
"""

from __future__ import annotations

from . import audit
from .errors import AccountError, BadCredentials, Conflict, Forbidden, Invalid, Locked, NotFound, http_answer
from .passwords import hash_password, verify_password
from .service import UNSET, Accounts, Actor, Lock, Policy, Session, User, UserRecord, token_hash

__all__ = ["UNSET", "AccountError", "Accounts", "Actor", "BadCredentials", "Conflict", "Forbidden", "Invalid",
           "Lock", "Locked", "NotFound", "Policy", "Session", "User", "UserRecord", "audit", "hash_password", "http_answer",
           "token_hash", "verify_password"]
