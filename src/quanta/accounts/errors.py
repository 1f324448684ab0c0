"""What the accounts service raises. Each maps to one HTTP answer (see docs/operations.md):

BadCredentials 401, Locked 429 + Retry-After, Forbidden 403, NotFound 404, Conflict 409,
Invalid 422. None of them ever carries a password or a token.
"""

from __future__ import annotations

import math


class AccountError(Exception):
    """Base of every accounts error; ``str(e)`` is safe to show to the caller."""


class Invalid(AccountError, ValueError):
    """Input refused at the boundary (name, e-mail, password, role, group, paging)."""


class BadCredentials(AccountError):
    """Wrong user name or password, a disabled account: the same error for all of them."""

    def __init__(self) -> None:
        super().__init__("wrong username or password")


class Locked(AccountError):
    """Too many failed logins for this user name or this source address."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(f"too many failed logins; try again in {self.retry_after} s")


class Forbidden(AccountError):
    """The actor may not do this (only Full Administrators administer users)."""


class NotFound(AccountError, LookupError):
    """No such user (or lock)."""


class Conflict(AccountError):
    """The change contradicts the current state: the user exists, or it would leave no Full Administrator."""


def http_answer(error: AccountError) -> tuple[int, dict[str, str]]:
    """The HTTP status and headers for an accounts error (the detail is ``str(error)``)."""
    if isinstance(error, Locked):
        return 429, {"Retry-After": str(error.retry_after)}
    if isinstance(error, BadCredentials):
        return 401, {"WWW-Authenticate": "Bearer"}
    for cls, status in ((Forbidden, 403), (NotFound, 404), (Conflict, 409), (Invalid, 422)):
        if isinstance(error, cls):
            return status, {}
    return 400, {}
