"""Domain errors of the Consumer API. The service raises these (it knows nothing of HTTP);
``create_app`` maps each to its status code with one exception handler."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error answered to the caller: ``status`` and a ``detail`` (a string or a JSON object)."""

    status = 400

    def __init__(self, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail if isinstance(detail, str) else repr(detail))
        self.detail = detail
        self.headers = headers


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class TooLarge(ApiError):
    status = 413


class Invalid(ApiError):
    status = 422


class BadGateway(ApiError):
    """The Core refused or failed after the request was accepted."""

    status = 502


class Unavailable(ApiError):
    status = 503


class Upstream(ApiError):
    """An error relayed as is from an internal service (the Coordinator)."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(detail)
        self.status = status
